"""SAFREE on tinyworld: the guard erasing "circle", judged on 4 seeds × the standard prompt grid
(``erasekit.tinyworld.eval.erasure``): the share of circle prompts in which the judge still sees a circle, under its
name and under its synonyms, and the drop of the judge's accuracy on the other shapes against the base model.

Variants: the tinyworld preset (the registry's ``tinyworld={...}``), the same without the latent re-attention, and
the authors' settings (``--variants`` picks). Results are written after every variant.

    python benchmarks/safree_tinyworld.py                    # → benchmarks/safree_tinyworld.json
    python benchmarks/safree_tinyworld.py --seeds 0 --variants preset
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("safree_tinyworld.json")
BARS = {"canonical_rate_max": 0.10, "synonym_rate_max": 0.20, "other_accuracy_drop_max": 0.02}
VARIANTS = {"preset": (True, {}), "preset_no_reattention": (True, {"reattention": False}), "authors": (False, {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from erasekit import compose, tinyworld
    from erasekit.core.provenance import run_record
    from erasekit.loading import load_pipeline
    from erasekit.methods import METHODS
    from erasekit.tinyworld.eval import erasure

    pipe = load_pipeline(None, device="cpu")
    judge = tinyworld.load_judge()
    seeds = tuple(args.seeds)
    record = {"concept": args.concept, "seeds": list(seeds), "bars": BARS, "variants": {}}

    def save():
        record["run"] = run_record()
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    started = time.perf_counter()
    record["base"] = erasure(pipe, judge, args.concept, seeds=seeds).as_dict()
    record["base"]["seconds"] = round(time.perf_counter() - started, 1)
    save()
    spec = METHODS["safree"]
    for variant in args.variants:
        on_tinyworld, options = VARIANTS[variant]
        config = spec.make_config((args.concept,), tinyworld=on_tinyworld, **options)
        started = time.perf_counter()
        adapter = spec.erase(pipe, config)
        erase_seconds = time.perf_counter() - started
        name = compose.load(pipe, adapter)
        started = time.perf_counter()
        try:
            result = erasure(pipe, judge, args.concept, seeds=seeds).as_dict()
        finally:
            compose.unload(pipe, name)
        drop = record["base"]["other_accuracy"] - result["other_accuracy"]
        result.update(config=adapter.config, guard=adapter.guard, erase_seconds=round(erase_seconds, 3),
                      seconds=round(time.perf_counter() - started, 1), other_accuracy_drop=round(drop, 4),
                      bars_met={"canonical": result["canonical_rate"] <= BARS["canonical_rate_max"],
                                "synonyms": result["synonym_rate"] <= BARS["synonym_rate_max"],
                                "others": drop <= BARS["other_accuracy_drop_max"]})
        record["variants"][variant] = result
        logging.info("%s: canonical %.3f, synonyms %.3f, other accuracy drop %.3f", variant,
                     result["canonical_rate"], result["synonym_rate"], drop)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
