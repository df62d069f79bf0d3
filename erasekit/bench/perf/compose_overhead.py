"""Generation-time overhead of composed adapters: 0, 1, 4 and 16 adapters, static and gated, and fused.

What is timed is one denoising step — the UNet forward on a classifier-free-guidance batch [uncond, cond] — as
the denoising loop runs it (the same ``encoder_hidden_states`` tensor at every step, so gates are computed once
per prompt batch, as in generation). Time per image = ``steps`` × that step (the text encoder and VAE run once per
image and do not depend on the adapters). Models:

* ``tinyworld``: the packaged model, latent 8×8;
* ``sd15`` / ``sdxl``: a UNet and text encoder(s) with Stable Diffusion 1.5's / SDXL base's exact shapes (random
  weights; timing does not depend on them) at their native resolution (512 / 1024 px);
* ``sd3``: SD3-medium's transformer and CLIP encoders (no T5: the context is 77 CLIP rows and 256 zero rows, as the
  stock pipeline passes it), at ``--sd3-size`` latents (default 32: 256 px; SD3's native 1024 px is 128, a
  step of which takes minutes on a CPU). A lower resolution makes the overhead look larger, not smaller: the adapters'
  per-call costs (hooks, gates) are fixed and their low-rank products scale with the tokens as the base layers do,
  while joint attention grows with the square of the tokens.

Adapters are made in code with the shapes the methods emit: static = UCE-shaped (rank 1 on every ``attn2.to_k`` /
``attn2.to_v``; on SD3 on ``context_embedder`` and the pooled-text embedder, what UCE edits there), gated = SPM-shaped
(rank 1 on every Linear/Conv2d of the transformer blocks, on SD3 of the joint blocks, prompt-similarity gate).
Overhead = median step time / the plain model's − 1, the plain model timed alternately with each configuration
(inside ``compose.disabled``: hooks skip, bit-identical base) so that drift cancels. Targets: ≤ 5 % with 4 gated
adapters on sd15, ≤ 1 % fused; on sd3 ≤ 1 % with 4 static adapters and ≤ 5 % with 4 gated ones (issue #25).

    erasekit bench perf                                   # → benchmarks/compose_overhead.json (this and the rest)
    python -m erasekit.bench.perf.compose_overhead --models tinyworld --repeats 20 --out o.json
    python -m erasekit.bench.perf.compose_overhead --models sd3 --counts 4 --repeats 3 \
        --out benchmarks/compose_overhead-sd3.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from erasekit.core import sd
from erasekit.core.device import synchronize

TARGETS = {"gated_4_sd15_max": 0.05, "fused_max": 0.01, "static_4_sd3_max": 0.01, "gated_4_sd3_max": 0.05}
#: denoising steps of one image (the models' usual settings; SD3's pipeline default is 28)
STEPS = {"tinyworld": 10, "sd15": 50, "sdxl": 50, "sd3": 28}
#: the modules UCE edits on an MMDiT transformer (:mod:`erasekit.methods.uce`, "MMDiT")
MMDIT_STATIC = ("context_embedder", "time_text_embed.text_embedder.linear_1")


def load_model(model: str, device: str, dtype: torch.dtype):
    import erasekit
    from erasekit.testing import real_shape_pipeline

    if model == "tinyworld":
        return erasekit.load_pipeline(device=device, dtype=dtype)
    return real_shape_pipeline(model, dtype).to(device)


def model_inputs(pipe, sd3_size: int | None = None) -> dict:
    """One denoiser call's inputs on a CFG batch [uncond, cond] of a real prompt's context (so that gates see what
    generation gives them): random latents at the model's native size (SD3: ``sd3_size`` latents)."""
    from erasekit.testing import sd3_inputs, unet_inputs

    denoiser = sd.denoiser(pipe)
    with torch.no_grad():
        cond = sd.encode(pipe, ["a photo of concept 1", ""])
    if sd.is_mmdit(pipe):
        inputs = sd3_inputs(denoiser, 2, denoiser.device, denoiser.dtype, size=sd3_size,
                            context_rows=cond.embeds.shape[1])
        inputs["pooled_projections"] = cond.pooled.flip(0).to(denoiser.dtype)
    else:
        inputs = unet_inputs(denoiser, 2, denoiser.device, denoiser.dtype)
    inputs["encoder_hidden_states"] = cond.embeds.flip(0).to(denoiser.dtype)
    return inputs


