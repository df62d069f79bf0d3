"""UCE's closed-form edit at FLUX.1-dev's shapes, on the modules it edits, built alone (random weights).

FLUX.1-dev's transformer has 11.9 B parameters (47.6 GB in fp32, 23.8 GB in bf16) and its T5-XXL encoder 4.7 B more:
the whole ``FluxPipeline`` does not fit a 24 GB machine, so this benchmark builds ``FluxTransformer2DModel`` with
FLUX.1-dev's configuration (``black-forest-labs/FLUX.1-dev``, ``transformer/config.json``) on the meta device (no
memory), reads its parameter count and module shapes there, and materialises only the modules edited:

* ``context_embedder`` — Linear(4096 → 3072), reading the T5 context: what UCE edits on an MMDiT (erasekit, and the
  authors' ``uce_flux_edit.py``), with one key per prompt (``key_mode="last_token"``);
* ``time_text_embed.text_embedder.linear_1`` — Linear(768 → 3072), reading CLIP-L's pooled text: UCE's second solve;
* ``transformer_blocks.0.attn.add_k_proj`` / ``add_v_proj`` — Linear(3072 → 3072), the text stream's key/value
  projections of a double-stream block (the whole block is materialised, 340 M parameters), edited with keys in the
  3072-wide space (the context embedder's outputs of the keys above). These read the text after adaLN modulation,
  so the edit there is not exact for a real prompt (:mod:`erasekit.methods.uce`, "MMDiT"); it is timed and checked
  here at its shape, as the issue asks. The 38 single-stream blocks project image and text tokens with the same
  ``to_k``/``to_v``: there is no text-only layer to edit in them.

Keys are random (no T5 or CLIP runs here): entries N(0, 1) — for a shape and time check the values do not matter,
and the edit's exactness is checked against Eq. 7 itself. For each case (1 concept; 100 concepts with 500 preserve
prompts; guides "" ↦ one shared guide key) and each module: time of ``uce.solve`` (the d×d system, float64) and
``uce.module_deltas`` (per-layer factors), the delta's rank and size, and three checks on W' = W + ΔW:

* ``erase_residual``: ‖W'c_e − W c_g‖ / ‖W c_e − W c_g‖, the part of the move to the guide not made (λ > 0
  keeps it above zero: λ / (λ + ‖c_e‖²) for one key);
* ``preserve_drift``: ‖W'c_p − W c_p‖ / ‖W c_p‖ over the preserve keys;
* ``eq7_max_rel_diff``: max |W' − W'_{Eq.7}| / max |W'_{Eq.7}|, where W'_{Eq.7} = (λW + s_e Σ W c_g c_eᵀ +
  s_p Σ W c_p c_pᵀ)(λI + C)⁻¹ is the paper's closed form computed directly in float64 (Gandikota et al.,
  WACV 2024, Eq. 7).

    python -m erasekit.bench.perf.flux_shapes [--out benchmarks/flux_shapes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from erasekit.methods import uce

#: FLUX.1-dev's transformer configuration (``black-forest-labs/FLUX.1-dev``, ``transformer/config.json``)
FLUX_DEV_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
#: FLUX.1-dev's T5-XXL encoder (``text_encoder_2``), parameters
T5_XXL_PARAMETERS = 4.76e9
LAM = 0.5  # UCE's λ (the authors' default)


def meta_flux(config: dict | None = None):
    """FluxTransformer2DModel with FLUX.1-dev's configuration (or ``config``) on the meta device (shapes only, no
    memory)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**(config or FLUX_DEV_CONFIG))


