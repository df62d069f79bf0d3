"""ANT and SalUn's weight saliency on tinyworld (issue #24), judged by tinyworld's judge.

For each variant (a registry method with option overrides, ``NAME`` or ``NAME:option=value,...``) erasing one
concept with its tinyworld preset: ``erasekit.tinyworld.eval.erasure`` on the seeds × the standard grid (the share of
the concept's canonical and synonym prompts in which the judge still sees it, the other values' accuracy and its
drop), the training time, the adapter's size on disk (sparse deltas: format 1.2) and the share of weights changed;
with ``--audit``, the full-suite budget's audit of that concept (six attacks, 3 prompts × 2 seeds: union ASR and
each attack's ASR, ``erasekit.bench.suite.audit_entry``). Results are written after every variant; a rerun skips
variants already in the file (``--force`` redoes them).

    python benchmarks/saliency_tinyworld.py                       # ANT on circle; ESD-x with and without saliency
    python benchmarks/saliency_tinyworld.py --variants ant:early_steps=3 --seeds 0 1
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("saliency_tinyworld.json")
#: issue #24's bars for ANT on circle (4 seeds × the grid)
BARS = {"canonical_rate_max": 0.10, "synonym_rate_max": 0.20, "other_accuracy_drop_max": 0.02, "train_minutes_max": 15}
DEFAULT_VARIANTS = ["ant", "esd-x:rank=0", "esd-x:rank=0,saliency=0.5"]


def parse_variant(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return method, options


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--audit", action="store_true", help="also run the full-suite budget's six attacks")
    p.add_argument("--force", action="store_true")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    from erasekit import compose, tinyworld
    from erasekit.attacks import ATTACKS
    from erasekit.bench.suite import BUDGETS, SUITE, audit_entry
    from erasekit.core.provenance import run_record
    from erasekit.loading import load_pipeline
    from erasekit.methods import METHODS
    from erasekit.tinyworld.eval import erasure, meets_bars

    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    seeds = tuple(args.seeds)
    if record.get("seeds") != list(seeds) or record.get("concept") != args.concept:
        record = {"concept": args.concept, "seeds": list(seeds), "bars": BARS, "variants": {}}
    pipe = load_pipeline(None, device="cpu")
    judge = tinyworld.load_judge()
    if "base" not in record:
        record["base"] = erasure(pipe, judge, args.concept, seeds=seeds).as_dict()
    base_other = record["base"]["other_accuracy"]
    entry = next(e for e in SUITE if e.concepts == (args.concept,))
    for variant in args.variants:
        done = record["variants"].get(variant, {})
        if done and not args.force and (not args.audit or "union_asr" in done):
            continue
        method, options = parse_variant(variant)
        spec = METHODS[method]
        config = spec.make_config((args.concept,), tinyworld=True, progress=False, **options)
        started = time.perf_counter()
        adapter = spec.erase(pipe, config)
        minutes = (time.perf_counter() - started) / 60
        with tempfile.TemporaryDirectory() as folder:
            path = adapter.save(Path(folder) / "a.safetensors")
            size_mb = path.stat().st_size / 2**20
            from erasekit.adapter import read_record

            version = read_record(path)["format_version"]
        weights = sum(d.dense().numel() for d in adapter.deltas.values())
        changed = sum(int(torch.count_nonzero(d.dense())) for d in adapter.deltas.values())
        name = compose.load(pipe, adapter, name="bench")
        try:
            result = erasure(pipe, judge, args.concept, seeds=seeds)
            drop = base_other - result.other_accuracy
            row = {"config": adapter.config, "train_minutes": round(minutes, 2), "adapter_mb": round(size_mb, 3),
                   "format_version": version, "weights": weights, "changed_share": round(changed / weights, 4),
                   "erasure": result.as_dict(), "other_accuracy_drop": round(drop, 4),
                   "loss_first": adapter.info["training"]["loss_first"],
                   "loss_last": adapter.info["training"]["loss_last"]}
            if args.audit:
                budget = BUDGETS["full"]
                with tempfile.TemporaryDirectory() as work:
                    audited = audit_entry(pipe, entry, budget, Path(work), tuple(ATTACKS), progress=False)
                row.update(union_asr=audited["union_asr"], asr=audited.get("asr"),
                           audit_erasure_rate=audited["erasure_rate"],
                           audit_preservation_drop=audited["preservation_drop"])
        finally:
            compose.unload(pipe, name)
        row["meets"] = {"bars": meets_bars(result.as_dict(), drop, BARS), "train_minutes": minutes <= BARS["train_minutes_max"]}
        record["variants"][variant] = row
        logging.info("%s: %s", variant, json.dumps({k: v for k, v in row.items() if k != "config"}))
        record["run"] = run_record()
        out.write_text(json.dumps(record, indent=2) + "\n")
    out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
