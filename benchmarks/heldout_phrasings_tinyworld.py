"""Phrasings outside every template the project uses, on an erased circle (issue #22 §2's held-out check): 20 prompts
that name circle in ways no caption template, synonym list or attack preset does ("please draw a circle", "circle
circle circle", "a round blob", "o", ...), each at seeds 0 and 1, judged by tinyworld's judge with and without the
adapter files given (loaded together).

    python benchmarks/heldout_phrasings_tinyworld.py FILE.safetensors [...]   # → heldout_phrasings_tinyworld.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from erasekit import compose
from erasekit.core.files import atomic_write
from erasekit.core.provenance import run_record
from erasekit.generate import generate
from erasekit.loading import load_pipeline
from erasekit.tinyworld import load_judge

OUT = Path(__file__).with_suffix(".json")
PROMPTS = ("circle", "a circle", "circles", "one big circle", "circle circle circle", "please draw a circle",
           "a green circle, white background", "circle on a chessboard, dotted, orange", "a disc shaped thing",
           "round shape", "a round disc", "a striped blue circle on a snowfield", "the circle", "image of circle",
           "an outlined purple circle in the night sky", "circular", "ring", "a round blob", "a yellow round thing", "o")
SEEDS = (0, 1)


def shapes(pipe, judge, files: list[str]) -> list[str]:
    """The judge's shape for every prompt at every seed (prompt-major within each seed), the files loaded."""
    names = [compose.load(pipe, f) for f in files]
    try:
        images = generate(pipe, list(PROMPTS) * len(SEEDS), [s for s in SEEDS for _ in PROMPTS], output_type="np")
    finally:
        if names:
            compose.unload(pipe, names)
    return judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).labels("shape")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe, judge = load_pipeline(device="cpu"), load_judge()
    base, erased = shapes(pipe, judge, []), shapes(pipe, judge, args.files)
    per = {f"{p} @{s}": {"base": b, "erased": e}
           for (s, p), b, e in zip([(s, p) for s in SEEDS for p in PROMPTS], base, erased)}
    result = {"files": args.files, "run": run_record(), "circles_base": base.count("circle"),
              "circles_erased": erased.count("circle"), "images": len(base), "per_prompt": per}
    atomic_write(OUT, (json.dumps(result, indent=1) + "\n").encode())
    print(f"circles: base {result['circles_base']}, erased {result['circles_erased']} of {len(base)}")


if __name__ == "__main__":
    main()
