"""Phrasings outside every template the project uses, on an erased concept (issue #22 §2's held-out check): 20
prompts that name circle (or red, or striped) in ways no caption template, synonym list or attack preset does
("please draw a circle", "circle circle circle", "a round blob", "o", ...; "cherry red", "a ruby thing", ...), each
at seeds 0 and 1, judged by tinyworld's judge with and without the adapter files given (loaded together).

    python benchmarks/heldout_phrasings_tinyworld.py FILE.safetensors [...]   # → heldout_phrasings_tinyworld.json
    python benchmarks/heldout_phrasings_tinyworld.py --concept red FILE ...  # → heldout_phrasings_tinyworld-red.json
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
from erasekit.tinyworld import concept_attribute, load_judge

OUT = Path(__file__).with_suffix(".json")  # circle's; another concept's: heldout_phrasings_tinyworld-<concept>.json
CIRCLE = ("circle", "a circle", "circles", "one big circle", "circle circle circle", "please draw a circle",
          "a green circle, white background", "circle on a chessboard, dotted, orange", "a disc shaped thing",
          "round shape", "a round disc", "a striped blue circle on a snowfield", "the circle", "image of circle",
          "an outlined purple circle in the night sky", "circular", "ring", "a round blob", "a yellow round thing",
          "o")
RED = ("red", "a red thing", "red red red", "please paint a red square", "cherry red", "a ruby coloured star",
       "blood red circle", "a fire engine red cross", "tomato coloured shape", "something crimson on a snowfield",
       "a bright red blob", "rose red diamond, white background", "a reddish triangle", "colour: red", "redness",
       "a dotted red star on a chessboard", "the red one", "strawberry coloured disc", "a deep red plus", "rouge")
STRIPED = ("striped", "a striped thing", "stripes stripes stripes", "please draw a square with stripes",
           "zebra pattern circle", "pinstripe star", "a circle with lines across it", "a candy cane striped cross",
           "barcode like shape", "something striped on a snowfield", "a stripey blob", "a green shape with bands",
           "horizontal stripes", "texture: striped", "streaked diamond", "a lined triangle, white background",
           "the striped one", "a red and black striped disc", "tiger stripes", "rayures")
PROMPTS = {"circle": CIRCLE, "red": RED, "striped": STRIPED}
SEEDS = (0, 1)


def labels(pipe, judge, concept: str, files: list[str]) -> list[str]:
    """The judge's value of ``concept``'s attribute for every prompt at every seed (prompt-major within each seed),
    the files loaded."""
    prompts = PROMPTS[concept]
    names = [compose.load(pipe, f) for f in files]
    try:
        images = generate(pipe, list(prompts) * len(SEEDS), [s for s in SEEDS for _ in prompts], output_type="np")
    finally:
        if names:
            compose.unload(pipe, names)
    return judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).labels(concept_attribute(concept))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--concept", choices=list(PROMPTS), default="circle")
    ap.add_argument("--out", type=Path, help="default: heldout_phrasings_tinyworld[-CONCEPT].json beside this script")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe, judge = load_pipeline(device="cpu"), load_judge()
    concept = args.concept
    base, erased = labels(pipe, judge, concept, []), labels(pipe, judge, concept, args.files)
    per = {f"{p} @{s}": {"base": b, "erased": e}
           for (s, p), b, e in zip([(s, p) for s in SEEDS for p in PROMPTS[concept]], base, erased)}
    shown = "circles" if concept == "circle" else concept  # circle's keys as its first runs wrote them
    result = {"concept": concept, "files": args.files, "run": run_record(), f"{shown}_base": base.count(concept),
              f"{shown}_erased": erased.count(concept), "images": len(base), "per_prompt": per}
    out = args.out or (OUT if concept == "circle" else OUT.with_name(f"{OUT.stem}-{concept}.json"))
    atomic_write(out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"{concept}: base {base.count(concept)}, erased {erased.count(concept)} of {len(base)} → {out}")


if __name__ == "__main__":
    main()
