"""Closed-form erase time and memory on a model with SD 1.5's (SDXL's, SD3-medium's) full shapes (random weights).

    erasekit bench perf                                    # → benchmarks/closed_form_perf.json (and the others)
    python -m erasekit.bench.perf.closed_form [--repeats 3] [--zero-init] [--model sdxl|sd3] [--device cuda] [--out F]

Cases: UCE with 1 concept; UCE with 100 concepts and 500 preserve prompts (one joint solve); RealEra's closed-form
part (``iterations=0``: its K = 8 mined neighbour encodings per erase prompt and B = 4 per preserve prompt, then the
same solve) on both, reported without targets (its LoRA stage trains as ESD does: see ``train_memory``); TRCE's
stage 1 alone (its closed-form [EoT] remap) with 1 concept in the reference's 15 templates; SAFREE's guard (the
concept subspace: no weights change) for 1 concept. Times exclude
model building; they include everything ``erasekit.erase`` does (prompt encoding, the D×D solve, the per-layer
factors, the base fingerprint). Prompts are made of tinyworld words, which the test tokenizer keeps as one token
each, like CLIP's BPE does for common words. Reported: wall and CPU seconds per case (best and median of
``--repeats``), a breakdown of the 100-concept case, peak RSS (``resource.getrusage``), torch threads and the load
average, since other work on the machine slows the wall clock. Targets: ≤ 2 s (1 concept, UCE or TRCE), ≤ 60 s (100 + 500).

``--model sd3``: SD3-medium's transformer with CLIP-L and CLIP-G (no T5), UCE alone (the other methods here refuse
an MMDiT pipeline). UCE edits ``context_embedder`` with the context keys and the pooled-text embedder with a second
solve on the prompts' pooled embeddings (:mod:`erasekit.methods.uce`, "MMDiT"); the breakdown times both solves.
Both keys of a prompt come from one pass of the causal CLIP encoders cut after its end token, each distinct token
prefix run once (:func:`erasekit.methods.uce.text_keys`, ``encode_prompts_s``). ``--two-pass-sample F`` checks them on
a fraction F of the 100-concept case's prompts against the two separate computations (``uce.collect_keys``,
``uce.pooled_keys``: the encoders' own forward, one pass for each key), timing both ways and scaling the times up to
all the prompts (linear in the number of prompts of a length; a sample shares fewer prefixes, so the one-pass time
scaled up overstates ``encode_prompts_s``); ``--many-repeats 0`` skips that case's end-to-end run (its time is then
the breakdown's sum).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from erasekit.api import erase
from erasekit.core.device import synchronize
from erasekit.methods import text, uce
from erasekit.testing import real_shape_pipeline, sd3_medium_transformer, sd15_unet, sdxl_unet
from erasekit.tinyworld.world import BACKGROUNDS, COLOURS, SHAPES, TEXTURES

TARGETS_S = {"uce_1_concept": 2.0, "uce_100_concepts_500_preserve": 60.0, "trce_stage1_1_concept": 2.0}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def peak_cuda_mb() -> float | None:
    """Peak CUDA memory allocated by this process (None without CUDA in use)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 2**20


#: the denoiser parameters UCE reads, per model (random under ``--zero-init``; the rest is zero)
EDITED = {"sd15": (".attn2.to_",), "sdxl": (".attn2.to_",),
          "sd3": ("context_embedder.", "time_text_embed.text_embedder.linear_1.")}
BUILDERS = {"sd15": sd15_unet, "sdxl": sdxl_unet, "sd3": sd3_medium_transformer}


def zero_init_denoiser(model: str) -> torch.nn.Module:
    """The model's denoiser built on the meta device, then materialised with random weights on the layers UCE reads
    (``EDITED``) and zeros elsewhere: full random init of billions of parameters is slow on a CPU."""
    with torch.device("meta"):
        denoiser = BUILDERS[model]()
    denoiser = denoiser.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            edited = any(part in name if part.startswith(".") else name.startswith(part) for part in EDITED[model])
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5) if edited else p.zero_()
        for name, b in denoiser.named_buffers():
            b.zero_()
    return denoiser


def build_pipe(model: str, zero_init: bool, device: str, dtype: torch.dtype):
    """The real model's denoiser and text encoder(s) with random weights, in a pipeline (tiny VAE)."""
    denoiser = zero_init_denoiser(model) if zero_init else None
    key = "transformer" if model == "sd3" else "unet"
    pipe = real_shape_pipeline(model, **{key: denoiser})
    return pipe.to(device, dtype)


def prompts() -> tuple[list[str], list[str]]:
    """100 concepts ("crimson disc", ...) and 500 distinct preserve prompts ("a striped box on a night sky")."""
    colours = [n for names in COLOURS.values() for n in names]
    shapes = [n for names in SHAPES.values() for n in names]
    textures = [n for names in TEXTURES.values() for n in names]
    backgrounds = [n for names in BACKGROUNDS.values() for n in names]
    concepts = [f"{c} {s}" for c, s in itertools.product(colours, shapes)][:100]
    preserve = [f"a {t} {s} on a {b}" for t, s, b in itertools.product(textures, shapes, backgrounds)][:500]
    assert len(set(concepts)) == 100 and len(set(preserve)) == 500
    return concepts, preserve


