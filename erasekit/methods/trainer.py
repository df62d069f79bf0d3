"""What the trained erasure methods share: the training loop (``fit``), their shared config fields
(``TRAINING_FIELDS``, added by :func:`training_options`) and checks, prompt tables, the frozen model's partial DDIM
rollout, the UNet methods' training body (``fit_deltas``, ``train``) and the assembly of every Adapter (``package``).

A method hands ``fit`` its trainable tensors and a ``loss_fn(step, generator, part) -> loss``; ``fit`` runs Adam
with a constant learning rate (as the ESD code does), and takes care of the rest:

* **seeding**: every step draws its randomness from ``step_generator(seed, step)``, so a run resumed from a
  checkpoint follows the same trajectory as an uninterrupted one;
* **checkpoints**: every ``checkpoint_every`` steps one ``checkpoint.safetensors`` in ``checkpoint_dir``
  (:mod:`erasekit.methods.checkpoint`: trainable tensors and optimizer tensors; step, losses and optimizer
  scalars as JSON in the metadata), written as adapters are (unique temporary file, fsync, atomic rename); ``resume=True`` continues from it,
  refusing a checkpoint of another run, one past the requested steps, or a damaged one. Nothing is unpickled.
  The folder is locked (``checkpoint.lock``) while a run uses it, so two runs never write it at once;
* **divergence**: after every update, the last one included, the parameters must be finite and each
  module's ``‖ΔW‖/‖W‖`` at most ``MAX_RATIO``; a NaN/inf loss or a failed check raises
  ``TrainingDivergedError`` naming the step, the tensor and its value. Only checked states are
  checkpointed, so the last checkpoint is the last good one;
* **weight saliency** (SalUn, Fan et al., ICLR 2024, https://arxiv.org/abs/2310.12508, Eq. 6–7): with
  ``saliency`` = s > 0, only the fraction s of the trained weights with the largest forgetting-loss gradient
  magnitude ``|∇_θ L_f(θ₀)|`` (summed over ``saliency_batches`` batches drawn before step 0, one threshold over all
  tensors) train; the mask multiplies every gradient, so the other weights stay exactly zero under Adam and the
  adapter file stores only what changed (a sparse delta, format 1.2);
* **mixed precision** (``"bf16"``, or ``"fp16"`` with a gradient scaler on CUDA) via ``torch.autocast``;
* **data parallel**: launched by ``accelerate launch`` (or ``torchrun``) on several processes (GPUs or CPU
  processes, one machine or several: :mod:`erasekit.core.processes`), each process computes its rows of the
  step's batch (``loss_fn(step, generator, part)``, :class:`erasekit.core.processes.Part`) from the same
  randomness (every process draws the whole batch's from the same step generator, then keeps its rows), weights
  its loss by its share of the rows, and the gradients (and the loss) are summed over the processes before the
  update: the same global batch, hence the same run, as one process, up to floating-point rounding. Only the
  main process writes checkpoints. A ``loss_fn(step, generator)`` without ``part`` is computed whole on every
  process (same result, no speed-up). One process needs neither the launcher nor ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..adapter import Adapter
from ..core import lora, processes, sd
from ..core.config import shared_fields
from ..core.files import exclusive_lock
from ..core.mmdit import collapsed_padding, is_mmdit
from ..errors import CheckpointError, ConfigError, TrainingDivergedError
from .checkpoint import CHECKPOINT, LOCK, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

#: ‖ΔW‖/‖W‖ above which training has diverged: normal erasure moves a weight by a small fraction of itself.
MAX_RATIO = 10.0


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step (draw on CPU, then move: the same numbers on every device and process)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)


def takes_part(loss_fn: Callable) -> bool:
    """Whether ``loss_fn`` takes the process's :class:`~erasekit.core.processes.Part` as a third argument."""
    try:
        inspect.signature(loss_fn).bind(0, None, processes.WHOLE)
    except TypeError:
        return False
    return True


def _diverged(params: dict, ratios: Callable[[], dict[str, float]] | None, max_ratio: float) -> str | None:
    """What is wrong with the trained tensors (a non-finite value, or a delta over ``max_ratio`` × its base
    weight), or None when they are fine."""
    names, tensors = list(params), list(params.values())
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).tolist()  # one sync
    for name, t, ok in zip(names, tensors, finite):
        if not ok:
            bad = t.detach()[~torch.isfinite(t.detach())].flatten()[0].item()
            return f"parameter {name} holds {bad}"
    for name, ratio in (ratios() if ratios else {}).items():
        if not ratio <= max_ratio:  # NaN too
            return (f"the delta of module {name} is {ratio:.3g} times its base weight (‖ΔW‖/‖W‖, normal training "
                    f"stays far below {max_ratio:g})")
    return None


