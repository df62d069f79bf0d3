"""How often does a model draw a concept for prompts that do not name it? (issue #22 §2, docs/notes-robust.md)

P4D's successful prompts against the robust candidates are strings of tinyworld's own words that do not name the
concept. Whether such strings draw it by chance or only when searched for: 48 random strings of 3–12 of tinyworld's
colour, texture and background words (for a colour or a texture: its own names left out, the shape names added), and
48 random strings of 16 vocabulary tokens (fixed by ``--seed``), generated at each of ``--image-seeds`` on the base
model and with each adapter file loaded, judged by tinyworld's judge. Writes ``random_prompts_tinyworld.json``
(circle; another concept: ``random_prompts_tinyworld-<concept>.json``): counts per model and image seed, each file's
provenance.

    python benchmarks/random_prompts_tinyworld.py [--concept circle|red|striped|...] FILE.safetensors ...
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from erasekit import compose
from erasekit.adapter import read_record
from erasekit.core import sd
from erasekit.core.files import atomic_write
from erasekit.core.provenance import run_record
from erasekit.generate import generate
from erasekit.loading import load_pipeline
from erasekit.tinyworld import load_judge
from erasekit.tinyworld.world import ATTRIBUTES, COLOURS, SHAPES, TEXTURES, concept_attribute

OUT = Path(__file__).with_suffix(".json")  # circle's; another concept's: random_prompts_tinyworld-<concept>.json
WORDS = [w for names in [*COLOURS.values(), *TEXTURES.values()] for w in names] + [
    "black", "white", "dark", "background", "plain", "big", "small", "drawn", "night", "on", "a", "with"]


def words(concept: str) -> list[str]:
    """:data:`WORDS` for a shape; for a colour or a texture, without the names of ``concept`` and with the shapes'."""
    attribute = concept_attribute(concept)
    if attribute == "shape":
        return WORDS
    own = ATTRIBUTES[attribute][concept]
    return [w for w in WORDS if w not in own] + [w for names in SHAPES.values() for w in names]


def prompts(pipe, seed: int, concept: str = "circle") -> dict[str, list[str]]:
    rng = random.Random(seed)
    allowed = sd.allowed_token_ids(pipe).tolist()
    vocabulary = words(concept)
    return {"words": [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 12))) for _ in range(48)],
            "tokens": [pipe.tokenizer.decode([rng.choice(allowed) for _ in range(16)]) for _ in range(48)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--concept", choices=[*SHAPES, *COLOURS, *TEXTURES], default="circle")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    ap.add_argument("--image-seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe, judge = load_pipeline(None, device="cpu"), load_judge()
    sets = prompts(pipe, args.seed, args.concept)

    def count() -> dict:
        out = {}
        for image_seed in args.image_seeds:
            for kind, ps in sets.items():
                images = generate(pipe, ps, [image_seed] * len(ps), batch_size=96, output_type="np", progress=False)
                shows = judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).shows(args.concept)
                out[f"seed {image_seed}, {kind}"] = int(shows.sum())
        return out

    models = {"base": {"counts": count()}}
    for f in args.files:
        name = compose.load(pipe, f)
        models[Path(f).name] = {"counts": count(), "path": f, "info": read_record(f)["info"]}
        compose.unload(pipe, name)
    record = {"concept": args.concept, "prompts": sets, "per_set": 48, "models": models, "run": run_record()}
    out = OUT if args.concept == "circle" else OUT.with_name(f"{OUT.stem}-{args.concept}.json")
    atomic_write(out, (json.dumps(record, indent=1) + "\n").encode())
    for m, v in models.items():
        print(m, v["counts"])


if __name__ == "__main__":
    main()
