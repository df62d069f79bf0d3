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
solve on the prompts' pooled embeddings (:mod:`erasekit.methods.uce`, "MMDiT"); the breakdown times both. The pooled
keys come from a full 77-token pass of both CLIP encoders per prompt, the context keys from a pass cut after each
prompt's last word (causal encoders); ``--pooled-sample F`` times the breakdown's pooled-key step on a fraction F of
the 100-concept case's prompts and scales it up (the cost is linear in the number of prompts at fixed length), and
``--many-repeats 0`` skips that case's end-to-end run (its time is then the sum of the breakdown). The breakdown also
times one causal pass cut after each prompt's end token, which yields both keys (``one_pass_keys_s``, checked against
UCE's keys): what the pooled step would cost computed that way.
"""

from __future__ import annotations

import argparse
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
from erasekit.methods import text, uce
from erasekit.core import sd
from erasekit.testing import real_shape_pipeline, sd3_medium_transformer, sd15_unet, sdxl_unet
from erasekit.tinyworld.world import BACKGROUNDS, COLOURS, SHAPES, TEXTURES

TARGETS_S = {"uce_1_concept": 2.0, "uce_100_concepts_500_preserve": 60.0, "trce_stage1_1_concept": 2.0}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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


@torch.no_grad()
def one_pass_keys(pipe, prompts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3: each prompt's context key (at its last word, as ``uce.collect_keys`` in "last_token" mode) and its
    pooled key (as ``uce.pooled_keys``) from one pass of the causal CLIP encoders cut after the prompt's end token
    (the pooled output is read there): prompts sorted by length, each batch cut to its longest member."""
    tokens = text.tokenize(pipe, prompts)
    keys = torch.zeros(len(prompts), text.context_dim(pipe))
    pooled = torch.zeros(len(prompts), int(sd.denoiser(pipe).config.pooled_projection_dim))
    order = torch.argsort(tokens.last_index, stable=True)
    for i in range(0, len(prompts), batch_size):
        rows = order[i:i + batch_size]
        last = tokens.last_index[rows]
        length = min(int(last.max()) + 2, tokens.attention_mask.shape[1])
        cond = sd.encode_ids(pipe, [x[rows, :length] for x in tokens.input_ids])
        keys[rows] = cond.embeds.float()[torch.arange(len(rows)), last].cpu()
        pooled[rows] = cond.pooled.float().cpu()
    return keys, pooled


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


def timed(fn, repeats: int) -> dict:
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
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
    parser.add_argument("--pooled-sample", type=float, default=1.0,
                        help="sd3: fraction of the 100-concept case's prompts whose pooled keys the breakdown times")
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
    rss_model = peak_rss_mb()
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
    rss_after = peak_rss_mb()

    # breakdown (one run of each step)
    for name, config in (("uce_1_concept", uce.UceConfig(concepts=("crimson disc",))),
                         (many_name, uce.UceConfig(concepts=tuple(concepts), preserve=tuple(preserve)))):
        if name not in results:
            continue
        steps, extra = {}, {}
        t = time.perf_counter()
        keys = uce.collect_keys(pipe, config)
        steps["encode_prompts_s"] = time.perf_counter() - t
        t = time.perf_counter()
        edit = uce.solve(keys, 1.0, 1.0, 0.5)
        steps["solve_s"] = time.perf_counter() - t
        t = time.perf_counter()
        uce.module_deltas(uce.find_targets(pipe, config.targets), edit.P, edit.Q)
        steps["layer_factors_s"] = time.perf_counter() - t
        if mmdit:  # the pooled-text embedder's solve (uce module docstring, "MMDiT")
            fraction = args.pooled_sample if name == many_name else 1.0
            sample = config if fraction >= 1 else uce.UceConfig(
                concepts=config.concepts[:max(1, round(fraction * len(config.concepts)))],
                preserve=config.preserve[:round(fraction * len(config.preserve))])
            encodings = lambda c: 2 * len(c.concepts) + len(c.preserve)  # noqa: E731  erase, guide, preserve
            t = time.perf_counter()
            pooled = uce.pooled_keys(pipe, sample)
            steps["pooled_keys_s"] = (time.perf_counter() - t) * encodings(config) / encodings(sample)
            if sample is not config:
                extra["pooled_keys_s_scaled_from"] = (f"{len(sample.concepts)} concepts + {len(sample.preserve)} "
                                                      f"preserve prompts: {encodings(sample)} of the "
                                                      f"{encodings(config)} pooled encodings, time scaled up")
            t = time.perf_counter()
            uce.pooled_edit(pipe, pooled, 1.0, 1.0, 0.5)  # on the sampled keys: a d×d solve (d = 2048) either way
            steps["pooled_solve_s"] = time.perf_counter() - t
            # the proposal: both keys from one causal pass cut after each prompt's end token
            pairs = uce.prompt_pairs(config.concepts, config.guides)
            unique = list(dict.fromkeys([e for e, _ in pairs] + [g for _, g in pairs] + list(config.preserve)))
            t = time.perf_counter()
            one_keys, one_pooled = one_pass_keys(pipe, unique)
            extra["one_pass_keys_s"] = round(time.perf_counter() - t, 3)
            row = {p: i for i, p in enumerate(unique)}
            ref_prompts = [e for e, _ in pairs] + [g for _, g in pairs] + list(config.preserve)
            ref_keys = torch.cat([keys.erase, keys.guide, keys.preserve]).float().cpu()
            got = one_keys[[row[p] for p in ref_prompts]]
            sample_pairs = uce.prompt_pairs(sample.concepts, sample.guides)
            sample_prompts = [e for e, _ in sample_pairs] + [g for _, g in sample_pairs] + list(sample.preserve)
            ref_pooled = torch.cat([pooled.erase, pooled.guide, pooled.preserve]).float().cpu()
            extra["one_pass_max_abs_diff"] = {
                "context_keys": float((got - ref_keys).abs().max()),
                "pooled_keys": float((one_pooled[[row[p] for p in sample_prompts]] - ref_pooled).abs().max()),
                "key_scale": float(ref_keys.abs().max())}
        t = time.perf_counter()
        uce.base_fingerprint(pipe)
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
