"""Continual unlearning on tinyworld: circle, then red, then striped, then square, judged after every step.

Two rows, both with the registry's tinyworld presets:

* ``duge``: each step continues the previous one (``continue_from``); the last adapter alone holds every erasure;
* ``esd-x-stacked`` (the baseline): one ESD-x adapter per concept, each trained on the base model, the first k
  composed (``erasekit.compose``) after step k.

After each step, on tinyworld's standard grid (every shape × colour × texture on black, ``seeds`` per prompt):
for every concept erased so far, the share of its canonical prompts (and of its synonym prompts) in which the judge
still sees it; for every attribute an erased concept belongs to, the judge's accuracy on the scenes whose value of
that attribute is *not* erased and that show no erased concept at all, against the base model's on the same scenes
(the drop; ``kept``), as the bench's multi-concept entry measures preservation: once square is erased, "a blue
square" rightly changes, and its colour is no kept value to judge. ``kept_every_scene`` also counts the scenes that
show an erased concept of another attribute (the first version's measure). The issue's bars: every erased concept
≥ 90 % erased (canonical rate ≤ 10 %), the non-erased values lose ≤ 5 points.

The JSON is written after every step; a rerun resumes (steps already in the JSON are kept; DUGE's next step needs
the previous step's adapter in ``--work-dir``).

    OMP_NUM_THREADS=1 nice python benchmarks/continual_tinyworld.py          # → benchmarks/continual_tinyworld.json
    python benchmarks/continual_tinyworld.py --rows duge --seeds 0
    python benchmarks/continual_tinyworld.py --rows esd-x-stacked --rejudge   # the saved adapters, judged again

Known issue (2026-12-03): judged in the process that had made the ``duge`` row, the ``esd-x-stacked`` adapters
showed circle in 14.6 % (step 1) and 35.4 % (step 2) of its prompts; the same files judged in a fresh process, and
the first version's run, 2.1 % and 2.1 %. Not reproduced in isolation (train, load, judge, unload sequences of both
methods in one process judge alike), so that row is judged again in a fresh process (``--rejudge``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("continual_tinyworld.json")
SEQUENCE = ("circle", "red", "striped", "square")
BARS = {"canonical_rate_max": 0.10, "kept_accuracy_drop_max": 0.05, "train_minutes_max": 15}
ROWS = ("duge", "esd-x-stacked")


def judge_grid(pipe, judge, concepts, seeds) -> dict:
    """The judge on the standard grid, canonically prompted, and on each concept's scenes under its synonyms.

    Returns ``{"correct": {attribute: [bool per image]}, "scenes": [scene per image], "shows": {concept: canonical
    rate}, "synonyms": {concept: synonym rate}}``.
    """
    from erasekit.generate import generate
    from erasekit.tinyworld import concept_attribute
    from erasekit.tinyworld.eval import standard_grid
    from erasekit.tinyworld.world import ATTRIBUTES, canonical

    grid = standard_grid()
    scenes, prompts, synonym_of = list(grid), [s.prompt() for s in grid], [None] * len(grid)
    for concept in concepts:
        attribute, name = concept_attribute(concept), canonical(concept)
        for word in ATTRIBUTES[attribute][name][1:]:
            target = [s for s in grid if getattr(s, attribute) == name]
            scenes += target
            prompts += [s.prompt(names={attribute: word}) for s in target]
            synonym_of += [concept] * len(target)
    flat_prompts = [p for p in prompts for _ in seeds]
    flat_seeds = [sd for _ in prompts for sd in seeds]
    images = generate(pipe, flat_prompts, flat_seeds, batch_size=96, output_type="np", progress=False)
    judgement = judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    flat_scenes = [s for s in scenes for _ in seeds]
    flat_synonym = [c for c in synonym_of for _ in seeds]
    n = len(grid) * len(seeds)
    out = {"scenes": flat_scenes[:n], "correct": {}, "shows": {}, "synonyms": {}}
    for attribute in ATTRIBUTES:
        labels = judgement.labels(attribute)
        out["correct"][attribute] = [l == getattr(s, attribute) for l, s in zip(labels[:n], flat_scenes[:n])]
    for concept in concepts:
        attribute, name = concept_attribute(concept), canonical(concept)
        shows = judgement.shows(name).tolist()
        canon = [shows[i] for i in range(n) if getattr(flat_scenes[i], attribute) == name]
        syn = [shows[i] for i in range(n, len(shows)) if flat_synonym[i] == concept]
        out["shows"][concept] = sum(canon) / len(canon)
        out["synonyms"][concept] = sum(syn) / max(1, len(syn))
    return out


def kept_accuracy(result: dict, attribute: str, erased, clean: bool = True) -> float:
    """The judge's accuracy on ``attribute`` over the grid's images whose value of it is not erased; ``clean``:
    only those that show no erased concept at all (of any attribute), as the bench's multi-concept entry measures
    preservation (erasing square rightly changes "a blue square", so its colour is no preserved value there)."""
    from erasekit.tinyworld import concept_attribute
    from erasekit.tinyworld.world import ATTRIBUTES, canonical

    erased_values = {(concept_attribute(c), canonical(c)) for c in erased}
    looked_at = tuple(ATTRIBUTES) if clean else (attribute,)
    pairs = [(ok, s) for ok, s in zip(result["correct"][attribute], result["scenes"])
             if not any((a, getattr(s, a)) in erased_values for a in looked_at)]
    return sum(ok for ok, _ in pairs) / max(1, len(pairs))


def step_entry(result: dict, base: dict, erased, train_minutes: float) -> dict:
    """A step's judged fields: the erased concepts' rates, the kept values' drops (both measures) and the bars."""
    from erasekit.tinyworld import concept_attribute

    attributes = sorted({concept_attribute(c) for c in erased})
    drops = {}
    for measure, clean in (("kept", True), ("kept_every_scene", False)):
        drops[measure] = {}
        for attribute in attributes:
            now, before = (kept_accuracy(r, attribute, erased, clean) for r in (result, base))
            drops[measure][attribute] = {"accuracy": round(now, 4), "base": round(before, 4),
                                         "drop": round(before - now, 4)}
    rates = {c: {"canonical_rate": round(result["shows"][c], 4), "synonym_rate": round(result["synonyms"][c], 4)}
             for c in erased}
    meets = (all(r["canonical_rate"] <= BARS["canonical_rate_max"] for r in rates.values())
             and all(k["drop"] <= BARS["kept_accuracy_drop_max"] for k in drops["kept"].values())
             and train_minutes <= BARS["train_minutes_max"])
    return {"erased": rates, **drops, "meets": meets}


