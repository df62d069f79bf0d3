"""The record stamped on every benchmark / evaluation output: date, machine, versions, git commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess


def run_record() -> dict:
    import torch

    from . import __version__

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.system()}, {device}",
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": version("diffusers"),
        "transformers": version("transformers"), "erasekit": __version__, "git_commit": commit,
    }


def dtype_of(name: str, device: str):
    """A torch dtype from "auto" (float16 on CUDA, float32 elsewhere), "float32", "float16" or "bfloat16"."""
    import torch

    from .errors import ConfigError

    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if name not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, got {name!r}")
    return getattr(torch, name)