def _divergence(desc: str, step: int, steps: int, problem: str, lr: float, mixed_precision: str, saved: int | None,
                path: Path | None) -> TrainingDivergedError:
    kept = (f"the last good checkpoint (after step {saved}) is kept in {path}" if saved
            else "no good checkpoint was written" if path else "no checkpoint_dir was given")
    precision = " or train without mixed precision" if mixed_precision != "no" else ""
    return TrainingDivergedError(f"{desc}: training diverged in step {step + 1} of {steps}: {problem}; lower the "
                                 f"learning rate (lr / --lr, now {lr:g}){precision}; {kept}")


def fit(params: dict[str, torch.Tensor], loss_fn: Callable[..., torch.Tensor], *, steps: int,
        lr: float, seed: int = 0, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
        resume: bool = False, run: dict | None = None, mixed_precision: str = "no", progress: bool = True,
        desc: str = "train", ratios: Callable[[], dict[str, float]] | None = None,
        max_ratio: float = MAX_RATIO, saliency: float = 0.0, saliency_batches: int = 8,
        gradient_surgery: bool = False) -> list[float]:
    """Minimise ``loss_fn`` over ``params`` (leaf tensors with ``requires_grad``) for ``steps`` Adam steps.

    Args:
        params: name -> trainable tensor; names key the checkpoint.
        loss_fn: ``(step, generator, part) -> scalar loss`` (or ``(step, generator)``), or a ``(forgetting loss,
            retaining loss)`` pair that is added up (or deconflicted: ``gradient_surgery``); all randomness of the
            step must come from ``generator``, and with ``part`` (:class:`erasekit.core.processes.Part`) it computes
            the part's rows of the batch, its loss weighted by ``part.mean``.
        steps, lr, seed: total steps (a resumed run continues up to it), Adam learning rate, master seed.
        checkpoint_dir, checkpoint_every: where and how often (in steps; 0 = never) to checkpoint; the last
            step is always checkpointed when a folder is given. The folder is locked for the run.
        resume: continue from ``checkpoint_dir`` if it holds a checkpoint (else start afresh).
        run: JSON-able settings that must match to resume (a method's config without its step count).
        mixed_precision: "no", "bf16" or "fp16" (fp16 uses a gradient scaler; CUDA only).
        progress, desc: tqdm bar on/off and its label (the method's name: a checkpoint resumes only under it).
        ratios: ``() -> {module: ‖ΔW‖/‖W‖}`` (``lora.Deltas.ratios``); checked after every update, with the
            parameters' finiteness: above ``max_ratio``, training has diverged.
        saliency, saliency_batches: train only this fraction of the weights (0 = all), chosen by SalUn's gradient
            saliency over that many batches (:func:`saliency_masks`, module docstring).
        gradient_surgery: ``loss_fn`` returns ``(forgetting loss, retaining loss)``; the part of the forgetting
            gradient that conflicts with the retaining one is removed before they are added (:func:`deconflict`).
            (Without it a pair is simply summed.)

    Returns:
        The loss of every step, from step 0 (a resumed run includes the losses before the interruption).

    Raises:
        TrainingDivergedError: a non-finite loss or parameter, or a ratio above ``max_ratio``; only checkpoints
            that passed these checks are ever written.
        ConfigError: the checkpoint is another run's, or past ``steps``.
        CheckpointError: the checkpoint is damaged, or cannot be written.
        BusyError: another process trains into ``checkpoint_dir``.
    """
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    state = processes.current()
    part = processes.Part(int(state.process_index), int(state.num_processes))
    split = takes_part(loss_fn)
    tensors = list(params.values())
    device_type = tensors[0].device.type
    if mixed_precision == "fp16" and device_type != "cuda":
        raise ConfigError("mixed_precision='fp16' needs CUDA; use 'bf16' (or 'no') on this device")
    run = json.loads(json.dumps(run or {}))  # as it reads back from JSON (tuples become lists)
    opt = torch.optim.Adam(tensors, lr=lr)
    scaler = torch.amp.GradScaler(device_type, enabled=mixed_precision == "fp16")
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if resume and path is None:
        raise ConfigError("resume=True needs a checkpoint_dir")
    with contextlib.ExitStack() as stack:
        if saliency:  # from the initial tensors, before a checkpoint is loaded: a resumed run gets the same mask
            masks = saliency_masks(params, loss_fn, saliency, saliency_batches, seed, part if split else None)
            stack.callback(lambda handles: [h.remove() for h in handles],
                           [params[n].register_hook(lambda g, m=m: g * m) for n, m in masks.items()])
        if path is not None and state.is_main_process:  # one run's processes share the folder; other runs may not
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(exclusive_lock(path.parent / LOCK, f"the checkpoint folder {path.parent}"))
            except OSError as err:
                raise CheckpointError(f"cannot use the checkpoint folder {path.parent}: {err}") from err
        start, losses = 0, []
        if resume and path.exists():
            start, losses = load_checkpoint(path, params, opt, scaler, run, desc)
            if start > steps:
                raise ConfigError(f"{desc}: the checkpoint {path} is at step {start}, past the {steps} steps asked "
                                  f"for; ask for at least {start} steps (iterations), use another checkpoint_dir, "
                                  "or train without resume")
            problem = _diverged(params, ratios, max_ratio)
            if problem:
                raise CheckpointError(f"the training checkpoint {path} holds a diverged run ({problem}); delete it, "
                                      "or train without resume")
            logger.info("%s: resuming from step %d of %d (%s)", desc, start, steps, path)
        saved = start or None  # the step of the last checkpoint that passed the checks
        autocast = torch.autocast(device_type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16,
                                  enabled=mixed_precision != "no")
        bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, mininterval=1,
                   disable=not progress or not state.is_main_process)
        for step in bar:
            gen = step_generator(seed, step)
            with autocast:
                if split:
                    loss = loss_fn(step, gen, part)
                else:  # every process computes the whole batch: the sum of the shares is the batch's loss
                    loss = loss_fn(step, gen)
                    loss = loss if part.count == 1 else tuple(x / part.count for x in loss) if isinstance(
                        loss, tuple) else loss / part.count
            opt.zero_grad(set_to_none=True)
            if gradient_surgery:  # the forgetting gradient's part that conflicts with the retaining one removed
                loss = _surgery(loss, tensors, scaler, state, part)
            else:
                loss = total(loss)
            if part.count > 1 and not gradient_surgery:  # the batch's loss, and its gradient: the shares summed
                scaler.scale(loss).backward()
                grads = [t.grad for t in tensors if t.grad is not None]
                summed = loss.detach().float().reshape(1).clone()
                processes.all_sum(state, [summed, *grads])
                loss = summed[0]
            if not torch.isfinite(loss.detach()).all():
                raise _divergence(desc, step, steps, f"the loss is {loss.item()}", lr, mixed_precision, saved, path)
            if part.count == 1 and not gradient_surgery:
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            problem = _diverged(params, ratios, max_ratio)  # after every update, the last one too
            if problem:
                raise _divergence(desc, step, steps, problem, lr, mixed_precision, saved, path)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            done = step + 1
            if path is not None and (done == steps or (checkpoint_every and done % checkpoint_every == 0)):
                if state.is_main_process:
                    save_checkpoint(path, params, opt, scaler, done, losses, run, desc)
                saved = done
    if losses:
        logger.info("%s: %d steps, loss %.4g -> %.4g", desc, len(losses), losses[0], losses[-1])
    return losses


