"""The training checkpoint of :func:`erasekit.methods.trainer.fit`: one ``checkpoint.safetensors`` holding the
trainable tensors and the optimizer's tensors, with the step, the losses, the run's settings and the optimizer's
scalars as JSON in its metadata. Written as adapters are (unique temporary file, fsync, atomic rename); nothing is
unpickled when it is read."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapter import write_safetensors
from ..errors import AdapterFileError, CheckpointError, ConfigError

CHECKPOINT = "checkpoint.safetensors"
LOCK = "checkpoint.lock"  # held (flock) by the run that writes the folder's checkpoints
META = "erasekit.train"  # the metadata key of the record


def save_checkpoint(path: Path, params: dict, opt: torch.optim.Optimizer, scaler, step: int, losses: list, run: dict,
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
        write_safetensors(tensors, {META: json.dumps(record)}, path)  # a kill leaves the previous checkpoint
    except (AdapterFileError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        raise CheckpointError(f"cannot write the training checkpoint {path}: {err.__cause__ or err}") from err


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """The record and tensors of a checkpoint file; ``CheckpointError`` naming it if it is damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            record = json.loads(f.metadata()[META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not isinstance(record, dict) or not isinstance(record.get("run"), dict):
            raise ValueError("its record is not a training checkpoint's")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise damaged(path, err) from err
    return record, tensors


def damaged(path: Path, err: Exception) -> CheckpointError:
    """The error of a damaged checkpoint file."""
    return CheckpointError(f"the training checkpoint {path} is damaged or not a checkpoint ({err}); delete it "
                           "to start afresh, or train without resume")


def load_checkpoint(path: Path, params: dict, opt: torch.optim.Optimizer, scaler, run: dict,
                    method: str) -> tuple[int, list]:
    """Load the checkpoint ``path`` of the run ``run`` of ``method`` into ``params``, ``opt`` and ``scaler``:
    (its step, the losses so far). ``ConfigError`` if it is another run's, ``CheckpointError`` if damaged."""
    record, tensors = read_checkpoint(path)
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
        raise damaged(path, err) from err
    if not 0 <= step == len(losses):
        raise damaged(path, ValueError(f"step {step} with {len(losses)} losses"))
    return step, losses


__all__ = ["CHECKPOINT", "LOCK", "META", "damaged", "load_checkpoint", "read_checkpoint", "save_checkpoint"]
