"""ESD-x and All-but-One erasing "circle" from tinyworld with the registry's tinyworld presets, judged by tinyworld's judge.

For the base model and each erased model: ``erasekit.tinyworld.eval.erasure`` (share of the concept's canonical
prompts and of its synonym prompts in which the judge still sees it; accuracy on the other shapes), the training
time, and the share of the concept's canonical prompts that the judge calls the replacement ("square").

    python benchmarks/esd_tinyworld.py                     # → benchmarks/esd_tinyworld.json
    python benchmarks/esd_tinyworld.py --seeds 0 1 --methods esd-x

Rerunning some ``--methods`` with the same concept and seeds keeps the other methods' entries in the file (the base
model's numbers must come out the same, as they do: generation is seeded); each entry records its ``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("esd_tinyworld.json")
BARS = {"canonical_rate_max": 0.10, "synonym_rate_max": 0.20, "other_accuracy_drop_max": 0.05,
        "abo_replacement_share_min": 0.70, "train_minutes_max": 15}


@contextlib.contextmanager
def applied(pipe, adapter):
    """The adapter on ``pipe`` for the block: ``erasekit.compose`` when present, else erasekit's training hooks."""
    try:
        from erasekit import compose
    except ImportError:
        compose = None
    if compose is not None:
        name = compose.load(pipe, adapter, name="bench")
        try:
            yield
        finally:
            compose.unload(pipe, name)
    else:
        from erasekit.core import lora

        with lora.applied(pipe.unet, adapter.deltas):
            yield


def replacement_share(pipe, judge, concept: str, replacement: str, seeds) -> float:
    """Share of the concept's canonical grid prompts whose image the judge labels ``replacement``."""
    from erasekit.generate import generate
    from erasekit.tinyworld import concept_attribute
    from erasekit.tinyworld.eval import standard_grid

    attribute = concept_attribute(concept)
    scenes = [s for s in standard_grid() if getattr(s, attribute) == concept]
    prompts = [s.prompt() for s in scenes for _ in seeds]
    images = generate(pipe, prompts, [sd for _ in scenes for sd in seeds], output_type="np", batch_size=96)
    labels = judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).labels(attribute)
    return sum(label == replacement for label in labels) / len(labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--replace-with", default="square")
    p.add_argument("--methods", nargs="+", default=["esd-x", "abo"], choices=["esd-x", "esd-x-strict", "esd-u", "abo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # CPU threads beyond the free cores slow torch down badly

    from erasekit import tinyworld
    from erasekit.core.provenance import run_record
    from erasekit.loading import load_pipeline
    from erasekit.methods import METHODS
    from erasekit.tinyworld.eval import erasure

    pipe = load_pipeline(None, device="cpu")
    judge = tinyworld.load_judge()
    seeds = tuple(args.seeds)
    base = erasure(pipe, judge, args.concept, seeds=seeds)
    base_share = replacement_share(pipe, judge, args.concept, args.replace_with, seeds)
    logging.info("base: %s, %s share %.3f", base.as_dict(), args.replace_with, base_share)
    record = {"concept": args.concept, "seeds": list(seeds), "bars": BARS,
              "base": base.as_dict() | {f"{args.replace_with}_share": base_share}, "methods": {}}
    old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if (old.get("concept"), old.get("seeds"), old.get("base")) == (record["concept"], record["seeds"], record["base"]):
        record["methods"] = {m: e for m, e in old["methods"].items() if m not in args.methods}  # the others' rows stay
    for method in args.methods:
        spec = METHODS[method]
        options = {"replace_with": args.replace_with} if method == "abo" else {}
        config = spec.make_config((args.concept,), tinyworld=True, **options)
        started = time.perf_counter()
        adapter = spec.erase(pipe, config)
        minutes = (time.perf_counter() - started) / 60
        with applied(pipe, adapter):
            result = erasure(pipe, judge, args.concept, seeds=seeds)
            share = replacement_share(pipe, judge, args.concept, args.replace_with, seeds)
        drop = base.other_accuracy - result.other_accuracy
        entry = {
            "config": adapter.config, "train_minutes": round(minutes, 2), "trainable_parameters": adapter.num_parameters,
            "erasure": result.as_dict(), "other_accuracy_drop": round(drop, 4), f"{args.replace_with}_share": share,
            "loss_first": adapter.info["training"]["loss_first"], "loss_last": adapter.info["training"]["loss_last"],
            "meets": {"canonical_rate": result.canonical_rate <= BARS["canonical_rate_max"],
                      "synonym_rate": result.synonym_rate <= BARS["synonym_rate_max"],
                      "other_accuracy_drop": drop <= BARS["other_accuracy_drop_max"],
                      "train_minutes": minutes <= BARS["train_minutes_max"]},
        }
        if method == "abo":
            entry["meets"]["replacement_share"] = share >= BARS["abo_replacement_share_min"]
        entry["run"] = record["run"] = run_record()
        record["methods"][method] = entry
        logging.info("%s: %s", method, json.dumps({k: v for k, v in entry.items() if k != "config"}))
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")  # after every method
    return 0


if __name__ == "__main__":
    sys.exit(main())