def saliency_masks(params: dict[str, torch.Tensor], loss_fn: Callable[..., torch.Tensor], fraction: float,
                   batches: int, seed: int, part: processes.Part | None = None) -> dict[str, torch.Tensor]:
    """SalUn's weight-saliency masks (Fan et al., ICLR 2024, Eq. 6: ``m_S = 1(|∇_θ L_f(θ)|_{θ=θ₀} ≥ γ)``).

    The gradient of the forgetting loss ``loss_fn`` at the current (initial) tensors is summed over ``batches``
    batches, drawn from generators of their own (``step_generator(seed, -1 - b)``: never a training step's), and
    its magnitude thresholded once over all tensors so that ``fraction`` of their elements are kept (the authors'
    global threshold; their default keeps half). With ``part``, each process computes its rows and the gradients are
    summed over the processes first. Returns ``{name: 0/1 float mask}`` shaped like each tensor.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"saliency must be in (0, 1), the fraction of weights that train; got {fraction}")
    if batches < 1:
        raise ConfigError(f"saliency_batches must be ≥ 1, got {batches}")
    names = [n for n, t in params.items() if t.requires_grad]
    grads = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    for b in range(batches):  # in full precision: a few batches, once
        gen = step_generator(seed, -1 - b)
        loss = loss_fn(0, gen, part) if part is not None else loss_fn(0, gen)
        loss = loss[0] if isinstance(loss, tuple) else loss  # a (forgetting, retaining) pair: the forgetting loss
        found = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, found):
            if g is not None:
                grads[n] += g.detach().float()
    if part is not None and part.count > 1:
        processes.all_sum(processes.current(), list(grads.values()))
    flat = torch.cat([g.abs().flatten() for g in grads.values()])
    keep = max(1, int(round(fraction * flat.numel())))
    threshold = torch.topk(flat, keep, sorted=True).values[-1]
    masks, kept = {}, 0
    for n, g in grads.items():  # ties at a zero threshold: only weights the loss moves at all
        mask = (g.abs() >= threshold if threshold > 0 else g.abs() > 0).to(params[n].dtype)
        masks[n] = mask
        kept += int(mask.sum())
    logger.info("saliency: %d of %d weights train (%.1f %%), threshold |grad| >= %.3g", kept, flat.numel(),
                100 * kept / flat.numel(), threshold.item())
    return masks


def total(loss) -> torch.Tensor:
    """A loss function's loss: the scalar, or the sum of a (forgetting, retaining) pair."""
    return sum(loss) if isinstance(loss, tuple) else loss


