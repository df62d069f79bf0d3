"""ESD-x erasing four tinyworld concepts at once (circle, square, red, striped: the bench's multi entry) with more
outer iterations than its 1-concept tinyworld preset, judged per concept by tinyworld's judge.

The full bench shows one set of trained-UNet defaults erasing 0–12 % of the four together; this measures whether a
larger budget is the missing piece. Each concept: ``erasekit.tinyworld.eval.erasure`` on the standard grid (share of
canonical and synonym prompts in which the judge still sees it; accuracy on the other values of its attribute).
One process per iteration count; results are merged into the JSON as each finishes.

    OMP_NUM_THREADS=1 python benchmarks/esd_x_multi_tinyworld.py --iterations 400 &
    OMP_NUM_THREADS=1 python benchmarks/esd_x_multi_tinyworld.py --iterations 1600   # → esd_x_multi_tinyworld.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("esd_x_multi_tinyworld.json")
CONCEPTS = ("circle", "square", "red", "striped")


def main() -> None:
    from erasekit import compose, erase
    from erasekit.core.provenance import run_record
    from erasekit.loading import load_pipeline
    from erasekit.tinyworld import load_judge
    from erasekit.tinyworld.eval import erasure

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe, judge = load_pipeline(None, device="cpu"), load_judge()
    t0 = time.time()
    adapter = erase(pipe, "esd-x", list(CONCEPTS), iterations=args.iterations)
    row = {"iterations": args.iterations, "erase_seconds": round(time.time() - t0, 1), "run": run_record()}
    name = compose.load(pipe, adapter)
    try:
        for concept in CONCEPTS:
            r = erasure(pipe, judge, concept, seeds=tuple(args.seeds))
            row[concept] = {"canonical_rate": r.canonical_rate, "synonym_rate": r.synonym_rate,
                            "other_accuracy": r.other_accuracy}
            print(concept, row[concept], flush=True)
    finally:
        compose.unload(pipe, name)
    data = json.loads(OUT.read_text()) if OUT.exists() else {"concepts": list(CONCEPTS), "rows": {}}
    data["rows"][str(args.iterations)] = row
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(OUT)


if __name__ == "__main__":
    main()
