"""Side by side with peers' code paths: each pair is timed in one process, alternately (A B … B A …), medians and
ratios, with the outputs checked to agree. Random weights with SD 1.5's shapes, fp32 on the CPU, fp16 on CUDA (timing
does not depend on the weights); on CUDA every timed call ends with a synchronize.

* :func:`peft_comparison` → ``benchmarks/peft_compare.json``: one UNet step (64×64 latents) with 4 static rank-4
  adapters on the cross-attention ``attn2.to_q/to_k/to_v/to_out.0``, loaded (a) by diffusers' PEFT backend
  (``pipe.load_lora_weights`` of erasekit's own :func:`erasekit.export.to_diffusers` files + ``set_adapters``),
  (b) by erasekit's composer (``compose.load``), (c) fused (``compose.fuse``), and (d) 4 gated membranes (SPM's
  prompt-similarity gate) on the same modules with the same ranks; the plain UNet as the floor. The variants are
  separate module trees sharing the base's tensors (the fused one owns copies of its edited weights), so all are
  loaded at once and one step of each is timed in turn, the order reversed every round.
* :func:`uce_comparison` → ``benchmarks/uce_reference.json``: UCE's solve (:mod:`erasekit.methods.uce`: one d×d
  solve for all layers, low-rank factors) against :func:`reference_uce`, a direct transcription of the authors'
  per-layer loop with an explicit inverse, from the same keys (erasekit's ``collect_keys``, timed once apart): only
  the solve differs. 1 concept; 100 concepts + 500 preserve prompts.

    erasekit bench perf --only peft_compare           # or uce_reference; no --only: every perf benchmark
    python -m erasekit.bench.perf.peers --only uce_reference --repeats 3 --out-dir benchmarks
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from erasekit.core import sd
from erasekit.core.device import DTYPES, synchronize

ADAPTER_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
GOALS = {"static_over_peft_max": 0.9, "gated_over_peft_max": 1.0}
AGREE_RTOL = {"peft_compare": 1e-4, "uce_reference": 1e-5}
#: peft_compare's tolerance in half precision: PEFT and erasekit add the same low-rank terms in another order
HALF_RTOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2}
BENCHMARKS = ("peft_compare", "uce_reference")


def machine_load() -> dict:
    """The load average and ``uptime``'s line: other work on the machine slows the wall clock."""
    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        line = None
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "uptime": line,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}


