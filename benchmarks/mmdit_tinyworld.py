"""UCE, RECE, ESD-x and SPM erasing "circle" from tinyworld-mmdit (Stable Diffusion 3's architecture), judged by
tinyworld's judge, against issue #25's bars.

For the base model and each erased model: ``erasekit.tinyworld.eval.erasure`` (share of the concept's canonical
prompts and of its synonym prompts in which the judge still sees it; accuracy on the other shapes), with the
registry's tinyworld-mmdit presets, and the erasure's time. Rows are written as they finish (rerun to resume: done
methods are kept).

    python benchmarks/mmdit_tinyworld.py                      # → benchmarks/mmdit_tinyworld.json
    python benchmarks/mmdit_tinyworld.py --methods uce --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("mmdit_tinyworld.json")
#: issue #25: UCE ≤ 10 % canonical, ≤ 30 % synonyms, ≤ 5 points; ESD-x and SPM ≤ 15 %, ≤ 5 points
BARS = {
    "uce": {"canonical_rate_max": 0.10, "synonym_rate_max": 0.30, "other_accuracy_drop_max": 0.05},
    "rece": {"canonical_rate_max": 0.10, "synonym_rate_max": 0.30, "other_accuracy_drop_max": 0.05},
    "esd-x": {"canonical_rate_max": 0.15, "synonym_rate_max": 1.0, "other_accuracy_drop_max": 0.05},
    "spm": {"canonical_rate_max": 0.15, "synonym_rate_max": 1.0, "other_accuracy_drop_max": 0.05},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--methods", nargs="+", default=["uce", "rece", "esd-x", "spm"], choices=sorted(BARS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    from erasekit import compose, tinyworld
    from erasekit.api import erase
    from erasekit.core.provenance import run_record
    from erasekit.core.sd import model_defaults
    from erasekit.loading import load_pipeline
    from erasekit.tinyworld.eval import erasure, meets_bars

    pipe = load_pipeline("tinyworld-mmdit", device="cpu")
    judge = tinyworld.load_judge(tinyworld.path("mmdit"))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    generation = model_defaults(pipe)  # what ``erasure`` generates with
    made = (results.get("concept"), results.get("seeds"), results.get("generation"))
    same = made == (args.concept, args.seeds, generation)
    rows = results.get("rows", {}) if same else {}  # rows made at other settings are not resumed
    results = {"concept": args.concept, "seeds": args.seeds, "model": "tinyworld-mmdit", "generation": generation,
               "bars": BARS, "rows": rows}

    def save():
        results["run"] = run_record()
        results["load_average"] = list(os.getloadavg())
        out.write_text(json.dumps(results, indent=1) + "\n")

    if "base" not in rows:
        rows["base"] = erasure(pipe, judge, args.concept, seeds=tuple(args.seeds)).as_dict()
        save()
    base_other = rows["base"]["other_accuracy"]
    for method in args.methods:
        if method in rows:
            continue
        started = time.perf_counter()
        adapter = erase(pipe, method, [args.concept])
        seconds = time.perf_counter() - started
        name = compose.load(pipe, adapter, name=method)
        try:
            row = erasure(pipe, judge, args.concept, seeds=tuple(args.seeds)).as_dict()
        finally:
            compose.unload(pipe, name)
        drop = base_other - row["other_accuracy"]
        row.update(erase_seconds=round(seconds, 1), other_accuracy_drop=drop, config=adapter.config,
                   meets_bars=meets_bars(row, drop, BARS[method]))
        rows[method] = row
        print(f"{method}: canonical {row['canonical_rate']:.3f} synonyms {row['synonym_rate']:.3f} "
              f"drop {drop * 100:.1f} pts ({seconds:.0f} s) {'meets' if row['meets_bars'] else 'MISSES'} the bars",
              flush=True)
        save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
