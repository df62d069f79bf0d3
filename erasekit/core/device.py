"""Device and dtype resolution: CUDA when present, CPU otherwise; fp16 on CUDA, fp32 on CPU by default."""

from __future__ import annotations

import torch

from ..errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device for ``device``; "auto": CUDA when present (under a launcher, this process's own GPU,
    ``LOCAL_RANK``), else the CPU."""
    if device is None or str(device) == "auto":
        from .processes import launched, local_cuda_index

        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_cuda_index()) if launched() else torch.device("cuda")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; give auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device (use --device cpu)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def synchronize() -> None:
    """Wait for the queued CUDA work, if any (kernels run asynchronously: a clock read without this times their
    launch, not their run)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded generator per image, so each image is reproducible on its own whatever the batch."""
    return [torch.Generator(device=torch.device(device).type if torch.device(device).type != "mps" else "cpu")
            .manual_seed(int(s)) for s in seeds]
