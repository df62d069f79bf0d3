"""The one training loop shared by every trained erasure method (ESD, All-but-One, ...).

A method hands ``fit`` its trainable tensors and a ``loss_fn(step, generator) -> loss``; ``fit`` runs Adam
with a constant learning rate (as the ESD code does), and takes care of the rest:

* **seeding**: every step draws its randomness from ``step_generator(seed, step)``, so a run resumed from a
  checkpoint follows the same trajectory as an uninterrupted one;
* **checkpoints**: every ``checkpoint_every`` steps one ``checkpoint.safetensors`` in ``checkpoint_dir``
  (trainable tensors and optimizer tensors; step, losses and optimizer scalars as JSON in the metadata),
  written as adapters are (unique temporary file, fsync, atomic rename); ``resume=True`` continues from it,
  refusing a checkpoint of another run, one past the requested steps, or a damaged one. Nothing is unpickled.
  The folder is locked (``checkpoint.lock``) while a run uses it, so two runs never write it at once;
* **divergence**: after every update, the last one included, the parameters must be finite and each
  module's ``‖ΔW‖/‖W‖`` at most ``MAX_RATIO``; a NaN/inf loss or a failed check raises
  ``TrainingDivergedError`` naming the step, the tensor and its value. Only checked states are
  checkpointed, so the last checkpoint is the last good one;
* **mixed precision** (``"bf16"``, or ``"fp16"`` with a gradient scaler on CUDA) via ``torch.autocast``;
* **several GPUs**: launched with ``accelerate launch``, each process draws its own samples (the process
  index enters the step generator) and gradients are averaged across processes, i.e. data parallel with a
  global batch of ``num_processes ×`` the method's batch. One process on a CPU needs no accelerate config.
  (``accelerate.PartialState`` is used rather than ``Accelerator`` because the latter fixes the mixed
  precision once per Python process, and one process may run several erasures.)
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapter import write_safetensors
from ..errors import AdapterFileError, CheckpointError, ConfigError, TrainingDivergedError
from ..core.files import exclusive_lock

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
LOCK = "checkpoint.lock"  # held (flock) by the run that writes the folder's checkpoints
#: ‖ΔW‖/‖W‖ above which training has diverged: normal erasure moves a weight by a small fraction of itself.
MAX_RATIO = 10.0
_META = "erasekit.train"


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """The CPU generator of one step (draw on CPU, then move: the same numbers on every device)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + process * 7_919 + step) % 2**63)


def processes():
    """``accelerate``'s process state (1 process, the default device, when not launched distributed)."""
    from accelerate import PartialState

    return PartialState()