def write_record(path: Path, record: dict) -> Path:
    from erasekit.core.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(record, indent=2) + "\n").encode())
    return path


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F (fp64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each callable, called in turn ``repeats`` times, the order reversed every other round so that no
    variant always runs first (or after the same one); on CUDA each call is timed to the end of its kernels."""
    names, times = list(fns), {n: [] for n in fns}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            synchronize()
            started = time.perf_counter()
            fns[n]()
            synchronize()
            times[n].append(time.perf_counter() - started)
    return times


# ------------------------------------------------------------------------------------------------ PEFT
def shared_view(pipe, own: tuple[str, ...] = ()):
    """A pipeline whose UNet is a separate module tree over the *same* parameter and buffer tensors as ``pipe``'s
    (no copy of the weights), except the weights of modules whose path ends with one of ``own``, which are copied;
    other components are ``pipe``'s. Hooks and PEFT layers on one tree do not reach the other."""
    unet = pipe.unet
    memo = {id(t): t for t in itertools.chain(unet.parameters(), unet.buffers())}
    view = copy.deepcopy(unet, memo)
    for name, module in view.named_modules():
        if own and name.endswith(own):
            module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
    return type(pipe).from_pipe(pipe, unet=view, torch_dtype=unet.dtype)  # from_pipe casts to float32 by default


def peft_comparison(pipe, repeats: int = 5, count: int = 4, rank: int = 4, scale: float = 0.02,
                    batch: int = 2) -> dict:
    """Step times of the plain UNet and of ``count`` rank-``rank`` adapters on :data:`ADAPTER_TARGETS` through
    PEFT, erasekit (static and gated) and fused, timed alternately; agreement of erasekit's and the fused output
    with PEFT's. ``batch`` 2 = a classifier-free-guidance batch [uncond, cond]."""
    from erasekit import compose, export
    from erasekit.testing import unet_inputs

    from .compose_overhead import make_adapter

    made = {kind: [make_adapter(pipe, kind, seed, ADAPTER_TARGETS, rank, scale) for seed in range(count)]
            for kind in ("static", "gated")}
    views = {"peft": shared_view(pipe), "erasekit_static": shared_view(pipe),
             "erasekit_gated": shared_view(pipe), "fused": shared_view(pipe, own=ADAPTER_TARGETS)}
    with tempfile.TemporaryDirectory(prefix="erasekit-peft-") as tmp:
        names = []
        for i, adapter in enumerate(made["static"]):
            path = export.to_diffusers(adapter, Path(tmp) / f"static{i}.safetensors")
            views["peft"].load_lora_weights(str(path), adapter_name=f"static{i}")
            names.append(f"static{i}")
        views["peft"].set_adapters(names, [1.0] * count)
    for i in range(count):
        compose.load(views["erasekit_static"], made["static"][i], name=f"static{i}")
        compose.load(views["fused"], made["static"][i], name=f"static{i}")
        compose.load(views["erasekit_gated"], made["gated"][i], name=f"gated{i}")
    compose.fuse(views["fused"])

    inputs = unet_inputs(pipe.unet, batch, pipe.unet.device, pipe.unet.dtype)
    with torch.no_grad():  # a real prompt context, so that the gates see what generation gives them
        cond = sd.encode(pipe, ["", "a photo of concept 1"][-batch:]).embeds.to(pipe.unet.dtype)
    inputs["encoder_hidden_states"] = cond
    unets = {"plain": pipe.unet, **{k: v.unet for k, v in views.items()}}

    def step(unet):
        with torch.no_grad():
            return unet(**inputs).sample

    out = {k: step(u) for k, u in unets.items()}  # also the warm-up (and the gates, once)
    effect = out["peft"] - out["plain"]
    agreement = {}
    for k in ("erasekit_static", "fused"):
        agreement[k] = {"max_abs_diff": float((out[k] - out["peft"]).abs().max()),
                        "relative_to_output": relative(out[k], out["peft"]),
                        "relative_to_adapter_effect": relative(out[k] - out["plain"], effect)}
    agreement["adapter_effect_relative_to_output"] = relative(effect + out["plain"], out["plain"])
    agreement["rtol"] = HALF_RTOL.get(pipe.unet.dtype, AGREE_RTOL["peft_compare"])
    agreement["agree"] = all(agreement[k]["relative_to_output"] <= agreement["rtol"]
                             for k in ("erasekit_static", "fused"))

    times = interleaved({k: (lambda u=u: step(u)) for k, u in unets.items()}, repeats)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = {f"{k}_over_peft": round(median[k] / median["peft"], 4)
              for k in ("erasekit_static", "erasekit_gated", "fused", "plain")}
    ratios["peft_over_plain"] = round(median["peft"] / median["plain"], 4)
    # the same ratios within each round (the variants stepped seconds apart), robust to the machine's drift
    paired = {k: [a / b for a, b in zip(times[k], times["peft"])] for k in ("erasekit_static", "erasekit_gated",
                                                                           "fused", "plain")}
    paired_ratios = {f"{k}_over_peft": {"median": round(statistics.median(v), 4),
                                        "range": [round(min(v), 4), round(max(v), 4)]} for k, v in paired.items()}
    return {
        "adapters": {"count": count, "rank": rank, "targets": list(ADAPTER_TARGETS),
                     "modules_per_adapter": len(made["static"][0].deltas), "factor_scale": scale,
                     "gated_rule": made["gated"][0].gating["rule"]},
        "step": {"batch": batch, "latent": list(inputs["sample"].shape[-2:]), "dtype": str(pipe.unet.dtype)[6:],
                 "device": str(pipe.unet.device)},
        "median_step_s": {k: round(v, 5) for k, v in median.items()},
        "step_s": {k: [round(x, 5) for x in v] for k, v in times.items()},
        "ratios": ratios,
        "paired_ratios": paired_ratios,
        "goals": GOALS,
        "meets_goals": {"static": ratios["erasekit_static_over_peft"] <= GOALS["static_over_peft_max"],
                        "gated": ratios["erasekit_gated_over_peft"] <= GOALS["gated_over_peft_max"]},
        "agreement": agreement,
    }


# ------------------------------------------------------------------------------------------------ UCE
def reference_uce(weights: dict[str, torch.Tensor], keys, erase_scale: float, preserve_scale: float, lam: float,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The REFERENCE TRANSCRIPTION, for comparison only: UCE's edit (Gandikota et al., WACV 2024, Eq. 7) as the
    authors' code computes it (``edit_model`` of ``train-scripts/train_erase.py`` / ``trainscripts/
    uce_sd_erase.py``), per edited layer, summing outer products key by key, then an explicit inverse::

        W_new = (λW + Σ_e s_e v*_e c_eᵀ + Σ_p s_p W c_p c_pᵀ) (λI + Σ_e s_e c_e c_eᵀ + Σ_p s_p c_p c_pᵀ)⁻¹

    with ``v*_e = W c_g`` (the guide's value). ``keys``: an :class:`erasekit.methods.uce.Keys`. Returns the new
    weights by layer, in ``dtype`` (the authors' code works in the model's, fp32)."""
    new = {}
    for name, weight in weights.items():
        W = weight.detach().to(dtype)
        mat1 = lam * W
        mat2 = lam * torch.eye(W.shape[1], dtype=dtype, device=W.device)
        for c_e, c_g in zip(keys.erase.to(dtype), keys.guide.to(dtype)):
            context, value = c_e[:, None], W @ c_g[:, None]
            mat1 += erase_scale * (value @ context.T)
            mat2 += erase_scale * (context @ context.T)
        for c_p in keys.preserve.to(dtype):
            context = c_p[:, None]
            mat1 += preserve_scale * ((W @ context) @ context.T)
            mat2 += preserve_scale * (context @ context.T)
        new[name] = mat1 @ torch.inverse(mat2)
    return new


def uce_case(pipe, config, repeats: int) -> dict:
    """erasekit's UCE solve and :func:`reference_uce` from the same keys, timed alternately; the edited weights
    compared (erasekit's ``W + up·down`` against the transcription in fp32, as timed, and in fp64)."""
    from erasekit.methods import uce

    modules = uce.find_targets(pipe, config.targets)
    started = time.perf_counter()
    keys = uce.collect_keys(pipe, config)
    synchronize()
    keys_s = time.perf_counter() - started
    weights = {n: m.weight for n, m in modules.items()}
    s_e, s_p, lam = config.erase_scale, config.preserve_scale, config.lam

    def ours():
        edit = uce.solve(keys, s_e, s_p, lam)
        return uce.module_deltas(modules, edit.P, edit.Q)

    def reference():
        return reference_uce(weights, keys, s_e, s_p, lam)

    results = {"ours": ours(), "reference": reference()}  # warm-up, and the outputs compared
    times = interleaved({"ours": ours, "reference": reference}, repeats)
    reference64 = reference_uce(weights, keys, s_e, s_p, lam, torch.float64)
    worst = {"reference_fp32": 0.0, "reference_fp64": 0.0, "edit_vs_reference_fp32": 0.0,
             "edit_vs_reference_fp64": 0.0, "reference_fp32_vs_fp64": 0.0}
    for name, W in weights.items():
        W64 = W.detach().double()
        ours_new = W64 + results["ours"][f"unet.{name}"].dense().to(W64)  # factors live on the CPU
        ref32, ref64 = results["reference"][name].double(), reference64[name]
        for key, value in (("reference_fp32", relative(ours_new, ref32)), ("reference_fp64", relative(ours_new, ref64)),
                           ("edit_vs_reference_fp32", relative(ours_new - W64, ref32 - W64)),
                           ("edit_vs_reference_fp64", relative(ours_new - W64, ref64 - W64)),
                           ("reference_fp32_vs_fp64", relative(ref32, ref64))):
            worst[key] = max(worst[key], value)
    median = {k: statistics.median(v) for k, v in times.items()}
    C, _ = uce.statistics(keys, s_e, s_p)  # fp32 rounding in the inverse grows with cond(λI + C)
    condition = float(torch.linalg.cond(lam * torch.eye(C.shape[0], dtype=C.dtype, device=C.device) + C))
    return {
        "concepts": len(config.concepts), "preserve_prompts": len(config.preserve),
        "erase_keys": int(keys.erase.shape[0]), "preserve_keys": int(keys.preserve.shape[0]),
        "layers": len(modules), "collect_keys_s": round(keys_s, 3),
        "median_solve_s": {k: round(v, 4) for k, v in median.items()},
        "solve_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "reference_over_ours": round(median["reference"] / median["ours"], 2),
        "end_to_end_reference_over_ours": round((keys_s + median["reference"]) / (keys_s + median["ours"]), 2),
        "max_relative_weight_diff": {k: float(f"{v:.3g}") for k, v in worst.items()},
        "condition_number": float(f"{condition:.3g}"),
        "rtol": AGREE_RTOL["uce_reference"],
        "agree_fp32": worst["reference_fp32"] <= AGREE_RTOL["uce_reference"],
        "agree_fp64": worst["reference_fp64"] <= AGREE_RTOL["uce_reference"],
    }


def uce_comparison(pipe, cases: dict[str, tuple[list[str], list[str]]], repeats: int = 3) -> dict:
    """:func:`uce_case` per case name → (concepts, preserve prompts)."""
    from erasekit.methods import uce

    return {name: uce_case(pipe, uce.UceConfig(concepts=tuple(c), preserve=tuple(p)), repeats)
            for name, (c, p) in cases.items()}


# ------------------------------------------------------------------------------------------------ runs
TIMED = {"peft_compare": "median seconds of one UNet step per variant, the variants stepped in turn each round "
                         "(order reversed every other round)",
         "uce_reference": "median seconds of the solve from the same keys (keys collected once by erasekit, "
                          "timed apart): erasekit = uce.solve + uce.module_deltas (low-rank factors per layer); "
                          "reference = the per-layer transcription with an explicit inverse (full new weights)"}


def run(name: str, model: str, repeats: int, out_dir: str | Path, device: str = "cpu", batch: int = 2,
        dtype: str = "auto") -> Path:
    """Run benchmark ``name`` on ``model`` ("sd15", or "sd1" for the tiny test pipeline) and write
    ``OUT_DIR/<name>.json`` (``<name>-cuda.json`` on a GPU) atomically, with the run record and the machine's load
    before and after. ``dtype`` of ``peft_compare``'s UNet ("auto": fp16 on CUDA, fp32 on CPU); ``uce_reference``
    compares arithmetic and always runs in fp32."""
    from erasekit.core.device import resolve_dtype
    from erasekit.core.provenance import run_record
    from erasekit.testing import real_shape_pipeline, tiny_pipeline

    from .closed_form import build_pipe, prompts

    load_before = machine_load()
    started = time.perf_counter()
    if name == "peft_compare":
        torch_dtype = resolve_dtype(dtype, torch.device(device))
        pipe = (tiny_pipeline(model) if model == "sd1" else real_shape_pipeline(model)).to(device, torch_dtype)
        results = peft_comparison(pipe, repeats, batch=batch)
    elif name == "uce_reference":
        pipe = tiny_pipeline(model) if model == "sd1" else build_pipe(model, True, device, torch.float32)
        concepts, preserve = prompts()
        results = uce_comparison(pipe, {"uce_1_concept": (concepts[:1], []),
                                        "uce_100_concepts_500_preserve": (concepts, preserve)}, repeats)
    else:
        raise ValueError(f"unknown benchmark {name!r}; one of {BENCHMARKS}")
    record = {"benchmark": name, "model": f"{model} shapes, random weights", "timed": TIMED[name],
              "results": results, "wall_s": round(time.perf_counter() - started, 1),
              "load_before": load_before, "load_after": machine_load(), "run": run_record()}
    path = write_record(Path(out_dir) / f"{name}{'' if device == 'cpu' else '-' + device.replace(':', '')}.json",
                        record)
    print(json.dumps(record["results"], indent=2), flush=True)
    return path


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--model", default="sd15", choices=["sd15", "sd1"], help="sd1: the tiny test pipeline")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, choices=[1, 2],
                        help="peft_compare's UNet batch: 2 = a CFG batch [uncond, cond], 1 = cond alone")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="peft_compare: auto = float16 on CUDA, float32 on CPU")
    parser.add_argument("--out-dir", default="benchmarks")
    args = parser.parse_args(argv)
    return [run(name, args.model, args.repeats, args.out_dir, args.device, args.batch, args.dtype)
            for name in args.only]


if __name__ == "__main__":
    main()