def judge_step(pipe, judge, work: Path, row: str, sequence: list[str], k: int, seeds) -> dict:
    """:func:`judge_grid` after step ``k + 1`` of ``row``: DUGE's last adapter alone, or the first k + 1 ESD-x adapters
    composed; unloaded after."""
    from erasekit import compose

    layers = [work / f"{row}-{k + 1}-{sequence[k]}.safetensors"] if row == "duge" else [
        work / f"{row}-{i + 1}-{c}.safetensors" for i, c in enumerate(sequence[:k + 1])]
    names = [compose.load(pipe, str(layer), name=f"step{i}") for i, layer in enumerate(layers)]
    try:
        return judge_grid(pipe, judge, sequence[:k + 1], seeds)
    finally:
        compose.unload(pipe, names)


def markdown(record: dict) -> str:
    """The JSON as a table: one line per row and step (``--table``)."""
    lines = ["| row | step | erased so far: seen, canonical (synonyms) | kept values' accuracy drop | train time | bars |",
             "|---|---|---|---|---|---|"]
    for row, data in record.get("rows", {}).items():
        for s in data["steps"]:
            seen = ", ".join(f"{c} {100 * r['canonical_rate']:.1f} % ({100 * r['synonym_rate']:.1f} %)"
                             for c, r in s["erased"].items())
            kept = ", ".join(f"{a} {100 * k['drop']:.1f} pts" for a, k in s["kept"].items())
            lines.append(f"| {row} | {s['step']}: {s['concept']} | {seen} | {kept} | {s['train_minutes']:.1f} min | "
                         f"{'✓' if s['meets'] else '✗'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequence", nargs="+", default=list(SEQUENCE))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--work-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "erasekit-continual"),
                   help="where the adapters of the steps are kept (for resuming)")
    p.add_argument("--table", action="store_true", help="print the JSON as a markdown table and exit")
    p.add_argument("--rejudge", action="store_true",
                   help="judge the rows' saved adapters again in this process (no training) and replace the judged "
                        "fields of their steps")
    args = p.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    from erasekit import tinyworld
    from erasekit.core.provenance import run_record
    from erasekit.loading import load_pipeline
    from erasekit.methods import METHODS

    pipe = load_pipeline(None, device="cpu")
    judge = tinyworld.load_judge()
    seeds, sequence, work = tuple(args.seeds), list(args.sequence), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    if record.get("sequence") != sequence or record.get("seeds") != list(seeds):
        record = {"sequence": sequence, "seeds": list(seeds), "bars": BARS, "rows": {}}

    def save():
        record["run"] = run_record() | {"load_average": list(os.getloadavg())}
        out.write_text(json.dumps(record, indent=2) + "\n")

    base = judge_grid(pipe, judge, sequence, seeds)
    record["base"] = {c: {"canonical_rate": base["shows"][c], "synonym_rate": base["synonyms"][c]} for c in sequence}
    if args.rejudge:
        for row in args.rows:
            steps = record["rows"].get(row, {}).get("steps", [])
            for k, step in enumerate(steps):
                result = judge_step(pipe, judge, work, row, sequence, k, seeds)
                step.update(step_entry(result, base, sequence[:k + 1], step["train_minutes"]),
                            judged="again, in a fresh process")
                logging.info("%s step %d judged again: %s", row, k + 1, json.dumps(step["erased"]))
                save()
        return 0
    for row in args.rows:
        steps = record["rows"].setdefault(row, {"steps": []})["steps"]
        method = "duge" if row == "duge" else "esd-x"
        spec = METHODS[method]
        for k, concept in enumerate(sequence):
            path = work / f"{row}-{k + 1}-{concept}.safetensors"
            if k < len(steps) and path.exists():
                continue  # done in an earlier run
            del steps[k:]
            options = {"continue_from": str(work / f"{row}-{k}-{sequence[k - 1]}.safetensors")} if (
                row == "duge" and k) else {}
            config = spec.make_config((concept,), tinyworld=True, **options)
            started = time.perf_counter()
            adapter = spec.erase(pipe, config)
            minutes = (time.perf_counter() - started) / 60
            adapter.save(path)
            result = judge_step(pipe, judge, work, row, sequence, k, seeds)
            entry = {"step": k + 1, "concept": concept, "train_minutes": round(minutes, 2),
                     "iterations": config.iterations, "loss_first": adapter.info["training"]["loss_first"],
                     "loss_last": adapter.info["training"]["loss_last"], "adapter_concepts": list(adapter.concepts),
                     "parameters": adapter.num_parameters,
                     "config": {k: v for k, v in adapter.config.items() if k != "templates"},
                     **step_entry(result, base, sequence[:k + 1], minutes)}
            steps.append(entry)
            logging.info("%s step %d (%s): %s", row, k + 1, concept, json.dumps(entry))
            save()
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
