"""Generation-time overhead of composed adapters (issue 3): 1, 4 and 16 adapters, static and gated, and fused.

What is timed is one denoising step — the UNet forward on a classifier-free-guidance batch [uncond, cond] — as
the denoising loop runs it (the same ``encoder_hidden_states`` tensor at every step, so gates are computed once
per prompt batch, as in generation). Two models:

* ``sd15``: a UNet and text encoder with Stable Diffusion 1.5's exact shapes (random weights; timing does not
  depend on them), latent 64×64 (512 px), fp32 on the CPU;
* ``tinyworld``: the packaged model, latent 8×8, batch 2.

Adapters are made in code with the shapes the methods emit: static = UCE-shaped (rank 1 on every ``attn2.to_k`` /
``attn2.to_v``), gated = SPM-shaped (rank 1 on every Linear/Conv2d of the transformer blocks, prompt-similarity
gate). Overhead = median step time / the plain pipeline's − 1. Targets: ≤ 5 % with 4 gated adapters on sd15,
≤ 1 % fused.

    python benchmarks/compose_overhead.py                 # → benchmarks/compose_overhead.json
    python benchmarks/compose_overhead.py --models tinyworld --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_suffix(".json")
TARGETS = {"gated_4_sd15_max": 0.05, "fused_max": 0.01}


def sd15_pipe():
    from diffusers import StableDiffusionPipeline

    from erasekit.testing import sd15_text_encoder, sd15_unet, tiny_components

    parts = tiny_components("sd1")
    parts["unet"], parts["text_encoder"] = sd15_unet(), sd15_text_encoder(parts["tokenizer"])
    return StableDiffusionPipeline(**parts)


def make_adapter(pipe, kind: str, seed: int):
    from erasekit.adapter import Adapter, ModuleDelta, fingerprint
    from erasekit.methods.spm import gating_record, SpmConfig

    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in pipe.unet.named_modules():
        static_target = name.endswith(("attn2.to_k", "attn2.to_v"))
        gated_target = ".transformer_blocks." in name or name.endswith(("proj_in", "proj_out"))
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if (kind == "static" and static_target) or (kind == "gated" and gated_target and "attentions" in name):
            w = module.weight
            down = torch.randn((1,) + tuple(w.shape[1:]), generator=gen) * 1e-3
            up = torch.randn((w.shape[0], 1) + (1,) * (w.dim() - 2), generator=gen) * 1e-3
            deltas[f"unet.{name}"] = ModuleDelta(down=down, up=up)
    concept = f"concept {seed}"
    gating = gating_record(SpmConfig(concepts=(concept,))) if kind == "gated" else {"rule": "static"}
    return Adapter(method="spm" if kind == "gated" else "uce", concepts=(concept,), config={}, deltas=deltas,
                   fingerprint=fingerprint(pipe, ("unet",)), gating=gating)


def step_times(pipe, hidden, latent, repeats: int) -> list[float]:
    t = torch.tensor([500])
    times = []
    with torch.no_grad():
        pipe.unet(latent, t, encoder_hidden_states=hidden)  # warm-up (and gates, once)
        for _ in range(repeats):
            started = time.perf_counter()
            pipe.unet(latent, t, encoder_hidden_states=hidden)
            times.append(time.perf_counter() - started)
    return times


def run(model: str, repeats: int) -> dict:
    import erasekit
    from erasekit import compose

    pipe = sd15_pipe() if model == "sd15" else erasekit.load_pipeline()
    size = 64 if model == "sd15" else pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, size, size, generator=gen)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a photo of concept 1", "cpu", 1, True)
    hidden = torch.cat([uncond, cond])
    adapters = {kind: [make_adapter(pipe, kind, seed) for seed in range(16)] for kind in ("static", "gated")}
    rows = {}
    plain = statistics.median(step_times(pipe, hidden, latent, repeats))
    rows["plain"] = {"step_s": round(plain, 4)}
    print(f"{model}: plain step {plain:.4f} s", flush=True)
    for kind in ("static", "gated"):
        for n in (1, 4, 16):
            names = [compose.load(pipe, a, name=f"{kind}{i}") for i, a in enumerate(adapters[kind][:n])]
            s = statistics.median(step_times(pipe, hidden, latent, repeats))
            rows[f"{kind}_{n}"] = {"step_s": round(s, 4), "overhead": round(s / plain - 1, 4),
                                   "modules_per_adapter": len(adapters[kind][0].deltas)}
            print(f"{model}: {kind} ×{n}: {s:.4f} s ({100 * (s / plain - 1):+.1f} %)", flush=True)
            if kind == "static" and n == 4:
                compose.fuse(pipe)
                f = statistics.median(step_times(pipe, hidden, latent, repeats))
                rows["fused_4"] = {"step_s": round(f, 4), "overhead": round(f / plain - 1, 4)}
                print(f"{model}: fused ×4: {f:.4f} s ({100 * (f / plain - 1):+.1f} %)", flush=True)
                compose.unfuse(pipe)
            compose.unload(pipe, names)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tinyworld", "sd15"], choices=["tinyworld", "sd15"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    from erasekit.bench_utils import run_record

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data.update(targets=TARGETS, timed="median UNet step on a CFG batch of 2, fp32, CPU", run=run_record())
    for model in args.models:
        data[model] = run(model, args.repeats if model == "sd15" else max(args.repeats, 20))
        out.write_text(json.dumps(data, indent=2) + "\n")
    if "sd15" in data:
        data["meets"] = {"gated_4_sd15": data["sd15"]["gated_4"]["overhead"] <= TARGETS["gated_4_sd15_max"],
                         "fused_sd15": data["sd15"]["fused_4"]["overhead"] <= TARGETS["fused_max"]}
        out.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
