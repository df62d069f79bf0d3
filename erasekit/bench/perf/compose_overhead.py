"""Generation-time overhead of composed adapters: 0, 1, 4 and 16 adapters, static and gated, and fused.

What is timed is one denoising step — the UNet forward on a classifier-free-guidance batch [uncond, cond] — as
the denoising loop runs it (the same ``encoder_hidden_states`` tensor at every step, so gates are computed once
per prompt batch, as in generation). Time per image = ``steps`` × that step (the text encoder and VAE run once per
image and do not depend on the adapters). Models:

* ``tinyworld``: the packaged model, latent 8×8;
* ``sd15`` / ``sdxl``: a UNet and text encoder(s) with Stable Diffusion 1.5's / SDXL base's exact shapes (random
  weights; timing does not depend on them) at their native resolution (512 / 1024 px).

Adapters are made in code with the shapes the methods emit: static = UCE-shaped (rank 1 on every ``attn2.to_k`` /
``attn2.to_v``), gated = SPM-shaped (rank 1 on every Linear/Conv2d of the transformer blocks, prompt-similarity
gate). Overhead = median step time / the plain model's − 1, the plain model timed alternately with each
configuration (inside ``compose.disabled``: hooks skip, bit-identical base) so that drift cancels. Targets: ≤ 5 % with 4 gated adapters on sd15,
≤ 1 % fused.

    erasekit bench perf                                   # → benchmarks/compose_overhead.json (this and the rest)
    python -m erasekit.bench.perf.compose_overhead --models tinyworld --repeats 20 --out o.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from erasekit.core import sd

TARGETS = {"gated_4_sd15_max": 0.05, "fused_max": 0.01}
STEPS = {"tinyworld": 10, "sd15": 50, "sdxl": 50}  # denoising steps of one image (the models' usual settings)


def load_model(model: str, device: str, dtype: torch.dtype):
    import erasekit
    from erasekit.testing import real_shape_pipeline

    if model == "tinyworld":
        return erasekit.load_pipeline(device=device, dtype=dtype)
    return real_shape_pipeline(model, dtype).to(device)


def make_adapter(pipe, kind: str, seed: int, targets: tuple[str, ...] | None = None, rank: int = 1,
                 scale: float = 1e-3):
    """A random ``kind`` ("static" or "gated") adapter of the methods' shapes, or, with ``targets``, of rank
    ``rank`` on the UNet modules whose path ends with one of ``targets``; factors ~ N(0, scale²)."""
    from erasekit.adapter import Adapter, ModuleDelta, fingerprint
    from erasekit.methods.spm import SpmConfig, gating_record

    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in pipe.unet.named_modules():
        static_target = name.endswith(("attn2.to_k", "attn2.to_v"))
        gated_target = ".transformer_blocks." in name or name.endswith(("proj_in", "proj_out"))
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if targets is not None:
            chosen = name.endswith(targets)
        else:
            chosen = (kind == "static" and static_target) or (kind == "gated" and gated_target and "attentions" in name)
        if chosen:
            w = module.weight
            down = torch.randn((rank,) + tuple(w.shape[1:]), generator=gen) * scale
            up = torch.randn((w.shape[0], rank) + (1,) * (w.dim() - 2), generator=gen) * scale
            deltas[f"unet.{name}"] = ModuleDelta(down=down, up=up)
    concept = f"concept {seed}"
    gating = gating_record(SpmConfig(concepts=(concept,)).resolved(pipe)) if kind == "gated" else {"rule": "static"}
    return Adapter(method="spm" if kind == "gated" else "uce", concepts=(concept,), config={}, deltas=deltas,
                   fingerprint=fingerprint(pipe, ("unet",)), gating=gating)


def step_times(pipe, inputs: dict, repeats: int, warmup: bool = True) -> list[float]:
    cuda = pipe.unet.device.type == "cuda"
    times = []
    with torch.no_grad():
        if warmup:
            pipe.unet(**inputs)  # warm-up (and gates, once)
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            pipe.unet(**inputs)
            if cuda:
                torch.cuda.synchronize()
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
        counts: tuple[int, ...] = (1, 4, 16)) -> dict:
    from erasekit import compose
    from erasekit.testing import unet_inputs

    pipe = load_model(model, device, dtype)
    inputs = unet_inputs(pipe.unet, 2, pipe.unet.device, pipe.unet.dtype)
    with torch.no_grad():  # the real CFG context of a prompt, so that gates see what generation gives them
        cond = sd.encode(pipe, ["a photo of concept 1", ""]).embeds.to(pipe.unet.dtype)
    inputs["encoder_hidden_states"] = cond.flip(0)
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
            if kind == "static" and n == 4:
                compose.fuse(pipe)
                rows["fused_4"] = _row(*paired_times(pipe, inputs, repeats), steps)
                print(f"{model}: fused ×4: {rows['fused_4']}", flush=True)
                compose.unfuse(pipe)
            compose.unload(pipe, names)
    return {"steps_per_image": steps, **rows}


def main(argv=None, out: str | Path = "benchmarks/compose_overhead.json") -> dict:
    from erasekit.core.device import resolve_dtype
    from erasekit.core.provenance import run_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, choices=["tinyworld", "sd15", "sdxl"],
                        help="default: tinyworld sd15 on CPU, sd15 sdxl on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto: float16 on CUDA, float32 on CPU")
    parser.add_argument("--out", default=str(out))
    args = parser.parse_args(argv)
    dtype = resolve_dtype(args.dtype, torch.device(args.device))
    models = args.models or (["sd15", "sdxl"] if args.device.startswith("cuda") else ["tinyworld", "sd15"])
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(targets=TARGETS, timed=f"median UNet step on a CFG batch of 2, {str(dtype)[6:]}, {args.device}; "
                                       "plain model timed alternately with each configuration",
                run=run_record())
    for model in models:
        data[model] = run(model, args.repeats if model != "tinyworld" else max(args.repeats, 20), args.device, dtype)
        path.write_text(json.dumps(data, indent=2) + "\n")
    if "sd15" in data:
        data["meets"] = {"gated_4_sd15": data["sd15"]["gated_4"]["overhead"] <= TARGETS["gated_4_sd15_max"],
                         "fused_sd15": data["sd15"]["fused_4"]["overhead"] <= TARGETS["fused_max"]}
        path.write_text(json.dumps(data, indent=2) + "\n")
    return data


if __name__ == "__main__":
    main()