def two_pass_check(pipe, config, fraction: float) -> dict:
    """SD3: on a fraction of ``config``'s prompts, UCE's one-pass keys (:func:`erasekit.methods.uce.text_keys`)
    against the two separate computations (context keys, then pooled keys: two passes of each prompt); both timed,
    the times scaled up to all of ``config``'s distinct prompts."""
    sample = config if fraction >= 1 else dataclasses.replace(
        config, concepts=config.concepts[:max(1, round(fraction * len(config.concepts)))],
        preserve=config.preserve[:round(fraction * len(config.preserve))])
    distinct = lambda c: len({*c.concepts, *c.guides, *c.preserve})  # noqa: E731  prompts encoded
    scale = distinct(config) / distinct(sample)
    t, cpu = time.perf_counter(), time.process_time()
    one = uce.text_keys(pipe, sample)
    one_s, one_cpu = time.perf_counter() - t, time.process_time() - cpu
    t, cpu = time.perf_counter(), time.process_time()
    two = (uce.collect_keys(pipe, sample), uce.pooled_keys(pipe, sample))
    two_s, two_cpu = time.perf_counter() - t, time.process_time() - cpu
    diff = lambda a, b: max(float((x - y).abs().max()) for x, y in zip(astuple(a), astuple(b))  # noqa: E731
                            if x.numel())
    return {"two_pass_check": {
        "sample": f"{len(sample.concepts)} concepts + {len(sample.preserve)} preserve prompts: {distinct(sample)} of "
                  f"the {distinct(config)} distinct prompts, times scaled up",
        "one_pass_keys_s": round(one_s * scale, 3), "two_pass_keys_s": round(two_s * scale, 3),
        "one_pass_keys_cpu_s": round(one_cpu * scale, 3), "two_pass_keys_cpu_s": round(two_cpu * scale, 3),
        "max_abs_diff": {"context_keys": diff(one[0], two[0]), "pooled_keys": diff(one[1], two[1]),
                         "context_key_scale": float(two[0].erase.abs().max()),
                         "pooled_key_scale": float(two[1].erase.abs().max())}}}


def astuple(keys: uce.Keys) -> tuple[torch.Tensor, ...]:
    return keys.erase, keys.guide, keys.preserve


def timed(fn, repeats: int) -> dict:
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        synchronize()
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        synchronize()  # CUDA: to the end of the queued kernels
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_s_best": round(min(walls), 3), "wall_s_median": round(statistics.median(walls), 3),
            "wall_s_first": round(walls[0], 3), "cpu_s_best": round(min(cpus), 3), "repeats": repeats,
            "_result": result}