def materialise(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """``module`` (on the meta device) allocated on the CPU with random weights N(0, 1/fan_in), zero biases."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
            else:
                p.zero_()
    return module


def random_keys(n: int, m: int, dim: int, generator: torch.Generator) -> uce.Keys:
    """``n`` erase keys, their guide (one key, as the guide "" gives every concept), ``m`` preserve keys; N(0, 1)."""
    erase = torch.randn(n, dim, generator=generator)
    guide = torch.randn(1, dim, generator=generator).expand(n, dim).clone()
    return uce.Keys(erase, guide, torch.randn(m, dim, generator=generator))


def mapped(keys: uce.Keys, layer: torch.nn.Linear) -> uce.Keys:
    """The keys as ``layer`` maps them (no bias): keys of the layers that read its output."""
    W = layer.weight.detach()
    return uce.Keys(keys.erase @ W.T, keys.guide @ W.T, keys.preserve @ W.T)


def check(module: torch.nn.Linear, delta, keys: uce.Keys) -> dict:
    """Timing-free checks of one module's edit (module docstring), in float64."""
    W = module.weight.detach().double()
    dW = delta.delta.double() if delta.delta is not None else delta.up.double() @ delta.down.double()
    W1 = W + dW
    c_e, c_g, c_p = (k.double() for k in (keys.erase, keys.guide, keys.preserve))
    moved = (c_e @ W1.T - c_g @ W.T).norm() / (c_e @ W.T - c_g @ W.T).norm()
    drift = ((c_p @ W1.T - c_p @ W.T).norm() / (c_p @ W.T).norm()) if len(c_p) else torch.tensor(0.0)
    C = c_e.T @ c_e + c_p.T @ c_p
    rhs = LAM * W + (c_g @ W.T).T @ c_e + (c_p @ W.T).T @ c_p
    direct = torch.linalg.solve(LAM * torch.eye(W.shape[1], dtype=W.dtype) + C, rhs.T).T  # rhs (λI + C)⁻¹, C = Cᵀ
    return {"erase_residual": float(moved), "preserve_drift": float(drift),
            "eq7_max_rel_diff": float((W1 - direct).abs().max() / direct.abs().max())}


def edit(modules: dict[str, torch.nn.Linear], keys: uce.Keys) -> dict:
    """UCE's solve and per-layer factors for ``modules`` (all reading the keys' space): times, sizes, checks."""
    t = time.perf_counter()
    solved = uce.solve(keys, 1.0, 1.0, LAM)
    solve_s = time.perf_counter() - t
    t = time.perf_counter()
    deltas = uce.module_deltas(modules, solved.P, solved.Q, "transformer")
    factors_s = time.perf_counter() - t
    rows = {}
    for name, module in modules.items():
        delta = deltas[f"transformer.{name}"]
        numbers = sum(x.numel() for x in (delta.down, delta.up, delta.delta) if x is not None)
        rows[name] = {"weight_shape": list(module.weight.shape), "rank": int(solved.P.shape[1]),
                      "delta_numbers": numbers, "delta_mb_fp32": round(numbers * 4 / 2**20, 3),
                      "low_rank": delta.delta is None, **check(module, delta, keys)}
    return {"keys": {"dim": int(keys.erase.shape[1]), "erase": len(keys.erase), "preserve": len(keys.preserve)},
            "solve_s": round(solve_s, 3), "layer_factors_s": round(factors_s, 3), "modules": rows}


def run(out: Path, seed: int = 0, config: dict | None = None) -> dict:
    """Build, edit, check and write the report to ``out``; ``config``: another FluxTransformer2DModel configuration
    than FLUX.1-dev's (tests use a tiny one)."""
    from erasekit.core.provenance import peak_rss_mb, run_record

    config = config or FLUX_DEV_CONFIG
    load_before = [round(x, 2) for x in os.getloadavg()]
    gen = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    flux = meta_flux(config)
    parameters = sum(p.numel() for p in flux.parameters())
    context = materialise(flux.context_embedder, gen)
    pooled = materialise(flux.time_text_embed.text_embedder.linear_1, gen)
    block = materialise(flux.transformer_blocks[0], gen)
    build_s = time.perf_counter() - t
    stream = {f"transformer_blocks.0.attn.{p}": getattr(block.attn, p) for p in ("add_k_proj", "add_v_proj")}
    cases = {}
    for name, (n, m) in {"1_concept": (1, 0), "100_concepts_500_preserve": (100, 500)}.items():
        text_keys = random_keys(n, m, config["joint_attention_dim"], gen)
        cases[name] = {
            "context_embedder": edit({"context_embedder": context}, text_keys),
            "pooled_text_embedder": edit({"time_text_embed.text_embedder.linear_1": pooled},
                                         random_keys(n, m, config["pooled_projection_dim"], gen)),
            "text_stream_kv_block_0": edit(stream, mapped(text_keys, context)),
        }
        cases[name]["total_s"] = round(sum(v["solve_s"] + v["layer_factors_s"] for v in cases[name].values()), 3)
        print(f"{name}: {json.dumps(cases[name])}", flush=True)
    block_parameters = sum(p.numel() for p in block.parameters())
    report = {
        "benchmark": "flux_shapes: UCE's closed-form edit on FLUX.1-dev's text-reading modules, built alone "
                     "(random weights and keys, fp32 weights, float64 solve, cpu)",
        "why_not_the_whole_model": (
            f"FLUX.1-dev's transformer has {parameters / 1e9:.2f} B parameters ({parameters * 4 / 1e9:.1f} GB fp32, "
            f"{parameters * 2 / 1e9:.1f} GB bf16) and its T5-XXL encoder {T5_XXL_PARAMETERS / 1e9:.2f} B more; this "
            "machine has 24 GB of memory in all (shared), so the FluxPipeline does not fit; the transformer is built "
            "on the meta device and only the edited modules are allocated"),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "transformer_parameters": parameters,
        "materialised_parameters": sum(p.numel() for m in (context, pooled) for p in m.parameters()) + block_parameters,
        "double_stream_block_parameters": block_parameters,
        "build_s": round(build_s, 1),
        "cases": cases,
        "lam": LAM, "seed": seed,
        "peak_rss_mb": round(peak_rss_mb()),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "run": run_record(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None, out: str | Path = "benchmarks/flux_shapes.json") -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(out))
    args = parser.parse_args(argv)
    return run(Path(args.out), args.seed)


if __name__ == "__main__":
    main()