def make_adapter(pipe, kind: str, seed: int, targets: tuple[str, ...] | None = None, rank: int = 1,
                 scale: float = 1e-3):
    """A random ``kind`` ("static" or "gated") adapter of the methods' shapes, or, with ``targets``, of rank
    ``rank`` on the denoiser modules whose path ends with one of ``targets``; factors ~ N(0, scale²)."""
    from erasekit.adapter import Adapter, ModuleDelta, fingerprint
    from erasekit.methods.spm import SpmConfig, gating_record, transformer_modules

    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    denoiser, mmdit = sd.denoiser(pipe), sd.is_mmdit(pipe)
    component = "transformer" if mmdit else "unet"
    membrane = set(transformer_modules(denoiser)) if mmdit else set()
    for name, module in denoiser.named_modules():
        if mmdit:
            static_target, gated_target = name in MMDIT_STATIC, name in membrane
        else:
            static_target = name.endswith(("attn2.to_k", "attn2.to_v"))
            gated_target = (".transformer_blocks." in name or name.endswith(("proj_in", "proj_out"))) \
                and "attentions" in name
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if targets is not None:
            chosen = name.endswith(targets)
        else:
            chosen = (kind == "static" and static_target) or (kind == "gated" and gated_target)
        if chosen:
            w = module.weight
            down = torch.randn((rank,) + tuple(w.shape[1:]), generator=gen) * scale
            up = torch.randn((w.shape[0], rank) + (1,) * (w.dim() - 2), generator=gen) * scale
            deltas[f"{component}.{name}"] = ModuleDelta(down=down, up=up)
    concept = f"concept {seed}"
    gating = gating_record(SpmConfig(concepts=(concept,)).resolved(pipe)) if kind == "gated" else {"rule": "static"}
    return Adapter(method="spm" if kind == "gated" else "uce", concepts=(concept,), config={}, deltas=deltas,
                   fingerprint=fingerprint(pipe, (component,)), gating=gating)


def step_times(pipe, inputs: dict, repeats: int, warmup: bool = True) -> list[float]:
    denoiser = sd.denoiser(pipe)
    times = []
    with torch.no_grad():
        if warmup:
            denoiser(**inputs)  # warm-up (and gates, once)
        for _ in range(repeats):
            synchronize()
            started = time.perf_counter()
            denoiser(**inputs)
            synchronize()  # CUDA: to the end of the step's kernels
            times.append(time.perf_counter() - started)
    return times


def paired_times(pipe, inputs: dict, repeats: int) -> tuple[list[float], list[float]]:
    """Step times with the loaded erasures and, alternating with them, inside ``compose.disabled`` (the plain
    model): each pair is measured within seconds, so slow drift of the machine cancels out of the ratio."""
    from erasekit import compose

    with_, plain = [], []
    step_times(pipe, inputs, 0)  # warm-up (and gates, once)
    for _ in range(repeats):
        with_ += step_times(pipe, inputs, 1, warmup=False)
        with compose.disabled(pipe):
            plain += step_times(pipe, inputs, 1, warmup=False)
    return with_, plain


def _row(with_: list[float], plain: list[float], steps: int, **extra) -> dict:
    s, p = statistics.median(with_), statistics.median(plain)
    return {"step_s": round(s, 5), "plain_step_s": round(p, 5), "image_s": round(steps * s, 3),
            "overhead": round(s / p - 1, 4), **extra}


