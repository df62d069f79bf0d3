"""Continual unlearning: DUGE, Decremental Unlearning without Generalization Erosion (Thakral, Glaser, Hassner,
Vatsa, Singh 2025, "Continual Unlearning for Foundational Text-to-Image Models without Generalization Erosion",
https://arxiv.org/abs/2503.13769).

Concepts arrive one after another: step n+1 erases ``concepts`` from the model φ_n that already has steps 1…n's
erasures (``continue_from``: the adapter of step n), and its adapter holds the cumulative deltas (step n's
factors and the new ones side by side), so loading only the last file gives every erasure. The adapter's
``concepts`` lists every concept erased so far and ``info["sequence"]`` records each step (its concepts, its
settings, and the prompts its regularization memory keeps).

Each step trains low-rank deltas θ on the cross-attention (ESD's ``esd-x`` preset by default) against three
losses, the paper's L = L_U + λ_pr L_pr + λ_reg L_reg:

* **cross-attention (unlearning) loss** L_U: the paper matches the trained model's cross-attention maps on the
  target concept to the frozen model φ_n's maps without it, ``L_U = 1/M Σ_i (A_i^θ − A_i^{φ_n})²``, steering
  the target's prompts toward images devoid of the concept. Reconstructed here on the UNet's output, which the
  cross-attention deltas alone move: ``‖ε_θ(x_t, c) − [ε_φn(x_t, a) − η (ε_φn(x_t, c) − ε_φn(x_t, a))]‖²``
  with ``a`` the same prompt without the concept ("a red square" → "a  square"; the bare concept → the empty
  prompt), or with the ``anchor`` word in its place, and η ``negative_guidance`` (0 = the concept-free prompt's
  prediction itself, the paper's target; η > 0 pushes further, as ESD's target does, which a small model needs:
  a prompt without its shape still draws a circle one time in six). Keeping the rest of the prompt in the target
  keeps the rest of the image: erasing red leaves "a red square" a square (with the unconditional prediction as
  ``a``, the red scenes lost their shapes too: 15.8 points of shape accuracy at step 2 of the benchmark).
  x_t is a partial DDIM rollout of φ_n on ``c`` (ESD's sampling).
* **prior preservation** L_pr: the paper keeps knowledge of related, non-target concepts with a
  DreamBooth-style loss on their images, ``1/m Σ E_{t,c}‖ε − ε_θ(x, c_pr, t)‖²``; here the related prompts
  (``preserve``; on tinyworld ``preserve_related``: the concept's siblings, in the concept's templates) are
  distilled from φ_n at the same x_t: ``‖ε_θ(x_t, p) − ε_φn(x_t, p)‖²`` (no images are stored or generated).
* **regularization against generalization erosion** L_reg: the paper keeps a small memory of data unrelated to
  the target to stop the model drifting away from φ_n. Here the memory is the unconditional prompt and the prompts
  of the earlier steps' erased concepts (recorded in the adapter: ``info["sequence"][i]["memory"]``), held to
  φ_n: ``‖ε_θ(x_t, ∅) − ε_φn(x_t, ∅)‖² + ‖ε_θ(x_t, q) − ε_φn(x_t, q)‖²`` for one remembered prompt q — the
  earlier erasures stay erased and prompts in general keep their predictions.

Reconstructed: the authors' code (github.com/IAB-IITJ/Continual-Unlearning, named by a third-party benchmark) and
the paper's full text were not reachable when this was written, only its abstract and summaries of its method,
so the loss formulas above are quoted from those summaries (without the paper's equation numbers), and the losses'
placement (noise predictions rather than attention maps), the memory, the anchor and all weights are erasekit's;
the defaults are ESD's rollout settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapter import Adapter
from ..core import lora
from ..core.processes import WHOLE, Part
from ..errors import AdapterError, ConfigError
from .esd import PRESETS, TrainMethod
from .trainer import (Cond, PromptTable, check_prompts, ddim_scheduler, fit_deltas, latent_shape, package, predict,
                      rollout, rollout_options, training_options, training_templates, validate_rollout_training)

#: prompts of each step kept in the adapter's record, for the next steps' regularization memory
MEMORY_PROMPTS = 16


@dataclass(frozen=True)
@training_options
@rollout_options
class DugeConfig:
    """Args:
        concepts: the prompts this step erases, e.g. ("red",); with several, each training step draws one.
        continue_from: the adapter file of the previous step ("" = the first step): its erasures are kept, and
            the new adapter holds them and this step's.
        anchor: word put in the erased concept's place in the concept-free target prompt ("" = the prompt
            with the concept left out; the bare concept: the empty prompt).
        negative_guidance: η of the unlearning target ``ε(a) − η (ε(c) − ε(a))`` (0 = the anchor's prediction).
        templates: prompts the concepts are trained in, "{}" standing for the concept; empty: the bare concept,
            or tinyworld's caption templates on tinyworld.
        preserve: related prompts whose predictions the prior-preservation loss keeps.
        preserve_related: on tinyworld, also preserve the erased concepts' siblings (the other colours for red).
        prior_weight: λ_pr, weight of the prior-preservation loss (needs preserve prompts to act).
        regularization_weight: λ_reg, weight of the regularization loss (∅ and the earlier steps' prompts held
            to the previous step's model).
        train_method: which UNet modules get a delta (ESD's presets; esd-x = the cross-attention).
    """

    concepts: tuple[str, ...]
    continue_from: str = ""
    anchor: str = ""
    negative_guidance: float = 0.0
    templates: tuple[str, ...] = ()
    preserve: tuple[str, ...] = ()
    preserve_related: bool = False
    prior_weight: float = 1.0
    regularization_weight: float = 1.0
    train_method: TrainMethod = "esd-x"

    def __post_init__(self):
        validate_rollout_training(self)
        for name in ("negative_guidance", "prior_weight", "regularization_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        check_prompts(self, "preserve")
        if self.train_method not in PRESETS:
            raise ConfigError(f"train_method must be one of {', '.join(PRESETS)}, got {self.train_method!r}")
        if self.anchor.strip() in {c.strip() for c in self.concepts}:
            raise ConfigError(f"anchor {self.anchor!r} is one of the concepts being erased")
        if not isinstance(self.continue_from, str):
            raise ConfigError(f"continue_from must be the path of an adapter file, got {self.continue_from!r}")


# ------------------------------------------------------------------------------------------ the previous step
def previous_step(pipe, path: str) -> Adapter:
    """The adapter of the previous step, read and checked against ``pipe``; one ConfigError naming the file
    when it is missing, damaged, or not a static UNet erasure of this very model."""
    from ..adapter import check_compatible, load_adapter

    where = f"continue_from {path!r}"
    try:
        adapter = load_adapter(Path(path))
        check_compatible(adapter, pipe, strict=True)
    except AdapterError as err:
        raise ConfigError(f"{where}: {err}") from None
    if adapter.is_guard or not adapter.is_static or not adapter.deltas or adapter.components != ("unet",):
        raise ConfigError(f"{where}: a continual step continues a static erasure of the UNet; this is a "
                          f"{adapter.kind} adapter of {adapter.method!r} changing {list(adapter.components)} "
                          f"(gating {adapter.gating.get('rule')!r})")
    return adapter


def sequence_of(adapter: Adapter | None) -> list[dict]:
    """The steps an adapter records (``info["sequence"]``); an adapter of another method is one step."""
    if adapter is None:
        return []
    if adapter.info.get("sequence"):
        return [dict(step) for step in adapter.info["sequence"]]
    return [{"method": adapter.method, "concepts": list(adapter.concepts), "memory": list(adapter.concepts)}]


def memory_prompts(sequence: list[dict]) -> list[str]:
    """The regularization memory: every earlier step's remembered prompts."""
    return list(dict.fromkeys(p for step in sequence for p in step.get("memory", step.get("concepts", []))))


def cumulative(previous: dict[str, lora.ModuleDelta], new: dict[str, lora.ModuleDelta]) -> dict:
    """``ΔW_prev + ΔW_new`` per module: low-rank factors side by side (rank r₁ + r₂, exact), else dense sums."""
    out = {}
    for key in dict.fromkeys([*previous, *new]):
        a, b = previous.get(key), new.get(key)
        if a is None or b is None:
            out[key] = a if b is None else b
        elif a.delta is None and b.delta is None:
            out[key] = lora.ModuleDelta(down=torch.cat([a.down.float(), b.down.float()]),
                                        up=torch.cat([a.up.float(), b.up.float()], 1))
        else:
            out[key] = lora.ModuleDelta(delta=a.dense() + b.dense())
    return out


@contextlib.contextmanager
def applied(unet, deltas: dict[str, lora.ModuleDelta]):
    """Stored deltas on ``unet`` for the block (``lora.applied``, one rank at a time)."""
    with contextlib.ExitStack() as stack:
        by_rank: dict[int, dict] = {}
        for key, d in deltas.items():
            by_rank.setdefault(d.rank or 0, {})[key] = d
        for group in by_rank.values():
            stack.enter_context(lora.applied(unet, group, "unet"))
        yield


# ------------------------------------------------------------------------------------------ the loss
def related(config) -> list[str]:
    """``config.preserve`` without the erased concepts (on tinyworld with ``preserve_related`` the presets have
    added the siblings: :func:`erasekit.methods.presets.related_concepts`)."""
    return [p for p in dict.fromkeys(config.preserve) if p not in config.concepts]


def mentions(prompt: str, concepts) -> bool:
    """Whether ``prompt`` names one of ``concepts`` (as whole words): such memory prompts are not held, since
    this step changes them."""
    return any(re.search(rf"(?<!\w){re.escape(c.strip())}(?!\w)", prompt) for c in concepts)


def objective(pipe, config: DugeConfig, memory: list[str] = ()) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator)``: the DUGE loss of one step (module docstring). The
    teacher φ_n is the UNet with ``deltas`` disabled (the previous steps' deltas, if any, stay applied)."""
    unet = pipe.unet
    n_concepts = len(config.concepts)
    kept = related(config)
    memory = [m for m in memory if not mentions(m, config.concepts)]
    table = PromptTable(pipe, training_templates(config),
                        list(config.concepts) + [config.anchor.strip()] + kept, config.resolution)
    remembered = PromptTable(pipe, ["{}"], memory, config.resolution) if memory else None
    uncond = table.uncond
    scheduler = ddim_scheduler(pipe, config.num_inference_steps)
    shape = latent_shape(pipe, config.batch_size, config.resolution)
    n, eta = shape[0], config.negative_guidance
    first_kept = n_concepts + 1

    def loss_for(deltas: lora.Deltas):
        def loss_fn(step: int, gen: torch.Generator, part: Part = WHOLE) -> torch.Tensor:
            k = int(torch.randint(n_concepts, (), generator=gen))
            rows = torch.randint(len(table.templates), (n,), generator=gen).tolist()
            steps = int(torch.randint(config.num_inference_steps, (), generator=gen))
            mine = part.rows(n)
            rows, m = rows[mine], mine.stop - mine.start
            erased = table.batch(k, rows)
            anchor = table.batch(n_concepts, rows)  # the same templates, without the concept
            with deltas.disabled(), torch.no_grad():  # φ_n: the base model with the previous steps' deltas
                x, t = rollout(unet, scheduler, erased, uncond, config.start_guidance, steps, shape, gen, mine)
                held, weights = [uncond.repeat(m)], [config.regularization_weight]  # what φ_n's predictions hold
                if kept:  # drawn after the rollout, as ESD draws its preserved prompt
                    held.append(table.batch(first_kept + int(torch.randint(len(kept), (), generator=gen)), rows))
                    weights.append(config.prior_weight)
                if remembered is not None:
                    held.append(remembered.batch(int(torch.randint(len(memory), (), generator=gen)), [0] * m))
                    weights.append(config.regularization_weight)
                e_erase, e_anchor, *e_held = predict(unet, torch.cat([x] * (2 + len(held))), t,
                                                     Cond.cat([erased, anchor] + held)).float().chunk(2 + len(held))
            target = e_anchor - eta * (e_erase - e_anchor)  # L_U's concept-free target
            student, *s_held = predict(unet, torch.cat([x] * (1 + len(held))), t,
                                       Cond.cat([erased] + held)).float().chunk(1 + len(held))
            loss = F.mse_loss(student, target) + sum(w * F.mse_loss(s, e) for w, s, e in zip(weights, s_held, e_held))
            return part.mean(loss, n)

        return loss_fn

    return loss_for


def step_record(config: DugeConfig, templates: list[str]) -> dict:
    """This step's entry in ``info["sequence"]``: its concepts, settings and remembered prompts."""
    settings = ("anchor", "negative_guidance", "prior_weight", "regularization_weight", "train_method", "iterations",
                "lr", "rank", "batch_size", "seed")
    prompts = [t.replace("{}", c) for c in config.concepts for t in templates]
    count = min(len(prompts), MEMORY_PROMPTS)  # evenly spread over the prompts
    memory = list(dict.fromkeys(prompts[i * len(prompts) // count] for i in range(count)))
    return {"method": "duge", "concepts": list(config.concepts), **{k: getattr(config, k) for k in settings},
            "preserve": list(related(config)), "memory": memory}


def erase(pipe, config: DugeConfig) -> Adapter:
    """One DUGE step: erase ``config.concepts`` from ``pipe`` with the previous step's adapter (``continue_from``)
    applied; returns the cumulative adapter. ``pipe`` is left as it was (no hooks, same weights)."""
    previous = previous_step(pipe, config.continue_from) if config.continue_from else None
    sequence = sequence_of(previous)
    names = lora.select(pipe.unet, PRESETS[config.train_method])
    with applied(pipe.unet, previous.deltas if previous else {}):
        new, info = fit_deltas(pipe, config, names, objective(pipe, config, memory_prompts(sequence)), "duge")
    deltas = cumulative(previous.deltas, new) if previous else new
    info["sequence"] = sequence + [step_record(config, training_templates(config))]
    adapter = package(pipe, config, "duge", deltas, ["unet"], info)
    concepts = tuple(dict.fromkeys([*(previous.concepts if previous else ()), *config.concepts]))
    return dataclasses.replace(adapter, concepts=concepts)


__all__ = ["DugeConfig", "cumulative", "erase", "objective", "previous_step"]
