"""The one training loop shared by every trained erasure method (ESD, All-but-One, ...).

A method hands ``fit`` its trainable tensors and a ``loss_fn(step, generator) -> loss``; ``fit`` runs Adam
with a constant learning rate (as the ESD code does), and takes care of the rest:

* **seeding**: every step draws its randomness from ``step_generator(seed, step)``, so a run resumed from a
  checkpoint follows the same trajectory as an uninterrupted one;
* **checkpoints**: every ``checkpoint_every`` steps one ``checkpoint.safetensors`` in ``checkpoint_dir``
  (trainable tensors and optimizer tensors; step, losses and optimizer scalars as JSON in the metadata),
  written atomically; ``resume=True`` continues from it. Nothing is unpickled;
* **divergence**: a NaN/inf loss raises ``TrainingDivergedError`` naming the step; the last good checkpoint
  is left as it was;
* **mixed precision** (``"bf16"``, or ``"fp16"`` with a gradient scaler on CUDA) via ``torch.autocast``;
* **several GPUs**: launched with ``accelerate launch``, each process draws its own samples (the process
  index enters the step generator) and gradients are averaged across processes, i.e. data parallel with a
  global batch of ``num_processes ×`` the method's batch. One process on a CPU needs no accelerate config.
  (``accelerate.PartialState`` is used rather than ``Accelerator`` because the latter fixes the mixed
  precision once per Python process, and one process may run several erasures.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import ConfigError, ErasekitError

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
_META = "erasekit.train"


class TrainingDivergedError(ErasekitError, FloatingPointError):
    """The training loss became NaN or infinite."""


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """The CPU generator of one step (draw on CPU, then move: the same numbers on every device)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + process * 7_919 + step) % 2**63)


def processes():
    """``accelerate``'s process state (1 process, the default device, when not launched distributed)."""
    from accelerate import PartialState

    return PartialState()


def _save(path: Path, params: dict, opt: torch.optim.Optimizer, scaler, step: int, losses: list, run: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"param.{k}": v.detach().contiguous().cpu() for k, v in params.items()}
    opt_state = opt.state_dict()
    scalars = {}
    for i, entry in opt_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{i}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{i}.{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    record = {"step": step, "losses": losses, "run": run, "param_groups": groups, "optim_scalars": scalars,
              "scaler": scaler.state_dict() if scaler.is_enabled() else {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META: json.dumps(record)})
    tmp.replace(path)  # atomic: a kill leaves the previous checkpoint intact


def _load(path: Path, params: dict, opt: torch.optim.Optimizer, scaler, run: dict) -> tuple[int, list]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        record = json.loads(f.metadata()[_META])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if record["run"] != run:
        diff = sorted(k for k in set(run) | set(record["run"]) if run.get(k) != record["run"].get(k))
        raise ConfigError(f"the checkpoint {path} was written by a different run (differs in: {', '.join(diff)}); "
                          "use the same settings, another checkpoint_dir, or resume=False")
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(tensors[f"param.{k}"])
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    for key, value in record["optim_scalars"].items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    groups = [dict(g, params=list(range(len(params)))) for g in record["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
    if record["scaler"]:
        scaler.load_state_dict(record["scaler"])
    return record["step"], record["losses"]


def fit(params: dict[str, torch.Tensor], loss_fn: Callable[[int, torch.Generator], torch.Tensor], *, steps: int,
        lr: float, seed: int = 0, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
        resume: bool = False, run: dict | None = None, mixed_precision: str = "no", progress: bool = True,
        desc: str = "train") -> list[float]:
    """Minimise ``loss_fn`` over ``params`` (leaf tensors with ``requires_grad``) for ``steps`` Adam steps.

    Args:
        params: name -> trainable tensor; names key the checkpoint.
        loss_fn: ``(step, generator) -> scalar loss``; all randomness of the step must come from ``generator``.
        steps, lr, seed: total steps (a resumed run continues up to it), Adam learning rate, master seed.
        checkpoint_dir, checkpoint_every: where and how often (in steps; 0 = never) to checkpoint; the last
            step is always checkpointed when a folder is given.
        resume: continue from ``checkpoint_dir`` if it holds a checkpoint (else start afresh).
        run: JSON-able settings that must match to resume (a method's config without its step count).
        mixed_precision: "no", "bf16" or "fp16" (fp16 uses a gradient scaler; CUDA only).
        progress, desc: tqdm bar on/off and its label.

    Returns:
        The loss of every step, from step 0 (a resumed run includes the losses before the interruption).
    """
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    state = processes()
    names, tensors = list(params), list(params.values())
    device_type = tensors[0].device.type
    if mixed_precision == "fp16" and device_type != "cuda":
        raise ConfigError("mixed_precision='fp16' needs CUDA; use 'bf16' (or 'no') on this device")
    run = json.loads(json.dumps(run or {}))  # as it reads back from JSON (tuples become lists)
    opt = torch.optim.Adam(tensors, lr=lr)
    scaler = torch.amp.GradScaler(device_type, enabled=mixed_precision == "fp16")
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    start, losses = 0, []
    if resume and path is None:
        raise ConfigError("resume=True needs a checkpoint_dir")
    if resume and path.exists():
        start, losses = _load(path, dict(zip(names, tensors)), opt, scaler, run)
        logger.info("%s: resuming from step %d of %d (%s)", desc, start, steps, path)
    saved = start if resume and path is not None and path.exists() else None
    autocast = torch.autocast(device_type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16,
                              enabled=mixed_precision != "no")
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, mininterval=1,
               disable=not progress or not state.is_main_process)
    for step in bar:
        with autocast:
            loss = loss_fn(step, step_generator(seed, step, state.process_index))
        if not torch.isfinite(loss.detach()).all():
            kept = f"the last good checkpoint (step {saved}) is kept in {path}" if saved else "no checkpoint was written"
            raise TrainingDivergedError(f"{desc}: the loss is {loss.item()} at step {step}; {kept}. "
                                        "Lower the learning rate or use mixed_precision='no'.")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if state.num_processes > 1:
            from accelerate.utils import reduce

            for t in tensors:
                t.grad = reduce(t.grad if t.grad is not None else torch.zeros_like(t), reduction="mean")
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
        done = step + 1
        if path is not None and (done == steps or (checkpoint_every and done % checkpoint_every == 0)):
            if state.is_main_process:
                _save(path, dict(zip(names, tensors)), opt, scaler, done, losses, run)
            saved = done
    if losses:
        logger.info("%s: %d steps, loss %.4g -> %.4g", desc, len(losses), losses[0], losses[-1])
    return losses