def deconflict(forget: list[torch.Tensor], retain: list[torch.Tensor]) -> list[torch.Tensor]:
    """The concept-preserving gradient (DoCo, Wu et al., AAAI 2025, §3.3; the projection of PCGrad, Yu et al.,
    NeurIPS 2020, Eq. 1): when the forgetting gradient ``g_f`` and the retaining gradient ``g_r`` conflict
    (``g_f · g_r < 0``, over all tensors at once), ``g_f`` loses its component along ``g_r``,
    ``g_f − (g_f · g_r / ‖g_r‖²) g_r``, so that a step no longer undoes what the retaining loss holds; then
    ``g_f + g_r``."""
    dot = sum((f.double() * r.double()).sum() for f, r in zip(forget, retain))
    norm = sum((r.double() ** 2).sum() for r in retain)
    if dot < 0 and norm > 0:
        scale = (dot / norm).to(forget[0].dtype)
        forget = [f - scale * r for f, r in zip(forget, retain)]
    return [f + r for f, r in zip(forget, retain)]


def _surgery(losses, tensors: list[torch.Tensor], scaler, state, part) -> torch.Tensor:
    """Set the tensors' gradients to :func:`deconflict` of the (forgetting, retaining) pair's gradients, summed over
    the processes first; the pair's total loss."""
    if not isinstance(losses, tuple) or len(losses) != 2:
        raise ConfigError("gradient_surgery needs a retaining loss to protect, and this training has none (for ESD "
                          "and ANT: set preserve_weight > 0)")
    forget, retain = losses
    tensors = [t for t in tensors if t.requires_grad]  # not the tensors a loss updates itself (extra_params)
    grads = []
    for i, loss in enumerate((forget, retain)):
        found = torch.autograd.grad(scaler.scale(loss), tensors, retain_graph=i == 0, allow_unused=True)
        grads.append([torch.zeros_like(t) if g is None else g for t, g in zip(tensors, found)])
    summed = (forget + retain).detach().float().reshape(1).clone()
    if part.count > 1:
        processes.all_sum(state, [summed, *grads[0], *grads[1]])
    for t, g in zip(tensors, deconflict(*grads)):
        t.grad = g
    return summed[0]