def _save(path: Path, params: dict, opt: torch.optim.Optimizer, scaler, step: int, losses: list, run: dict,
          method: str) -> None:
    """Write the checkpoint as adapters are written: a uniquely named temporary file, fsync, atomic rename."""
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
    record = {"step": step, "losses": losses, "method": method, "run": run, "param_groups": groups,
              "optim_scalars": scalars, "scaler": scaler.state_dict() if scaler.is_enabled() else {}}
    from safetensors import SafetensorError

    try:
        write_safetensors(tensors, {_META: json.dumps(record)}, path)  # a kill leaves the previous checkpoint
    except (AdapterFileError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        raise CheckpointError(f"cannot write the training checkpoint {path}: {err.__cause__ or err}") from err


def _read(path: Path) -> tuple[dict, dict]:
    """The record and tensors of a checkpoint file; ``CheckpointError`` naming it if it is damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            record = json.loads(f.metadata()[_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not isinstance(record, dict) or not isinstance(record.get("run"), dict):
            raise ValueError("its record is not a training checkpoint's")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise _damaged(path, err) from err
    return record, tensors


def _damaged(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"the training checkpoint {path} is damaged or not a checkpoint ({err}); delete it "
                           "to start afresh, or train without resume")


def _load(path: Path, params: dict, opt: torch.optim.Optimizer, scaler, run: dict, method: str) -> tuple[int, list]:
    record, tensors = _read(path)
    written = {"method": record.get("method", method), **record["run"]}
    wanted = {"method": method, **run}
    if written != wanted:
        diff = sorted(k for k in set(wanted) | set(written) if wanted.get(k) != written.get(k))
        shown = ", ".join(f"{k}: {written.get(k)!r} there, {wanted.get(k)!r} now" for k in diff)
        raise ConfigError(f"the checkpoint {path} was written by a different run ({shown}); use the same settings, "
                          "another checkpoint_dir, or train without resume")
    stored = {k[len("param."):]: tuple(v.shape) for k, v in tensors.items() if k.startswith("param.")}
    if stored != {k: tuple(v.shape) for k, v in params.items()}:
        raise ConfigError(f"the checkpoint {path} holds other trainable tensors than this run (another model, "
                          "module selection or rank); use another checkpoint_dir, or train without resume")
    try:
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
        step, losses = int(record["step"]), [float(x) for x in record["losses"]]
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as err:
        raise _damaged(path, err) from err
    if not 0 <= step == len(losses):
        raise _damaged(path, ValueError(f"step {step} with {len(losses)} losses"))
    return step, losses


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


def fit(params: dict[str, torch.Tensor], loss_fn: Callable[[int, torch.Generator], torch.Tensor], *, steps: int,
        lr: float, seed: int = 0, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
        resume: bool = False, run: dict | None = None, mixed_precision: str = "no", progress: bool = True,
        desc: str = "train", ratios: Callable[[], dict[str, float]] | None = None,
        max_ratio: float = MAX_RATIO) -> list[float]:
    """Minimise ``loss_fn`` over ``params`` (leaf tensors with ``requires_grad``) for ``steps`` Adam steps.

    Args:
        params: name -> trainable tensor; names key the checkpoint.
        loss_fn: ``(step, generator) -> scalar loss``; all randomness of the step must come from ``generator``.
        steps, lr, seed: total steps (a resumed run continues up to it), Adam learning rate, master seed.
        checkpoint_dir, checkpoint_every: where and how often (in steps; 0 = never) to checkpoint; the last
            step is always checkpointed when a folder is given. The folder is locked for the run.
        resume: continue from ``checkpoint_dir`` if it holds a checkpoint (else start afresh).
        run: JSON-able settings that must match to resume (a method's config without its step count).
        mixed_precision: "no", "bf16" or "fp16" (fp16 uses a gradient scaler; CUDA only).
        progress, desc: tqdm bar on/off and its label (the method's name: a checkpoint resumes only under it).
        ratios: ``() -> {module: ‖ΔW‖/‖W‖}`` (``lora.Deltas.ratios``); checked after every update, with the
            parameters' finiteness: above ``max_ratio``, training has diverged.

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
    state = processes()
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
        if path is not None and state.is_main_process:  # one run's processes share the folder; other runs may not
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(exclusive_lock(path.parent / LOCK, f"the checkpoint folder {path.parent}"))
            except OSError as err:
                raise CheckpointError(f"cannot use the checkpoint folder {path.parent}: {err}") from err
        start, losses = 0, []
        if resume and path.exists():
            start, losses = _load(path, params, opt, scaler, run, desc)
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
            with autocast:
                loss = loss_fn(step, step_generator(seed, step, state.process_index))
            if not torch.isfinite(loss.detach()).all():
                raise _divergence(desc, step, steps, f"the loss is {loss.item()}", lr, mixed_precision, saved, path)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if state.num_processes > 1:
                from accelerate.utils import reduce

                for t in tensors:
                    t.grad = reduce(t.grad if t.grad is not None else torch.zeros_like(t), reduction="mean")
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
                    _save(path, params, opt, scaler, done, losses, run, desc)
                saved = done
    if losses:
        logger.info("%s: %d steps, loss %.4g -> %.4g", desc, len(losses), losses[0], losses[-1])
    return losses
