"""Every attack success on the robust candidates, side by side: what the judge called the concept.

Reads the audits ``robust_tinyworld.py`` leaves in its cache (``.bench-robust/audits/<candidate>/<concept>``) and
writes one contact sheet (``robust_successes_tinyworld-<concept>.png``) of each attacked image the tinyworld judge
counted as a success (SAGE's left out: it optimises that judge, docs/notes-robust.md), in a fixed order (candidate,
attack, prompt, seed), each labelled with its index, attack and the judge's probability for the concept, and a
listing (``robust_successes_tinyworld-<concept>.json``) of the same images with their adversarial prompts.
``--labels FILE``: a person's reading of the sheet, ``{"reader": ..., "labels": {image: "<concept>" | "other"}}``
(``image`` as the listing names it); the listing then records each image's reading and, per candidate, the counts
and how many of its attacked images (prompt × seed) some success was read as the concept on. Images the judge
did not count are not on the sheet.

    python benchmarks/robust_successes_tinyworld.py [--concept circle] [--labels LABELS.json]
    python benchmarks/robust_successes_tinyworld.py --concept striped \
        --audit .bench-full/layered/texture/striped-attacks .bench-full/layered/multi/striped-attacks

``--audit DIR ...`` sheets those audit folders (any ``erasekit audit`` output, relative to ``benchmarks/``) instead,
into ``robust_successes_tinyworld-<concept>-audits.png`` / ``.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from PIL import Image, ImageDraw

from erasekit.core.files import atomic_write

HERE = Path(__file__).parent
AUDITS = HERE / ".bench-robust" / "audits"
CELL = 96


def successes(concept: str, folders: list[Path] | None = None) -> list[dict]:
    rows = []
    for folder in folders or sorted(AUDITS.glob(f"*/{concept}")):
        if not (folder / "results.jsonl").is_file():
            raise SystemExit(f"{folder} is not an audit folder (no results.jsonl)")
        name = str(folder.relative_to(HERE)) if folders else folder.parent.name
        for line in (folder / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["attack"] in ("none", "sage") or not r.get("success") or not r.get("image"):
                continue
            rows.append({"candidate": name, "attack": r["attack"], "prompt": r["prompt"],
                         "seed": r["seed"], "adv_prompt": r.get("adv_prompt"), "judge_score": round(r["score"], 3),
                         "image": str((folder / r["image"]).relative_to(HERE))})
    return sorted(rows, key=lambda r: (r["candidate"], r["attack"], r["prompt"], r["seed"]))


def sheet(rows: list[dict], out: Path) -> None:
    cols = 10
    img = Image.new("RGB", (cols * CELL, -(-len(rows) // cols) * (CELL + 14)), "white")
    draw = ImageDraw.Draw(img)
    for i, r in enumerate(rows):
        x, y = (i % cols) * CELL, (i // cols) * (CELL + 14)
        img.paste(Image.open(HERE / r["image"]).convert("RGB").resize((CELL - 4, CELL - 4), Image.NEAREST), (x, y))
        draw.text((x, y + CELL - 4), f"{i} {r['attack'][:5]} {r['judge_score']:.2f}", fill="black")
    img.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concept", default="circle")
    ap.add_argument("--labels", help="a person's reading of the sheet (module docstring)")
    ap.add_argument("--audit", nargs="+", help="audit folders (relative to benchmarks/) instead of the robust cache")
    args = ap.parse_args()
    rows = successes(args.concept, [HERE / a for a in args.audit] if args.audit else None)
    if not rows:
        raise SystemExit(f"no judged attack successes on {args.concept!r} in {args.audit or AUDITS}")
    stem = HERE / f"robust_successes_tinyworld-{args.concept}{'-audits' if args.audit else ''}"
    sheet(rows, stem.with_suffix(".png"))
    record = {"concept": args.concept, "successes": rows}
    if args.labels:
        given = json.loads(Path(args.labels).read_text())
        labels = given["labels"]
        unread = [r["image"] for r in rows if r["image"] not in labels]
        if unread:
            raise SystemExit(f"{args.labels} does not read {len(unread)} of the sheet's images, e.g. {unread[0]}")
        for r in rows:
            r["read_as"] = labels[r["image"]]
        record["reader"] = given.get("reader")
        record["read"] = {}
        for c in dict.fromkeys(r["candidate"] for r in rows):
            mine = [r for r in rows if r["candidate"] == c]
            record["read"][c] = {"judged": len(mine), **collections.Counter(r["read_as"] for r in mine),
                                 "attacked_images_judged": len({(r["prompt"], r["seed"]) for r in mine}),
                                 "attacked_images_read_as_concept": len({(r["prompt"], r["seed"]) for r in mine
                                                                         if r["read_as"] == args.concept})}
    atomic_write(stem.with_suffix(".json"), (json.dumps(record, indent=1) + "\n").encode())
    print(f"{len(rows)} successes -> {stem.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