def main(argv=None, out: str | Path = "benchmarks/closed_form_perf.json", pipe=None) -> dict:
    """Run the benchmark (``argv``: the command line's arguments); ``pipe``: a pipeline to time instead of building
    ``--model``'s (tests pass a tiny one; ``--model`` must name its family)."""
    from erasekit.core.device import resolve_dtype
    from erasekit.core.provenance import run_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zero-init", action="store_true", help="random attn2 k/v, zeros elsewhere (fast build)")
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "sd3"])
    parser.add_argument("--many-repeats", type=int, default=None,
                        help="repeats of the 100-concept case (default: --repeats; 0: its breakdown only)")
    parser.add_argument("--cases", nargs="+", default=["one", "many"], choices=["one", "many"],
                        help="one: 1 concept; many: 100 concepts + 500 preserve prompts (default: both)")
    parser.add_argument("--two-pass-sample", type=float, default=0.1,
                        help="sd3: fraction of the 100-concept case's prompts on which the one-pass keys are checked "
                             "against (and timed with) the separate context and pooled passes; 0: no check")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto: float16 on CUDA, float32 on CPU")
    parser.add_argument("--out", default=str(out))
    args = parser.parse_args(argv)
    dtype = resolve_dtype(args.dtype, torch.device(args.device))

    load_before = os.getloadavg()
    t = time.perf_counter()
    pipe = pipe if pipe is not None else build_pipe(args.model, args.zero_init, args.device, dtype)
    build_s = time.perf_counter() - t
    log(f"model built in {build_s:.1f} s")
    rss_model, cuda_model = peak_rss_mb(), peak_cuda_mb()
    concepts, preserve = prompts()
    tokens = text.tokenize(pipe, concepts + preserve).attention_mask.sum(1).float()

    results = {}
    mmdit = args.model == "sd3"
    many_repeats = args.repeats if args.many_repeats is None else args.many_repeats
    if "one" in args.cases:
        one = timed(lambda: erase(pipe, "uce", ["crimson disc"]), args.repeats)
        results["uce_1_concept"] = {"rank": one.pop("_result").info["rank"], **one}
        log(f"1 concept: {results['uce_1_concept']}")
    many_name = "uce_100_concepts_500_preserve"
    if "many" in args.cases and many_repeats:
        many = timed(lambda: erase(pipe, "uce", concepts, preserve=preserve), many_repeats)
        adapter = many.pop("_result")
        results[many_name] = {**many, "rank": adapter.info["rank"], "erase_keys": adapter.info["erase_keys"],
                              "preserve_keys": adapter.info["preserve_keys"],
                              "adapter_parameters": adapter.num_parameters}
        log(f"100 concepts: {results[many_name]}")
    elif "many" in args.cases:
        results[many_name] = {"end_to_end": "not run (--many-repeats 0): the time is the breakdown's sum"}
    if not mmdit:  # RealEra, TRCE and SAFREE refuse an MMDiT pipeline (the registry's architectures)
        for name, (erased, kept) in (("realera_closed_form_1_concept", (["crimson disc"], [])),
                                     ("realera_closed_form_100_concepts_500_preserve", (concepts, preserve))):
            run = timed(lambda: erase(pipe, "realera", erased, preserve=kept, iterations=0), args.repeats)
            adapter = run.pop("_result")
            results[name] = {**run, **{k: adapter.info[k] for k in ("rank", "erase_keys", "preserve_keys")}}
            log(f"{name}: {results[name]}")
        trce = timed(lambda: erase(pipe, "trce", ["crimson disc"], stages=("cross_attention",)), args.repeats)
        stage1 = trce.pop("_result").info["cross_attention"]
        results["trce_stage1_1_concept"] = {**trce, "rank": stage1["rank"], "erase_keys": stage1["erase_keys"]}
        log(f"trce stage 1, 1 concept: {results['trce_stage1_1_concept']}")
        guard = timed(lambda: erase(pipe, "safree", ["crimson disc"]), args.repeats)
        rank = guard.pop("_result").info["subspace_rank"]
        results["safree_1_concept"] = {**guard, "subspace_rank": rank}
        log(f"safree, 1 concept: {results['safree_1_concept']}")
    rss_after, cuda_after = peak_rss_mb(), peak_cuda_mb()

    # breakdown (one run of each step)
    for name, config in (("uce_1_concept", uce.UceConfig(concepts=("crimson disc",))),
                         (many_name, uce.UceConfig(concepts=tuple(concepts), preserve=tuple(preserve)))):
        if name not in results:
            continue
        steps, extra = {}, {}
        synchronize()
        t, cpu = time.perf_counter(), time.process_time()
        keys, pooled = uce.text_keys(pipe, config)  # SD3: the context and pooled keys from one pass
        synchronize()
        steps["encode_prompts_s"] = time.perf_counter() - t
        extra["encode_prompts_cpu_s"] = round(time.process_time() - cpu, 3)  # wall minus waiting for the CPU
        t = time.perf_counter()
        edit = uce.solve(keys, 1.0, 1.0, 0.5)
        synchronize()
        steps["solve_s"] = time.perf_counter() - t
        t = time.perf_counter()
        uce.module_deltas(uce.find_targets(pipe, config.targets), edit.P, edit.Q)
        synchronize()
        steps["layer_factors_s"] = time.perf_counter() - t
        if mmdit:  # the pooled-text embedder's solve (uce module docstring, "MMDiT")
            t = time.perf_counter()
            uce.pooled_edit(pipe, pooled, 1.0, 1.0, 0.5)
            synchronize()
            steps["pooled_solve_s"] = time.perf_counter() - t
            if args.two_pass_sample > 0:
                extra.update(two_pass_check(pipe, config, args.two_pass_sample if name == many_name else 1.0))
        t = time.perf_counter()
        uce.base_fingerprint(pipe)
        synchronize()
        steps["fingerprint_s"] = time.perf_counter() - t
        results[name]["breakdown"] = {k: round(v, 3) for k, v in steps.items()}
        results[name]["breakdown_sum_s"] = round(sum(steps.values()), 3)
        results[name].update(extra)
        log(f"{name} breakdown: {results[name]['breakdown']} {extra}")

    for name, target in TARGETS_S.items():
        if name not in results:
            continue
        results[name]["target_s"] = target
        row = results[name]
        wall = row["wall_s_best"] if "wall_s_best" in row else row["breakdown_sum_s"]
        results[name]["meets_target"] = wall <= target
    report = {
        "benchmark": "closed_form_perf",
        "model": (f"{args.model} {'transformer (no T5)' if mmdit else 'UNet'} + text encoder(s) "
                  f"(random weights, {str(dtype)[6:]}, {args.device})"),
        "run": run_record(),
        "unet_init": (f"{' and '.join(EDITED[args.model])} random, rest zero" if args.zero_init
                      else "full random init"),
        "results": results,
        "prompt_tokens_mean": round(float(tokens.mean()), 2),
        "model_build_s": round(build_s, 1),
        "peak_rss_mb": {"after_model_build": round(rss_model), "after_erasing": round(rss_after),
                        "erasing_increase": round(rss_after - rss_model)},
        **({"peak_cuda_mb": {"after_model_build": round(cuda_model), "after_erasing": round(cuda_after),
                             "erasing_increase": round(cuda_after - cuda_model)}} if cuda_after is not None else {}),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "note": "wall times include waiting for the CPU when other processes run (see load_average_*); "
                "cpu_s is this process's CPU time, over all its threads",
    }
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
