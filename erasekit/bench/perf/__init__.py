"""``erasekit bench perf``: speed and memory on real models' shapes (random weights: timing does not depend on them).

Five benchmarks (``erasekit bench perf --only NAME…`` runs some; each module also runs alone:
``python -m erasekit.bench.perf.<module> --help``):

* :mod:`.closed_form` — UCE erase time with 1 concept, and with 100 concepts + 500 preserve prompts;
* :mod:`.train_memory` — one ESD-x training step: time and peak memory, erasekit (one UNet + low-rank deltas)
  against the original code's setup (two UNets);
* :mod:`.compose_overhead` — UNet step time with 0 / 1 / 4 / 16 composed adapters (static, gated, fused), and
  the time per image it implies;
* :mod:`.peers` — side by side with peers' code paths, timed alternately in one run: ``peft_compare`` (4 rank-4
  cross-attention adapters through diffusers' PEFT backend against erasekit's composer, static, gated and fused)
  and ``uce_reference`` (UCE's solve against a transcription of the authors' per-layer loop).

On the CPU they run on SD 1.5's shapes in fp32; with ``--device cuda`` on SD 1.5's and SDXL's in fp16. Outputs go to
``OUT_DIR/<benchmark>.json`` (``<benchmark>-<device>.json`` for a GPU run), each labelled with date, machine,
versions and commit.

SD3-medium's shapes (issue #25) are run module by module: ``closed_form --model sd3``, ``compose_overhead --models
sd3``, ``train_memory --model sd3`` (→ ``benchmarks/*-sd3.json``); and :mod:`.flux_shapes` checks UCE's edit on
FLUX.1-dev's text-reading modules built alone (the whole FLUX.1-dev does not fit a 24 GB machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


PERF_BENCHMARKS = ("closed_form_perf", "train_memory", "compose_overhead", "peft_compare", "uce_reference")


def run_perf(out_dir: str | Path = "benchmarks", device: str = "cpu", quick: bool = False,
             only: Sequence[str] | None = None) -> dict[str, Path]:
    """Run the benchmarks (``only``: those of :data:`PERF_BENCHMARKS` named); returns {benchmark: output file}.
    ``quick`` = fewer repeats, tinyworld only for the composition overhead, no gradient-checkpointing variant."""
    from ...core.device import resolve_device
    from ...errors import ConfigError
    from . import closed_form, compose_overhead, peers, train_memory

    unknown = sorted(set(only or ()) - set(PERF_BENCHMARKS))
    if unknown:
        raise ConfigError(f"unknown perf benchmark(s) {', '.join(unknown)}; choose from {', '.join(PERF_BENCHMARKS)}")
    chosen = [name for name in PERF_BENCHMARKS if not only or name in only]
    device = str(resolve_device(device))  # ConfigError when CUDA is asked for and absent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if device == "cpu" else f"-{device.replace(':', '')}"
    paths = {name: out_dir / f"{name}{suffix}.json" for name in chosen}
    repeats = ["--repeats", "1" if quick else "3"]
    models = ["sd15", "sdxl"] if device.startswith("cuda") else ["sd15"]
    for model in models:
        if "closed_form_perf" in paths:
            closed_form.main([*repeats, "--model", model, "--device", device, "--zero-init"] + (
                [] if model == "sd15" else ["--out", str(out_dir / f"closed_form_perf-{model}{suffix}.json")]),
                out=paths["closed_form_perf"])
        for extra in ([[]] if quick or "train_memory" not in paths else [[], ["--gradient-checkpointing"]]):
            if "train_memory" in paths and train_memory.main(["--model", model, "--device", device, *extra],
                                                             out=paths["train_memory"]):
                raise RuntimeError(f"train_memory failed for {model} {extra}")
    rounds = 4 if device.startswith("cuda") else 1  # a GPU step takes milliseconds: more rounds, same wall time
    if "compose_overhead" in paths:
        compose_models = ["tinyworld"] if quick else (["sd15", "sdxl"] if device.startswith("cuda")
                                                      else ["tinyworld", "sd15"])
        compose_overhead.main(["--models", *compose_models, "--device", device,
                               "--repeats", str((3 if quick else 5) * rounds)], out=paths["compose_overhead"])
    for name in ("peft_compare", "uce_reference"):
        if name in paths:
            peers.run(name, "sd15", (3 if quick else 5 if name == "peft_compare" else 3) * rounds, out_dir, device)
    return paths


__all__ = ["PERF_BENCHMARKS", "run_perf"]
