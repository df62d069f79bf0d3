"""All but One: surgical concept erasing with model preservation (Hong, Lee, Woo, AAAI 2024,
https://arxiv.org/abs/2312.12807).

No code was published; this follows the paper's description (the abstract and its figure; erasekit's
reconstruction). Write the model's score as ``ε(x, c) = ε(x, ∅) + g(x, c)`` with the
guidance term ``g(x, c) = ε(x, c) − ε(x, ∅)``. Only the target's guidance term is changed, toward the guidance
term of a user-chosen replacement ``r`` (or toward ``−η g`` — zero for η = 0 — when there is none), while an
explicit loss pins the unconditional score to the original's (ANT's uncond-preservation term, Li et al. 2025):

    L = ‖g_θ(x_t, c) − g*(x_t)‖² + λ ‖ε_θ(x_t, ∅) − ε_θ₀(x_t, ∅)‖²,
    g* = g_θ₀(x_t, r)  with a replacement,   g* = −η g_θ₀(x_t, c)  without,

x_t drawn as in ESD: a partial DDIM rollout of the frozen model on ``c`` with guidance ``start_guidance``.
At the optimum ``ε_θ(x, c) = ε_θ₀(x, ∅) + g*``: prompts of ``c`` follow ``r``'s guidance, ``∅`` is untouched.
Training machinery (deltas on a module preset, one UNet as student and teacher) is ESD's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import torch
import torch.nn.functional as F

from ..core import lora, sd
from ..core.processes import WHOLE, Part
from ..adapter import Adapter
from ..errors import ConfigError
from .esd import PRESETS, TrainMethod, select
from .trainer import (Cond, PromptTable, ddim_scheduler, latent_shape, predict, rollout, rollout_options, train,
                      training_options, training_templates, validate_replace_with, validate_rollout_training)


@dataclass(frozen=True)
@training_options
@rollout_options
class AboConfig:
    """Args:
        concepts: prompts to erase, e.g. ("circle",); with several, each step trains on one drawn at random.
        replace_with: concept whose guidance term the erased concepts take on, e.g. "square" ("" = none:
            the guidance term is steered to −η times itself).
        templates: prompts the concepts (and the replacement, in the same template) are trained in, "{}"
            standing for the concept; empty: the bare concept, or tinyworld's caption templates on tinyworld
            (as ESD's ``training_templates``).
        negative_guidance: η, used without a replacement (0 = guidance term to zero, 1 = reversed).
        preserve_weight: λ, weight of the unconditional-score preservation loss.
        train_method: which UNet modules get a delta (ESD's presets: esd-x, esd-x-strict, esd-u, esd-all).
    """

    concepts: tuple[str, ...]
    replace_with: str = ""
    templates: tuple[str, ...] = ()
    negative_guidance: float = 1.0
    preserve_weight: float = 1.0
    train_method: TrainMethod = "esd-x"

    def __post_init__(self):
        validate_rollout_training(self)
        if self.train_method not in PRESETS:
            raise ConfigError(f"train_method must be one of {', '.join(PRESETS)}, got {self.train_method!r}")
        if self.preserve_weight < 0:
            raise ConfigError(f"preserve_weight must be ≥ 0, got {self.preserve_weight}")
        validate_replace_with(self)


def objective(pipe, config: AboConfig) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator)``: the loss of one step (module docstring)."""
    unet = sd.denoiser(pipe)
    n_concepts = len(config.concepts)
    replace = bool(config.replace_with.strip())
    table = PromptTable(pipe, training_templates(config),
                        list(config.concepts) + ([config.replace_with] if replace else []), config.resolution)
    uncond = table.uncond
    scheduler = ddim_scheduler(pipe, config.num_inference_steps)
    shape = latent_shape(pipe, config.batch_size, config.resolution)
    n = shape[0]

    def loss_for(deltas: lora.Deltas):
        def loss_fn(step: int, gen: torch.Generator, part: Part = WHOLE) -> torch.Tensor:
            k = int(torch.randint(n_concepts, (), generator=gen))
            rows = torch.randint(len(table.templates), (n,), generator=gen).tolist()
            steps = int(torch.randint(config.num_inference_steps, (), generator=gen))
            mine = part.rows(n)  # this process's samples of the batch (all of them on one process)
            rows, m = rows[mine], mine.stop - mine.start
            erased = table.batch(k, rows)
            other = table.batch(n_concepts, rows) if replace else erased  # the replacement in the same template
            with deltas.disabled(), torch.no_grad():  # the frozen original: the same UNet without deltas
                x, t = rollout(unet, scheduler, erased, uncond, config.start_guidance, steps, shape, gen, mine)
                teacher = Cond.cat([uncond.repeat(m), other])
                e_null0, e_other0 = predict(unet, torch.cat([x, x]), t, teacher).float().chunk(2)
            # g*: the replacement's guidance term, or −η × the target's own
            g_target = e_other0 - e_null0 if replace else -config.negative_guidance * (e_other0 - e_null0)
            e_cond, e_null = predict(unet, torch.cat([x, x]), t, Cond.cat([erased, uncond.repeat(m)])).float().chunk(2)
            return part.mean(F.mse_loss(e_cond - e_null, g_target)
                             + config.preserve_weight * F.mse_loss(e_null, e_null0), n)

        return loss_fn

    return loss_for


def erase(pipe, config: AboConfig) -> Adapter:
    """Train an All-but-One adapter; ``pipe`` is left as it was (no hooks, same weights)."""
    names = select(pipe, config.train_method)
    return train(pipe, config, names, objective(pipe, config), "abo")


__all__ = ["AboConfig", "erase", "objective"]