def run(model: str, repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
        counts: tuple[int, ...] = (1, 4, 16), sd3_size: int = 32, pipe=None, fused: bool = True) -> dict:
    """Time ``model`` (or ``pipe``, a pipeline of that family: tests pass a tiny one) with 0 and ``counts``
    adapters of each kind, and 4 fused (where 4 is among ``counts`` and ``fused``)."""
    from erasekit import compose

    pipe = pipe if pipe is not None else load_model(model, device, dtype)
    inputs = model_inputs(pipe, sd3_size)
    adapters = {kind: [make_adapter(pipe, kind, seed) for seed in range(max(counts))] for kind in ("static", "gated")}
    steps = STEPS[model]
    rows = {}
    plain = statistics.median(step_times(pipe, inputs, repeats))
    rows["plain"] = {"step_s": round(plain, 5), "image_s": round(steps * plain, 3)}
    print(f"{model}: plain step {plain:.4f} s", flush=True)
    for kind in ("static", "gated"):
        for n in counts:
            names = [compose.load(pipe, a, name=f"{kind}{i}") for i, a in enumerate(adapters[kind][:n])]
            rows[f"{kind}_{n}"] = _row(*paired_times(pipe, inputs, repeats), steps,
                                       modules_per_adapter=len(adapters[kind][0].deltas))
            print(f"{model}: {kind} ×{n}: {rows[f'{kind}_{n}']}", flush=True)
            if kind == "static" and n == 4 and fused:
                compose.fuse(pipe)
                rows["fused_4"] = _row(*paired_times(pipe, inputs, repeats), steps)
                print(f"{model}: fused ×4: {rows['fused_4']}", flush=True)
                compose.unfuse(pipe)
            compose.unload(pipe, names)
    shape = {"latent": list(inputs["hidden_states" if sd.is_mmdit(pipe) else "sample"].shape[1:]),
             "context": list(inputs["encoder_hidden_states"].shape[1:])}
    return {"steps_per_image": steps, "inputs": shape, **rows}


def main(argv=None, out: str | Path = "benchmarks/compose_overhead.json", pipe=None) -> dict:
    """Run the benchmark (``argv``: the command line's arguments); ``pipe``: a pipeline to time instead of building
    the one model ``--models`` names (tests pass a tiny one)."""
    from erasekit.core.device import resolve_dtype
    from erasekit.core.provenance import run_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, choices=["tinyworld", "sd15", "sdxl", "sd3"],
                        help="default: tinyworld sd15 on CPU, sd15 sdxl on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16], help="adapters of each kind loaded")
    parser.add_argument("--no-fused", action="store_true", help="skip the 4 fused adapters' timing")
    parser.add_argument("--sd3-size", type=int, default=32,
                        help="sd3: latent side (32 = 256 px; SD3's native 1024 px is 128)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto: float16 on CUDA, float32 on CPU")
    parser.add_argument("--out", default=str(out))
    args = parser.parse_args(argv)
    dtype = resolve_dtype(args.dtype, torch.device(args.device))
    models = args.models or (["sd15", "sdxl"] if args.device.startswith("cuda") else ["tinyworld", "sd15"])
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(targets=TARGETS, run=run_record(),
                timed=f"median denoiser step (UNet or transformer) on a CFG batch of 2, {str(dtype)[6:]}, "
                      f"{args.device}; plain model timed alternately with each configuration")
    for model in models:
        data["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
        data[model] = run(model, args.repeats if model != "tinyworld" else max(args.repeats, 20), args.device, dtype,
                          tuple(args.counts), args.sd3_size, pipe=pipe, fused=not args.no_fused)
        data[model]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        data[model]["load_average_before"] = data.pop("load_average_before")
        data[model]["torch_threads"] = torch.get_num_threads()
        path.write_text(json.dumps(data, indent=2) + "\n")
    if "sd15" in data and "gated_4" in data["sd15"]:
        data["meets"] = {"gated_4_sd15": data["sd15"]["gated_4"]["overhead"] <= TARGETS["gated_4_sd15_max"],
                         "fused_sd15": data["sd15"]["fused_4"]["overhead"] <= TARGETS["fused_max"]}
        path.write_text(json.dumps(data, indent=2) + "\n")
    if "sd3" in data and "static_4" in data["sd3"]:
        data.setdefault("meets", {}).update(
            static_4_sd3=data["sd3"]["static_4"]["overhead"] <= TARGETS["static_4_sd3_max"],
            gated_4_sd3=data["sd3"]["gated_4"]["overhead"] <= TARGETS["gated_4_sd3_max"])
        path.write_text(json.dumps(data, indent=2) + "\n")
    return data


if __name__ == "__main__":
    main()
