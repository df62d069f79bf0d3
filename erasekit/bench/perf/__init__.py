"""``erasekit bench perf``: speed and memory on real models' shapes (random weights: timing does not depend on them).

Three benchmarks, one module each (each also runs alone: ``python -m erasekit.bench.perf.<name> --help``):

* :mod:`.closed_form` — UCE erase time with 1 concept, and with 100 concepts + 500 preserve prompts;
* :mod:`.train_memory` — one ESD-x training step: time and peak memory, erasekit (one UNet + low-rank deltas)
  against the original code's setup (two UNets);
* :mod:`.compose_overhead` — UNet step time with 0 / 1 / 4 / 16 composed adapters (static, gated, fused), and
  the time per image it implies.

On the CPU they run on SD 1.5's shapes in fp32; with ``--device cuda`` on SD 1.5's and SDXL's in fp16. Outputs go to
``OUT_DIR/<benchmark>.json`` (``<benchmark>-<device>.json`` for a GPU run), each labelled with date, machine,
versions and commit.
"""

from __future__ import annotations

from pathlib import Path


def run_perf(out_dir: str | Path = "benchmarks", device: str = "cpu", quick: bool = False) -> dict[str, Path]:
    """Run the three benchmarks; returns {benchmark: output file}. ``quick`` = fewer repeats, tinyworld only for
    the composition overhead, no gradient-checkpointing variant."""
    from ...core.device import resolve_device
    from . import closed_form, compose_overhead, train_memory

    device = str(resolve_device(device))  # ConfigError when CUDA is asked for and absent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if device == "cpu" else f"-{device.replace(':', '')}"
    paths = {name: out_dir / f"{name}{suffix}.json" for name in ("closed_form_perf", "train_memory",
                                                                   "compose_overhead")}
    repeats = ["--repeats", "1" if quick else "3"]
    models = ["sd15", "sdxl"] if device.startswith("cuda") else ["sd15"]
    for model in models:
        closed_form.main([*repeats, "--model", model, "--device", device, "--zero-init"] + (
            [] if model == "sd15" else ["--out", str(out_dir / f"closed_form_perf-{model}{suffix}.json")]),
            out=paths["closed_form_perf"])
        for extra in ([[]] if quick else [[], ["--gradient-checkpointing"]]):
            code = train_memory.main(["--model", model, "--device", device, *extra], out=paths["train_memory"])
            if code:
                raise RuntimeError(f"train_memory failed for {model} {extra}")
    compose_models = ["tinyworld"] if quick else (["sd15", "sdxl"] if device.startswith("cuda")
                                                  else ["tinyworld", "sd15"])
    compose_overhead.main(["--models", *compose_models, "--device", device, "--repeats", "3" if quick else "5"],
                          out=paths["compose_overhead"])
    return paths


__all__ = ["run_perf"]
