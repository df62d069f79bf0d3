"""Peak memory and time of one ESD-x training step on a UNet with SD 1.5's (SDXL's) full shapes, or on SD3-medium's
transformer (random weights).

Two variants, each measured in a fresh subprocess (peak RSS = ``ru_maxrss`` of that process):

* ``ours``: one UNet, trainable low-rank deltas on the esd-x modules attached with forward hooks
  (``erasekit.core.lora``); the frozen teacher is the same UNet with the hooks disabled.
* ``two_unet``: the original ESD code's setup: a frozen ``deepcopy`` of the UNet as teacher, and the UNet
  itself trained in place on the esd-x parameters (full tensors, Adam state on them).

One step = the teacher's ε(x_t, ∅) and ε(x_t, c) (no grad, batch 2), the student's ε(x_t, c), the ESD loss,
backward and one Adam step; batch 1 at the model's native resolution (SD 1.5: 64×64 latents, context 77×768).
The partial DDIM rollout that produces x_t is left out: it runs without gradients on the teacher and costs both
variants the same. On CUDA each variant runs 3 steps and the last is timed (``--steps``: the first pays for kernel
selection and the allocator's growth); the peak covers all of them. Peak memory: the process's peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.
On CPU the children run with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): by default
glibc raises that threshold as large blocks are freed and then keeps later freed tensors in its heap, so the
peak RSS would measure the allocator's history rather than the tensors alive at the peak (what CUDA's counter
measures); with the threshold fixed, every large tensor is returned to the system when freed. Both variants are
measured the same way.

    erasekit bench perf                                    # → benchmarks/train_memory.json (and the others)
    python -m erasekit.bench.perf.train_memory --gradient-checkpointing [--model sdxl --device cuda --dtype float16]
    python -m erasekit.bench.perf.train_memory --model sd3 --resolution 512 --gradient-checkpointing --variants ours \
        --out benchmarks/train_memory-sd3.json

SD3 (``--model sd3``): the esd-x modules of an MMDiT transformer are every Linear of the joint blocks' attention
(``erasekit.methods.esd.select(pipe, "esd-x")``, 384 modules); the context is what erasekit's trainer feeds it without
T5: the 77 CLIP rows and one zero row standing exactly for the 256 zero T5 rows
(:func:`erasekit.core.mmdit.collapsed_padding`, in force for the whole step, backward and recomputation included);
``--resolution`` sets the image size (default: native, 1024 px for SD3, whose step takes many minutes and more memory
than a 24 GB machine has without checkpointing; the committed run is at 512 px).
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


#: SD3 without T5 in erasekit's trainer: 77 CLIP rows + one zero row standing for the 256 T5 rows
SD3_CONTEXT_ROWS, SD3_PADDING = 78, 256


def build(model: str, dtype, device: str, resolution: int = 0, net=None):
    """The denoiser (``net``: one built by the caller, e.g. a tiny one in tests), its esd-x module names, batch-1
    inputs (x, t, cond, extra keyword arguments) and ``call(module, x, t, cond, extra) → prediction``."""
    from erasekit.core import lora
    from erasekit.methods.esd import MMDIT_PRESETS, PRESETS
    from erasekit.testing import sd3_inputs, sd3_medium_transformer, sd15_unet, sdxl_unet, unet_inputs

    if model == "sd3":
        net = (net if net is not None else sd3_medium_transformer(dtype)).to(device).eval()
        names = lora.select(net, MMDIT_PRESETS["esd-x"])  # = erasekit.methods.esd.select(pipe, "esd-x")
        size = resolution // 8 if resolution else None
        inputs = sd3_inputs(net, 1, device, dtype, size=size, context_rows=SD3_CONTEXT_ROWS)
        extra = {"pooled_projections": inputs["pooled_projections"]}

        def call(module, x, t, cond, extra):
            return module(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False, **extra)[0]

        return net, names, (inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"], extra), call
    net = (net if net is not None else (sd15_unet if model == "sd15" else sdxl_unet)(dtype)).to(device).eval()
    names = lora.select(net, PRESETS["esd-x"])
    inputs = unet_inputs(net, 1, device, dtype)
    extra = {"added_cond_kwargs": inputs["added_cond_kwargs"]} if "added_cond_kwargs" in inputs else {}

    def call(module, x, t, cond, extra):
        return module(x, t, cond, **extra).sample

    return net, names, (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], extra), call


def _doubled(extra: dict) -> dict:
    """Extra keyword arguments of a batch-1 call, for the same call on a batch of 2."""
    import torch

    return {k: _doubled(v) if isinstance(v, dict) else torch.cat([v, v]) for k, v in extra.items()}


def child(variant: str, rank: int, checkpointing: bool, model: str = "sd15", device: str = "cpu",
          dtype_name: str = "auto", resolution: int = 0, net=None, steps: int = 1) -> dict:
    """One variant's setup and ``steps`` training steps (the last one's time is reported: on CUDA the first pays
    for kernel selection and the allocator's growth; the peak memory covers them all, Adam's state included)."""
    import contextlib
    import copy

    import torch
    import torch.nn.functional as F

    from erasekit.core import lora
    from erasekit.core.device import resolve_dtype, synchronize
    from erasekit.core.mmdit import collapsed_padding
    from erasekit.core.provenance import reset_peak_rss

    torch.manual_seed(0)
    dtype = resolve_dtype(dtype_name, torch.device(device))
    reset_peak_rss()  # Linux keeps the parent's ru_maxrss across exec
    baseline = _peak_gb(device)
    unet, names, (x, t, cond, extra), call = build(model, dtype, device, resolution, net)
    extra2 = _doubled(extra)
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
        teacher_context = contextlib.nullcontext
    if checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.Adam(params, lr=1e-5)
    after_setup = _peak_gb(device)
    # SD3: the trainer's collapsed context, for the whole step (gradient checkpointing recomputes blocks in backward)
    collapsed = [collapsed_padding(m, SD3_PADDING) for m in {id(unet): unet, id(teacher): teacher}.values()] \
        if model == "sd3" else []
    seconds = []
    for _ in range(steps):
        synchronize()
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for c in collapsed:
                stack.enter_context(c)
            with teacher_context(), torch.no_grad():
                e_null, e_cond = call(teacher, torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]),
                                      extra2).chunk(2)
            target = e_null - 2.0 * (e_cond - e_null)
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                loss = F.mse_loss(call(unet, x, t, cond, extra).float(), target.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        synchronize()
        seconds.append(time.perf_counter() - started)
    return {"variant": variant, "model": model, "device": device, "dtype": str(dtype)[6:],
            "peak_rss_gb": round(_peak_gb(device), 3), "rss_after_setup_gb": round(after_setup, 3),
            "rss_before_model_gb": round(baseline, 3), "step_seconds": round(seconds[-1], 3 if steps > 1 else 2),
            "steps": steps, **({"first_step_seconds": round(seconds[0], 3)} if steps > 1 else {}),
            "trainable_parameters": sum(p.numel() for p in params), "adapted_modules": len(names),
            "unet_parameters": sum(p.numel() for p in unet.parameters()), "threads": torch.get_num_threads(),
            "latent": list(x.shape[1:]), "context": list(cond.shape[1:]),
            **({"context_stands_for_rows": SD3_CONTEXT_ROWS - 1 + SD3_PADDING} if model == "sd3" else {}),
            "loss": float(loss.detach())}


def main(argv=None, out: str | Path = "benchmarks/train_memory.json") -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=4, help="rank of our low-rank deltas")
    p.add_argument("--gradient-checkpointing", action="store_true", help="in both variants")
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "sd3"])
    p.add_argument("--resolution", type=int, default=0, help="sd3: image size in px (default: native, 1024)")
    p.add_argument("--variants", nargs="+", default=["ours", "two_unet"], choices=["ours", "two_unet"],
                   help="two_unet holds two copies of the denoiser (SD3-medium: 2 × 8.1 GB in fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--steps", type=int, default=0,
                   help="training steps per variant, the last one timed (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--child", choices=["ours", "two_unet"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(out))
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error(f"--steps must be >= 0 (0: the device's default), got {args.steps}")
    args.steps = args.steps or (3 if args.device.startswith("cuda") else 1)
    if args.child:
        print(json.dumps(child(args.child, args.rank, args.gradient_checkpointing, args.model, args.device,
                               args.dtype, args.resolution, steps=args.steps)))
        return 0
    from erasekit.core.provenance import run_record

    results = {}
    load_before = [round(x, 2) for x in os.getloadavg()]
    for variant in args.variants:
        cmd = [sys.executable, "-m", "erasekit.bench.perf.train_memory", "--child", variant, "--rank", str(args.rank),
               "--model", args.model, "--device", args.device, "--dtype", args.dtype,
               "--resolution", str(args.resolution), "--steps", str(args.steps)]
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # see the module docstring
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]))
    first = next(iter(results.values()))
    denoiser = "SD3-medium transformer" if args.model == "sd3" else f"{args.model} UNet"
    size = f"{args.resolution} px" if args.resolution else "native resolution"
    record = {
        "benchmark": f"one ESD-x training step, {denoiser} shapes (random weights), {args.device} "
                     f"{first['dtype']}, batch 1 at {size}; peak memory of a fresh process "
                     "per variant (glibc mmap threshold fixed at 128 KiB on CPU)",
        "rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing, "results": results,
        "run": run_record(), "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    if len(results) == 2:
        ratio = results["ours"]["peak_rss_gb"] / results["two_unet"]["peak_rss_gb"]
        record.update(peak_ratio_ours_over_two_unet=round(ratio, 3), target_ratio=0.6, meets_target=ratio <= 0.6)
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    key = "gradient_checkpointing" if args.gradient_checkpointing else "default"
    if args.model != "sd15" or args.device != "cpu":
        key = f"{args.model}-{args.device}-{key}"
    if args.resolution:
        key = f"{key}-{args.resolution}px"
    existing = existing if isinstance(existing, dict) and "runs" in existing else {"runs": {}}
    existing["runs"][key] = record
    out.write_text(json.dumps(existing, indent=2) + "\n")
    if "peak_ratio_ours_over_two_unet" in record:
        print(f"ours / two-UNet peak RSS = {record['peak_ratio_ours_over_two_unet']:.3f} (target ≤ 0.6) → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