# ------------------------------------------------------------------------------------------ shared fields
#: The fields every trained method's config ends with, ``name: (type, default, documentation)``; added by
#: :func:`training_options`.
TRAINING_FIELDS: dict[str, tuple] = {
    "seed": (int, 0, "seed of the initialisation and of every step's noise."),
    "mixed_precision": (Literal["no", "bf16", "fp16"], "no",
                        '"no", "bf16" or "fp16" (CUDA) autocast for the forward passes.'),
    "checkpoint_dir": (str, "", 'folder for resumable training checkpoints ("" = none).'),
    "checkpoint_every": (int, 0, "steps between checkpoints (0 = only at the end)."),
    "resume": (bool, False, "continue from the checkpoint in checkpoint_dir, if there is one."),
    "progress": (bool, True, "show a progress bar."),
    "saliency": (float, 0.0, "SalUn weight saliency: train only this fraction of the weights, those with the largest "
                 "forgetting-loss gradient at the start (the authors keep 0.5); the rest stay exactly zero and the "
                 "adapter stores only what changed. 0 = train all; needs full deltas (rank=0)."),
    "saliency_batches": (int, 8, "batches whose forgetting-loss gradients are summed for the saliency mask."),
    "gradient_surgery": (bool, False, "DoCo's concept-preserving gradient: remove the part of the forgetting "
                         "gradient that conflicts with the retaining loss's (needs one: preserve_weight > 0)."),
}


#: The fields of the trained methods that train on rollouts of the frozen model (ESD, All-but-One), after their own.
ROLLOUT_FIELDS: dict[str, tuple] = {
    "start_guidance": (float, 3.0, "classifier-free guidance of the frozen model's rollout that produces x_t."),
    "num_inference_steps": (int, 20, "DDIM steps of that rollout; it stops at a uniformly drawn step."),
    "iterations": (int, 150, "optimisation steps."),
    "lr": (float, 1e-3, "Adam learning rate (constant)."),
    "rank": (int, 4, "rank of each delta; 0 trains full-rank deltas."),
    "batch_size": (int, 4, "x_t samples per step."),
    "resolution": (int, 0, "image side in pixels (0 = the model's own, sample_size × VAE factor)."),
    "gradient_checkpointing": (bool, False, "recompute UNet activations in the backward pass to save memory."),
}

#: Class decorators, under ``@dataclass``: the shared training / rollout fields, after the config's own fields.
training_options = shared_fields(TRAINING_FIELDS)
rollout_options = shared_fields(ROLLOUT_FIELDS)


#: config fields a checkpoint may differ in and still be resumed: the step count (a resumed run may ask for more)
#: and where and how the run checkpoints and reports
NOT_RUN = ("iterations", "epochs", "resume", "checkpoint_dir", "checkpoint_every", "progress")


