"""What the bench measures besides the audits: peak memory of an erasure and the generation overhead of its
adapters."""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import torch


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Measure peak memory in MB inside the block: ``with peak_memory(dev) as peak: ...; peak["mb"]``.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset at entry). CPU: the process's peak RSS (``VmHWM``, reset at
    entry through ``/proc/self/clear_refs`` where Linux allows it; otherwise the peak since the process began).
    """
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out["mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["kind"] = "cuda_max_allocated"
        return
    from ..core.provenance import peak_rss_mb, reset_peak_rss

    reset = reset_peak_rss()
    yield out
    out["mb"] = round(peak_rss_mb(), 1)
    out["kind"] = "peak_rss" if reset else "peak_rss_since_start"


def generation_overhead(pipe, adapters: Sequence, repeats: int = 3) -> dict:
    """Seconds per image (4-image batch, the model's default steps) without and with the adapters (paths or
    ``Adapter`` objects) loaded."""
    from .. import compose
    from ..generate import generate

    prompts, seeds = ["a solid blue square on a black background"] * 4, [0, 1, 2, 3]

    def best() -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate(pipe, prompts, seeds, output_type="np")
            times.append(time.perf_counter() - t0)
        return min(times) / len(prompts)

    plain = best()
    names = [compose.load(pipe, adapter, name=f"adapter-{i}") for i, adapter in enumerate(adapters)]
    try:
        loaded = best()
    finally:
        compose.unload(pipe, names)
    return {"image_s": round(plain, 4), "image_s_with_adapter": round(loaded, 4),
            "overhead": round(loaded / plain - 1, 4)}


__all__ = ["generation_overhead", "peak_memory"]
