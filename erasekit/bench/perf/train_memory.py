"""Peak memory and time of one ESD-x training step on a UNet with SD 1.5's (or SDXL's) full shapes (random weights).

Two variants, each measured in a fresh subprocess (peak RSS = ``ru_maxrss`` of that process):

* ``ours``: one UNet, trainable low-rank deltas on the esd-x modules attached with forward hooks
  (``erasekit.core.lora``); the frozen teacher is the same UNet with the hooks disabled.
* ``two_unet``: the original ESD code's setup: a frozen ``deepcopy`` of the UNet as teacher, and the UNet
  itself trained in place on the esd-x parameters (full tensors, Adam state on them).

One step = the teacher's ε(x_t, ∅) and ε(x_t, c) (no grad, batch 2), the student's ε(x_t, c), the ESD loss,
backward and one Adam step; batch 1 at the model's native resolution (SD 1.5: 64×64 latents, context 77×768).
The partial DDIM rollout that produces x_t is left out: it runs without gradients on the teacher and costs both
variants the same. Peak memory: the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
On CPU the children run with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): by default
glibc raises that threshold as large blocks are freed and then keeps later freed tensors in its heap, so the
peak RSS would measure the allocator's history rather than the tensors alive at the peak (what CUDA's counter
measures); with the threshold fixed, every large tensor is returned to the system when freed. Both variants are
measured the same way.

    erasekit bench perf                                    # → benchmarks/train_memory.json (and the others)
    python -m erasekit.bench.perf.train_memory --gradient-checkpointing [--model sdxl --device cuda --dtype float16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

def _peak_gb(device: str = "cpu") -> float:
    """Peak memory since the child started measuring: CUDA allocations, or the process's peak RSS."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    from erasekit.core.provenance import peak_rss_mb

    return peak_rss_mb() / 1024


def child(variant: str, rank: int, checkpointing: bool, model: str = "sd15", device: str = "cpu",
          dtype_name: str = "auto") -> dict:
    import copy

    import torch
    import torch.nn.functional as F

    from erasekit.core import lora
    from erasekit.core.device import resolve_dtype
    from erasekit.core.provenance import reset_peak_rss
    from erasekit.methods.esd import PRESETS
    from erasekit.testing import sd15_unet, sdxl_unet, unet_inputs

    torch.manual_seed(0)
    dtype = resolve_dtype(dtype_name, torch.device(device))
    reset_peak_rss()  # Linux keeps the parent's ru_maxrss across exec
    baseline = _peak_gb(device)
    unet = (sd15_unet if model == "sd15" else sdxl_unet)(dtype).to(device).eval()
    names = lora.select(unet, PRESETS["esd-x"])
    inputs = unet_inputs(unet, 1, device, dtype)
    x, t, cond = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
    extra = {"added_cond_kwargs": inputs["added_cond_kwargs"]} if "added_cond_kwargs" in inputs else {}
    extra2 = ({"added_cond_kwargs": {k: torch.cat([v, v]) for k, v in extra["added_cond_kwargs"].items()}}
              if extra else {})
    uncond = torch.randn_like(cond)
    unet.requires_grad_(False)
    if variant == "ours":
        deltas = lora.Deltas(unet, names, rank).attach()
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
    after_setup = _peak_gb(device)
    started = time.perf_counter()
    with teacher_context(), torch.no_grad():
        e_null, e_cond = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]),
                                 **extra2).sample.chunk(2)
    target = e_null - 2.0 * (e_cond - e_null)
    with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
        loss = F.mse_loss(unet(x, t, cond, **extra).sample.float(), target.float())
    loss.backward()
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"variant": variant, "model": model, "device": device, "dtype": str(dtype)[6:],
            "peak_rss_gb": round(_peak_gb(device), 3), "rss_after_setup_gb": round(after_setup, 3),
            "rss_before_model_gb": round(baseline, 3), "step_seconds": round(seconds, 2),
            "trainable_parameters": sum(p.numel() for p in params), "adapted_modules": len(names),
            "unet_parameters": sum(p.numel() for p in unet.parameters()), "threads": torch.get_num_threads(),
            "loss": float(loss)}


def main(argv=None, out: str | Path = "benchmarks/train_memory.json") -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=4, help="rank of our low-rank deltas")
    p.add_argument("--gradient-checkpointing", action="store_true", help="in both variants")
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--child", choices=["ours", "two_unet"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(out))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rank, args.gradient_checkpointing, args.model, args.device,
                               args.dtype)))
        return 0
    from erasekit.core.provenance import run_record

    results = {}
    for variant in ("ours", "two_unet"):
        cmd = [sys.executable, "-m", "erasekit.bench.perf.train_memory", "--child", variant, "--rank", str(args.rank),
               "--model", args.model, "--device", args.device, "--dtype", args.dtype]
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # see the module docstring
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]))
    ratio = results["ours"]["peak_rss_gb"] / results["two_unet"]["peak_rss_gb"]
    record = {
        "benchmark": f"one ESD-x training step, {args.model} UNet shapes (random weights), {args.device} "
                     f"{results['ours']['dtype']}, batch 1 at native resolution; peak memory of a fresh process "
                     "per variant (glibc mmap threshold fixed at 128 KiB on CPU)",
        "rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing, "results": results,
        "peak_ratio_ours_over_two_unet": round(ratio, 3), "target_ratio": 0.6, "meets_target": ratio <= 0.6,
        "run": run_record(),
    }
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    key = "gradient_checkpointing" if args.gradient_checkpointing else "default"
    if args.model != "sd15" or args.device != "cpu":
        key = f"{args.model}-{args.device}-{key}"
    existing = existing if isinstance(existing, dict) and "runs" in existing else {"runs": {}}
    existing["runs"][key] = record
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"ours / two-UNet peak RSS = {ratio:.3f} (target ≤ 0.6) → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