def run_settings(config) -> dict:
    """What a checkpoint of ``config``'s run must match to be resumed (``fit``'s ``run``)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_RUN}


def check_prompts(config, name: str) -> None:
    """ConfigError unless the field ``name`` of ``config`` is a tuple of non-empty prompts (empty is fine)."""
    value = getattr(config, name)
    if isinstance(value, str) or not all(isinstance(p, str) and p.strip() for p in value):
        raise ConfigError(f"{name} must be a tuple of non-empty prompts, got {value!r}")


def check_distinct(concepts, owner: str) -> None:
    """A concept named twice (``("circle", "circle")``) is an error, not a double weight."""
    seen = set()
    for c in concepts:
        if c.strip() in seen:
            raise ConfigError(f"{owner}: the concept {c.strip()!r} is given more than once; give each concept once")
        seen.add(c.strip())


def validate_training(config) -> None:
    """Checks shared by every trained method's config (concepts, rank, lr, precision, resume, templates)."""
    if isinstance(config.concepts, str) or not config.concepts or not all(c.strip() for c in config.concepts):
        raise ConfigError("concepts must be a non-empty tuple of non-empty prompts, e.g. ('circle',)")
    check_distinct(config.concepts, type(config).__name__)
    for name in ("rank", "resolution", "checkpoint_every"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be ≥ 0, got {getattr(config, name)}")
    if not config.lr > 0:
        raise ConfigError(f"lr must be > 0, got {config.lr}")
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {config.mixed_precision!r}")
    if config.resume and not config.checkpoint_dir:
        raise ConfigError("resume needs checkpoint_dir")
    if not 0 <= config.saliency < 1:
        raise ConfigError(f"saliency must be in [0, 1), the fraction of weights that train (0 = all); "
                          f"got {config.saliency}")
    if config.saliency and config.rank:
        raise ConfigError(f"saliency masks single weights, so it needs full deltas: set rank=0 (got rank={config.rank})")
    if config.saliency_batches < 1:
        raise ConfigError(f"saliency_batches must be ≥ 1, got {config.saliency_batches}")
    templates = getattr(config, "templates", ())  # RealEra draws its prompts as UCE does: no templates field
    if isinstance(templates, str) or any("{}" not in t for t in templates):
        raise ConfigError(f"templates must be a tuple of prompts that each contain '{{}}', got {templates!r}")


def validate_rollout_training(config) -> None:
    """Checks of the configs trained on UNet rollouts (ESD, ABO, SPM): step counts, :func:`validate_training`."""
    for name in ("iterations", "num_inference_steps", "batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be ≥ 1, got {getattr(config, name)}")
    validate_training(config)


def validate_replace_with(config) -> None:
    """The anchor of a config with ``replace_with`` (All-but-One, AdvUnlearn) must not be a concept it erases."""
    if config.replace_with.strip() in {c.strip() for c in config.concepts}:
        raise ConfigError(f"replace_with {config.replace_with!r} is one of the concepts being erased")


# ------------------------------------------------------------------------------------------------ prompts
def training_templates(config) -> list[str]:
    """The prompt templates ("{}" = the concept) a trained method draws its prompts from: ``config.templates``, or
    the bare concept. (On tinyworld the presets fill ``templates`` with the world's caption templates:
    :func:`erasekit.methods.presets.caption_templates`.)"""
    return list(config.templates) or ["{}"]


class PromptTable:
    """Encoded prompts ``template × name`` for a few name lists (erased concepts, their replacements, ...)."""

    def __init__(self, pipe, templates: list[str], names: list[str], resolution: int = 0):
        self.templates, self.names = templates, names
        prompts = [t.replace("{}", name) for name in names for t in templates]
        self.conds, self.uncond = encode(pipe, prompts, resolution)

    def batch(self, name: int, rows: list[int]) -> Cond:
        """Conds of ``names[name]`` in the templates ``rows`` (one per sample)."""
        return Cond.cat([self.conds[name * len(self.templates) + j] for j in rows])


# ------------------------------------------------------------------------------------- conditioning
@dataclass
class Cond:
    """What the denoiser is conditioned on besides (x_t, t), for a batch of prompts.

    ``padding`` > 0 (SD3 without T5): the last row of ``hidden`` stands for that many identical zero rows, which
    :func:`predict` expands exactly (:func:`erasekit.core.mmdit.collapsed_padding`): a third of the cost."""

    hidden: torch.Tensor  # encoder_hidden_states (B, 77, D)
    added: dict | None = None  # SDXL: text_embeds (B, P), time_ids (B, 6); SD3: pooled_projections (B, P)
    padding: int = 0

    def repeat(self, n: int) -> Cond:
        rep = lambda t: t.repeat_interleave(n, 0)  # noqa: E731
        return Cond(rep(self.hidden), None if self.added is None else {k: rep(v) for k, v in self.added.items()},
                    self.padding)

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        added = None if conds[0].added is None else {k: torch.cat([c.added[k] for c in conds]) for k in conds[0].added}
        return Cond(torch.cat([c.hidden for c in conds]), added, conds[0].padding)

    @staticmethod
    def mean(conds: list[Cond]) -> Cond:
        """The element-wise mean of equally shaped conds (one cond returned as it is)."""
        if len(conds) == 1:
            return conds[0]
        mean = lambda ts: torch.stack(ts).mean(0)  # noqa: E731
        added = None if conds[0].added is None else {k: mean([c.added[k] for c in conds]) for k in conds[0].added}
        return Cond(mean([c.hidden for c in conds]), added, conds[0].padding)

    def __getitem__(self, rows) -> Cond:
        return Cond(self.hidden[rows], None if self.added is None else {k: v[rows] for k, v in self.added.items()},
                    self.padding)

    def kwargs(self) -> dict:
        if self.added is not None and "pooled_projections" in self.added:
            return {"encoder_hidden_states": self.hidden, **self.added}
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": self.added}


def image_size(pipe, resolution: int = 0) -> int:
    return resolution or int(sd.denoiser(pipe).config.sample_size) * int(pipe.vae_scale_factor)


@torch.no_grad()
def encode(pipe, prompts: list[str], resolution: int = 0) -> tuple[list[Cond], Cond]:
    """One ``Cond`` per prompt, and the unconditional ``Cond`` the pipeline itself uses for CFG, in the UNet's dtype
    (:func:`erasekit.core.sd.encode`, :func:`erasekit.core.sd.uncond`; SDXL: pooled embeddings and the pipeline's
    ``_get_add_time_ids`` for the image size; SD3: pooled projections, and without T5 one zero row for its 256)."""
    dtype = sd.denoiser(pipe).dtype
    cond, uncond = sd.encode(pipe, list(prompts)), sd.uncond(pipe)
    if sd.is_mmdit(pipe):
        rows, padding = cond.embeds.shape[1], 0
        if getattr(pipe, "text_encoder_3", None) is None:  # the T5 rows are zeros: one row stands for all
            rows, padding = rows - sd.SD3_T5_ROWS + 1, sd.SD3_T5_ROWS
        make = lambda h, p: Cond(h[None, :rows].to(dtype), {"pooled_projections": p[None].to(dtype)}, padding)  # noqa: E731
        return [make(h, p) for h, p in zip(cond.embeds, cond.pooled)], make(uncond.embeds[0], uncond.pooled[0])
    if not sd.is_sdxl(pipe):
        return [Cond(h[None].to(dtype)) for h in cond.embeds], Cond(uncond.embeds[:1].to(dtype))
    size = (image_size(pipe, resolution),) * 2
    projection = (int(cond.pooled.shape[-1]) if pipe.text_encoder_2 is None
                  else pipe.text_encoder_2.config.projection_dim)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection)
    time_ids = time_ids.to(sd.denoiser(pipe).device)
    added = lambda pooled: {"text_embeds": pooled[None].to(dtype), "time_ids": time_ids}  # noqa: E731
    return ([Cond(h[None].to(dtype), added(p)) for h, p in zip(cond.embeds, cond.pooled)],
            Cond(uncond.embeds[:1].to(dtype), added(uncond.pooled[0])))


