"""Peak memory and time of one ESD-x training step on a UNet with SD 1.5's full shapes (random weights).

Two variants, each measured in a fresh subprocess (peak RSS = ``ru_maxrss`` of that process):

* ``ours``: one UNet, trainable low-rank deltas on the esd-x modules attached with forward hooks
  (``erasekit._lora``); the frozen teacher is the same UNet with the hooks disabled.
* ``two_unet``: the original ESD code's setup: a frozen ``deepcopy`` of the UNet as teacher, and the UNet
  itself trained in place on the esd-x parameters (full tensors, Adam state on them).

One step = the teacher's ε(x_t, ∅) and ε(x_t, c) (no grad, batch 2), the student's ε(x_t, c), the ESD loss,
backward and one Adam step; CPU, fp32, batch 1, 64×64 latents, text context 77×768. The partial DDIM
rollout that produces x_t is left out: it runs without gradients on the teacher and costs both variants the same.

    python benchmarks/train_memory.py                      # both variants → benchmarks/train_memory.json
    python benchmarks/train_memory.py --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).with_name("train_memory.json")


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(variant: str, rank: int, checkpointing: bool) -> dict:
    import copy

    import torch
    import torch.nn.functional as F

    from erasekit import _lora
    from erasekit.methods.esd import PRESETS
    from erasekit.testing import sd15_unet

    torch.manual_seed(0)
    baseline = _peak_gb()
    unet = sd15_unet().eval()
    names = _lora.select(unet, PRESETS["esd-x"])
    x = torch.randn(1, 4, 64, 64)
    t = torch.tensor(500)
    cond, uncond = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    unet.requires_grad_(False)
    if variant == "ours":
        deltas = _lora.Deltas(unet, names, rank).attach()
        params = list(deltas.params.values())
        teacher, teacher_context = unet, deltas.disabled
    else:
        teacher = copy.deepcopy(unet)
        modules = dict(unet.named_modules())
        params = [p for n in names for p in modules[n].parameters()]
        for p in params:
            p.requires_grad_(True)
        import contextlib

        teacher_context = contextlib.nullcontext
    if checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.Adam(params, lr=1e-5)
    after_setup = _peak_gb()
    started = time.perf_counter()
    with teacher_context(), torch.no_grad():
        e_null, e_cond = teacher(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
    target = e_null - 2.0 * (e_cond - e_null)
    loss = F.mse_loss(unet(x, t, cond).sample, target)
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - started
    return {"variant": variant, "peak_rss_gb": round(_peak_gb(), 3), "rss_after_setup_gb": round(after_setup, 3),
            "rss_before_model_gb": round(baseline, 3), "step_seconds": round(seconds, 2),
            "trainable_parameters": sum(p.numel() for p in params), "adapted_modules": len(names),
            "unet_parameters": sum(p.numel() for p in unet.parameters()), "threads": torch.get_num_threads(),
            "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=4, help="rank of our low-rank deltas")
    p.add_argument("--gradient-checkpointing", action="store_true", help="in both variants")
    p.add_argument("--child", choices=["ours", "two_unet"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rank, args.gradient_checkpointing)))
        return 0
    from erasekit.bench_utils import run_record

    results = {}
    for variant in ("ours", "two_unet"):
        cmd = [sys.executable, __file__, "--child", variant, "--rank", str(args.rank)]
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]))
    ratio = results["ours"]["peak_rss_gb"] / results["two_unet"]["peak_rss_gb"]
    record = {
        "benchmark": "one ESD-x training step, SD 1.5 UNet shapes (random weights), CPU fp32, batch 1, 64x64 "
                     "latents, context 77x768; peak RSS of a fresh process per variant",
        "rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing, "results": results,
        "peak_ratio_ours_over_two_unet": round(ratio, 3), "target_ratio": 0.6, "meets_target": ratio <= 0.6,
        "run": run_record(),
    }
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    key = "gradient_checkpointing" if args.gradient_checkpointing else "default"
    existing = existing if isinstance(existing, dict) and "runs" in existing else {"runs": {}}
    existing["runs"][key] = record
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"ours / two-UNet peak RSS = {ratio:.3f} (target ≤ 0.6) → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
