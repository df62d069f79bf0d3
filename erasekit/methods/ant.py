"""ANT: auto-steering denoising trajectories to sidestep unwanted concepts (Li, Lu, Ren, Kong, ACM MM 2025,
"Set You Straight: Auto-Steering Denoising Trajectories to Sidestep Unwanted Concepts",
https://arxiv.org/abs/2504.12782; the authors' code, ``train_ant.py``).

ANT is anchor-free: no replacement concept is named. It rests on one observation: the early denoising steps lay out
the image's structure and the later ones fill in its content, so the classifier-free-guidance condition direction is
**reversed only in the mid-to-late steps**, while the early-step score field is kept as it was. From one noise, the
frozen model's guided DDIM rollout on the concept ``c`` is stopped at an early step ``t⁺`` (the first
``early_steps`` of ``num_inference_steps``) and, continued, at a later step ``t⁻``; with ``ε₀`` the frozen model,
``ε_θ`` the fine-tuned one and η the guidance scale of the target (the paper's trajectory-aware objective):

    L₁ = ‖ε_θ(x_t⁺, c) − [ε₀(x_t⁺, ∅) + η (ε₀(x_t⁺, c) − ε₀(x_t⁺, ∅))]‖²     early: the guided direction kept
    L₂ = ‖ε_θ(x_t⁺, ∅) − ε₀(x_t⁺, ∅)‖²                                      early: the unconditional score kept
    L₃ = ‖ε_θ(x_t⁻, c) − [ε₀(x_t⁻, ∅) − η (ε₀(x_t⁻, c) − ε₀(x_t⁻, ∅))]‖²     mid-to-late: the direction reversed
    L₄ = ‖ε_θ(x_t⁻, ∅) − ε₀(x_t⁻, ∅)‖²                                      mid-to-late: unconditional kept
    L  = L₃ + α₂ L₄ + α₁ (L₁ + α₂ L₂)

(The authors' code draws the loss's DDPM timestep inside the DDIM interval; here it is the DDIM step's own timestep,
as erasekit's ESD does. A public re-implementation computes ``ε_θ(·, ∅)`` without gradient, which leaves L₂ and L₄
inert; here they train, as the paper's preservation terms are meant to.)

For a single concept the paper trains only the "heavy hitters", the weights of an augmentation-enhanced saliency map:
that is the shared trainer's SalUn option (``saliency``, :func:`erasekit.methods.trainer.saliency_masks`), whose
gradient is summed over batches that each draw augmented prompts (the concept in random caption templates); the
paper intersects maps of separate augmentations instead. Several concepts train together, one drawn per step (the
paper's plug-and-play multi-concept objective: the same loss, summed over concepts in expectation).

Optionally (``preserve_weight`` > 0, not in the paper, as ESD's extension) the predictions of ``preserve`` prompts
(with ``preserve_related`` on tinyworld: the concept's siblings) are held at both steps too. The deltas live on an
ESD module preset (``train_method``; the authors fine-tune the whole UNet, ``esd-all``), one UNet serving as student
and, with its hooks disabled, as the frozen teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapter import Adapter
from ..core import lora, sd
from ..core.processes import WHOLE, Part
from ..errors import ConfigError
from .esd import PRESETS, TrainMethod, select, preserved
from .trainer import (Cond, PromptTable, check_prompts, ddim_scheduler, guided_steps, latent_shape, predict,
                      rollout_options, train, training_options, training_templates, validate_rollout_training)

@dataclass(frozen=True)
@training_options
@rollout_options
class AntConfig:
    """The defaults are the authors' settings for SD 1.4 (``train_ant.py`` and its argument defaults: the whole UNet,
    250 iterations at lr 5e-4 and batch 1, 7 early steps of a 50-step DDIM rollout, α₁ = 1, α₂ = 0.5), with SalUn's
    half of the weights for the saliency map (the authors' mask file is computed separately).

    Args:
        concepts: prompts to erase, e.g. ("circle",); with several, each step trains on one drawn at random.
        train_method: which UNet modules get a delta (ESD's presets: esd-x, esd-x-strict, esd-u, esd-all; the
            authors train the whole UNet, esd-all).
        templates: prompts the concepts are trained in, "{}" standing for the concept; empty: the bare concept, or
            tinyworld's caption templates on tinyworld.
        early_steps: rollout steps (of num_inference_steps) whose score field is kept (L₁, L₂): the structure
            stage; the steps after them have the condition direction reversed (L₃, L₄). Paper: 7 of 50.
        negative_guidance: η, the guidance scale of both targets.
        alpha_early: α₁, weight of the early-step terms.
        alpha_uncond: α₂, weight of the unconditional-score terms.
        preserve_weight: λ, weight of the (non-paper) preservation of ``preserve`` prompts' predictions at both
            steps; 0 = the paper's loss.
        preserve: prompts whose predictions the preservation term holds (needs preserve_weight > 0).
        preserve_related: on tinyworld, also preserve the erased concepts' siblings (needs preserve_weight > 0).
        rank: rank of each delta; 0 trains full deltas, as the authors do (and as saliency needs).
    """

    concepts: tuple[str, ...]
    train_method: TrainMethod = "esd-all"
    templates: tuple[str, ...] = ()
    early_steps: int = 7
    negative_guidance: float = 1.0
    alpha_early: float = 1.0
    alpha_uncond: float = 0.5
    preserve_weight: float = 0.0
    preserve: tuple[str, ...] = ()
    preserve_related: bool = False
    rank: int = 0
    saliency: float = 0.5
    num_inference_steps: int = 50
    iterations: int = 250
    lr: float = 5e-4
    batch_size: int = 1

    def __post_init__(self):
        validate_rollout_training(self)
        if self.train_method not in PRESETS:
            raise ConfigError(f"train_method must be one of {', '.join(PRESETS)}, got {self.train_method!r}")
        if not 1 <= self.early_steps < self.num_inference_steps:
            raise ConfigError(f"early_steps must be in [1, num_inference_steps) = [1, {self.num_inference_steps}): "
                              f"some steps keep the score field and later ones reverse it; got {self.early_steps}")
        for name in ("alpha_early", "alpha_uncond", "preserve_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        check_prompts(self, "preserve")
        if (self.preserve or self.preserve_related) and not self.preserve_weight:
            raise ConfigError("preserve / preserve_related need preserve_weight > 0 (the preservation term's weight)")


def objective(pipe, config: AntConfig) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator, part)``: ANT's loss of one step (module docstring)."""
    unet = sd.denoiser(pipe)
    n_concepts = len(config.concepts)
    kept = preserved(config)
    table = PromptTable(pipe, training_templates(config), list(config.concepts) + kept, config.resolution)
    uncond = table.uncond
    scheduler = ddim_scheduler(pipe, config.num_inference_steps)
    shape = latent_shape(pipe, config.batch_size, config.resolution)
    n, eta, early, total = shape[0], config.negative_guidance, config.early_steps, config.num_inference_steps

    def loss_for(deltas: lora.Deltas):
        def loss_fn(step: int, gen: torch.Generator, part: Part = WHOLE) -> torch.Tensor:
            k = int(torch.randint(n_concepts, (), generator=gen))
            rows = torch.randint(len(table.templates), (n,), generator=gen).tolist()
            t_plus = int(torch.randint(early, (), generator=gen))  # a structure step ...
            t_minus = int(torch.randint(early, total, (), generator=gen))  # ... and a content step, one trajectory
            held = int(torch.randint(len(kept), (), generator=gen)) if kept else None
            mine = part.rows(n)
            rows, m = rows[mine], mine.stop - mine.start
            concept = table.batch(k, rows)
            none = uncond.repeat(m)
            both = Cond.cat([none, concept])
            eps = lambda x2, t: predict(unet, x2, t, both)  # noqa: E731
            with deltas.disabled(), torch.no_grad():  # the frozen teacher: the same UNet without deltas
                x = (torch.randn(shape, generator=gen)[mine] * scheduler.init_noise_sigma).to(
                    scheduler.timesteps.device, concept.hidden.dtype)
                x_plus, s_plus = guided_steps(eps, scheduler, x, config.start_guidance, t_plus)
                x_minus, s_minus = guided_steps(eps, scheduler, x_plus, config.start_guidance, t_minus, start=t_plus)
                conds = [none, concept] + ([table.batch(n_concepts + held, rows)] if kept else [])
                teacher = {}
                for name, x_t, t in (("plus", x_plus, s_plus), ("minus", x_minus, s_minus)):
                    teacher[name] = predict(unet, torch.cat([x_t] * len(conds)), t,
                                            Cond.cat(conds)).float().chunk(len(conds))
            forget, retain = 0.0, 0.0  # the concept's terms, and the unconditional (and preserved) ones
            for name, x_t, t, sign, weight in (("plus", x_plus, s_plus, 1.0, config.alpha_early),
                                               ("minus", x_minus, s_minus, -1.0, 1.0)):
                e_none, e_concept, *e_kept = teacher[name]
                target = e_none + sign * eta * (e_concept - e_none)
                student = predict(unet, torch.cat([x_t] * len(conds)), t, Cond.cat(conds)).float().chunk(len(conds))
                forget = forget + weight * F.mse_loss(student[1], target)
                held = config.alpha_uncond * F.mse_loss(student[0], e_none)
                if kept:
                    held = held + config.preserve_weight * F.mse_loss(student[2], e_kept[0])
                retain = retain + weight * held
            return part.mean(forget, n), part.mean(retain, n)  # summed by fit (or deconflicted: gradient_surgery)

        return loss_fn

    return loss_for


def erase(pipe, config: AntConfig) -> Adapter:
    """Train an ANT adapter for ``config.concepts``; ``pipe`` is left as it was (no hooks, same weights)."""
    names = select(pipe, config.train_method)
    return train(pipe, config, names, objective(pipe, config), "ant")