def predict(unet, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """The denoiser's output (ε, or SD3's velocity) for a batch; ``unet`` is the UNet or the MMDiT transformer."""
    if not is_mmdit(unet):
        return unet(x, t, **cond.kwargs(), return_dict=False)[0]
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    if not cond.padding:
        return unet(hidden_states=x, timestep=t, **cond.kwargs(), return_dict=False)[0]
    with collapsed_padding(unet, cond.padding):
        return unet(hidden_states=x, timestep=t, **cond.kwargs(), return_dict=False)[0]


def ddim_scheduler(pipe, num_inference_steps: int):
    """A sampler from the pipeline's noise schedule (a copy: the pipeline's scheduler is left alone): DDIM for the
    ε-prediction models, flow-matching Euler for SD3."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    kind = FlowMatchEulerDiscreteScheduler if sd.is_mmdit(pipe) else DDIMScheduler
    scheduler = kind.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=sd.denoiser(pipe).device)
    return scheduler


def _restarted(scheduler):
    """``scheduler`` ready for a rollout from its first step: flow-matching Euler counts its steps (it is reset by
    ``set_timesteps``); DDIM is stateless."""
    if not hasattr(scheduler, "step_index"):
        return scheduler
    scheduler.set_timesteps(len(scheduler.timesteps), device=scheduler.timesteps.device)
    return scheduler


@torch.no_grad()
def guided_steps(eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, x: torch.Tensor,
                 guidance: float, steps: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t after ``steps`` DDIM steps with CFG from the scaled noise ``x``, and t = the next timestep (ESD's partial
    rollout, shared by the UNet and the text-encoder methods). ``eps(x2, t)`` predicts the noise of the doubled
    batch ``x2``: unconditional rows first, then conditional ones. With ``start``, ``x`` is the latent after that
    many steps and the rollout continues from there."""
    scheduler = _restarted(scheduler)
    for t in scheduler.timesteps[start:steps]:
        e_uncond, e_cond = eps(sd.scale_model_input(scheduler, torch.cat([x, x]), t), t).chunk(2)
        x = scheduler.step(e_uncond + guidance * (e_cond - e_uncond), t, x).prev_sample
    return x, scheduler.timesteps[steps]


@torch.no_grad()
def rollout(unet, scheduler, cond: Cond, uncond: Cond, guidance: float, steps: int, shape: tuple,
            generator: torch.Generator, keep: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t after ``steps`` DDIM steps with CFG from pure noise, and t = the next timestep (:func:`guided_steps`).

    The noise of the whole batch ``shape`` is drawn; only its rows ``keep`` (a process's part,
    :meth:`erasekit.core.processes.Part.rows`) are rolled out. ``cond`` holds one row per kept sample; ``uncond``
    one row.
    """
    x = (torch.randn(shape, generator=generator)[keep] * getattr(scheduler, "init_noise_sigma", 1.0)).to(scheduler.timesteps.device,
                                                                                         cond.hidden.dtype)
    both = Cond.cat([uncond.repeat(x.shape[0]), cond])
    return guided_steps(lambda x2, t: predict(unet, x2, t, both), scheduler, x, guidance, steps)


# ------------------------------------------------------------------------------------------------ training
def latent_shape(pipe, batch_size: int, resolution: int = 0) -> tuple[int, ...]:
    """(batch, channels, side, side) of the UNet's latents for ``resolution``-pixel images (0 = the model's own)."""
    factor = int(pipe.vae_scale_factor)
    if resolution % factor:
        raise ConfigError(f"resolution must be a multiple of the VAE factor {factor}, got {resolution}")
    side = image_size(pipe, resolution) // factor
    return (batch_size, int(sd.denoiser(pipe).config.in_channels), side, side)


def denoiser_component(pipe) -> str:
    """The pipeline attribute (and adapter component) of the denoiser: "unet" or "transformer"."""
    return "transformer" if sd.is_mmdit(pipe) else "unet"


def train(pipe, config, names: list[str], loss_for: Callable, method: str,
          extra_params: dict[str, torch.Tensor] | None = None) -> Adapter:
    """Shared body of the trained denoiser methods: :func:`fit_deltas`, then package an Adapter of the denoiser."""
    deltas, info = fit_deltas(pipe, config, names, loss_for, method, extra_params)
    return package(pipe, config, method, deltas, [denoiser_component(pipe)], info)


def fit_deltas(pipe, config, names: list[str], loss_for: Callable, method: str,
               extra_params: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """Trainable deltas on the denoiser's ``names``, :func:`fit` to ``loss_for(deltas)``;
    ``({"<unet|transformer>.<path>": delta}, info)``.
    ``extra_params``: further tensors checkpointed with the run that the loss updates itself (no gradient: Adam leaves
    them alone), e.g. DoCo's discriminator."""
    unet = sd.denoiser(pipe)
    was_training, was_checkpointing = unet.training, getattr(unet, "is_gradient_checkpointing", False)
    started = time.perf_counter()
    with lora.frozen(unet), lora.attach(unet, names, config.rank, torch.Generator().manual_seed(config.seed)) as deltas:
        try:
            unet.eval()  # no dropout: student and teacher see the same network
            if config.gradient_checkpointing:
                unet.enable_gradient_checkpointing()
            losses = fit({**deltas.params, **(extra_params or {})}, loss_for(deltas), steps=config.iterations, lr=config.lr, seed=config.seed,
                         checkpoint_dir=config.checkpoint_dir or None, checkpoint_every=config.checkpoint_every,
                         resume=config.resume, run=run_settings(config), mixed_precision=config.mixed_precision,
                         progress=config.progress, desc=method, ratios=deltas.ratios, saliency=config.saliency,
                         saliency_batches=config.saliency_batches, gradient_surgery=config.gradient_surgery)
        finally:
            if config.gradient_checkpointing and not was_checkpointing:
                unet.disable_gradient_checkpointing()
            unet.train(was_training)
        return deltas.export(denoiser_component(pipe)), training_info({
            "iterations": config.iterations, "seconds": round(time.perf_counter() - started, 2),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None})


def training_info(training: dict) -> dict:
    """A trained adapter's ``info``: the run's summary, the library versions, the time it was made."""
    import diffusers

    return {"training": training, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def package(pipe, config, method: str, deltas: dict, components, info: dict, stats: dict | None = None) -> Adapter:
    """The Adapter of an erasure made on ``pipe``: ``config`` as resolved, the base model's id and the fingerprint
    of the ``components`` the deltas depend on (every method's adapter is assembled here)."""
    from ..adapter import fingerprint

    return Adapter(method=method, concepts=tuple(config.concepts), config=dataclasses.asdict(config), deltas=deltas,
                   base_model=sd.model_id(pipe), fingerprint=dict(fingerprint(pipe, list(components))),
                   stats=dict(stats or {}), info=info)
