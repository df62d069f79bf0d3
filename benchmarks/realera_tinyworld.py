"""RealEra against UCE on tinyworld: does mining neighbour concepts lower what leaks through other phrasings, at
matched preservation?

Protocol (issue 23). Each concept (circle, red, striped) is erased by UCE and by RealEra under three settings, the
same for both methods: ``tinyworld`` (the registry's tinyworld presets: UCE's keys, templates, siblings preserved,
values pushed past the guide, η = 1, each concept guided to its nearest sibling; RealEra adds its mining,
beyond-concept samples and LoRA), ``guide-empty`` (the same with the guide "", the presets before 2026-12-04) and
``replace`` (the guide "" with the papers' replace target, η = 0, under which UCE leaves more of a concept). Every row is judged by tinyworld's
judge on

* the erasure protocol (``erasekit.tinyworld.eval.erasure``, 4 seeds × the standard grid): the share of the concept's
  canonical prompts and of its synonym prompts in which the judge still sees it, and the drop in accuracy on the
  attribute's other values against the base model (matched preservation: a drop of at most 2 points);
* held-out phrasings: ``HELDOUT_PHRASINGS``, written here and used by no template of the project (checked at start
  against the world's training, held-out and canonical templates, UCE's and TIME's presets and few-shot's
  templates), each filled with every name of the concept on every third grid scene, 2 seeds;
* the paraphrase attack (``erasekit.attacks``, ``paraphrase``, tinyworld preset: the concept's names in the world's
  training and held-out templates, stopping at the first success) on 4 canonical prompts × 2 seeds: the attack
  success rate, pre-attack successes counted.

Rows are written after each is done (rerunning skips rows already in the file). The SD 1.5 closed-form erase time
is measured by ``erasekit.bench.perf.closed_form`` (its ``realera_closed_form_*`` cases, beside UCE's);
``--sd15-perf`` copies such a run's UCE and RealEra cases into this file.

    python benchmarks/realera_tinyworld.py                          # writes realera_tinyworld.json beside it
    python benchmarks/realera_tinyworld.py --settings tinyworld --concepts circle
    python -m erasekit.bench.perf.closed_form --zero-init --out /tmp/perf.json
    python benchmarks/realera_tinyworld.py --sd15-perf /tmp/perf.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("realera_tinyworld.json")
CONCEPTS = ("circle", "red", "striped")
#: the issue's bars on circle (RealEra, tinyworld presets) and the matched-preservation limit of the comparison
BARS = {"canonical_rate_max": 0.10, "synonym_rate_max": 0.20, "other_accuracy_drop_max": 0.02}
#: options over the registry's tinyworld presets, per setting (the same for both methods): ``tinyworld``, the presets
#: themselves (each concept guided to its nearest sibling under the text encoder); ``guide-empty``, the guide "" (the
#: presets before 2026-12-04); ``replace``, the guide "" with the papers' replace target
SETTINGS = {"tinyworld": {"guide_related": True, "guide_choice": "nearest"}, "guide-empty": {"guide_related": False},
            "replace": {"negative_guidance": 0.0, "guide_related": False}}
#: the rows' methods: registry name and options; "realera-closed-form" is RealEra without its LoRA (an ablation)
METHODS = {"uce": ("uce", {}), "realera": ("realera", {"progress": False}),
           "realera-closed-form": ("realera", {"iterations": 0})}
#: phrasings of a scene that no template of the project uses (the world's are in erasekit/tinyworld/world.py)
HELDOUT_PHRASINGS = (
    "{colour} {texture} {shape} in the scene, {background}",
    "the {shape} is {colour} and {texture}, on a {background}",
    "one big {texture} {colour} {shape} with a {background}",
    "art showing a small {shape}, {colour}, {texture}, {background}",
    "{background} and one {texture} {shape} that is {colour}",
    "an object: {texture} {colour} {shape}, {background}",
    "a very {colour} {shape} in {texture} style by a {background}",
    "scene of a {shape} with {colour} {texture} over the {background}",
)
HELDOUT_SEEDS = (0, 1)
ATTACK_PROMPTS = 4
ATTACK_SEEDS = (0, 1)


def project_templates() -> list[str]:
    """Every prompt template of the project, as "{attribute}" / "{}" patterns."""
    from erasekit.methods import fewshot, text
    from erasekit.tinyworld import world

    return (list(world.TRAIN_TEMPLATES) + list(world.HELDOUT_TEMPLATES) + [world.CANONICAL_TEMPLATE]
            + [t for preset in text.PRESETS.values() for t in preset] + list(text.TIME_TEMPLATES)
            + [t for name in dir(fewshot) if name.endswith("TEMPLATES") for t in getattr(fewshot, name)])


def check_phrasings() -> None:
    """No held-out phrasing is a project template, nor fills to a prompt any project template fills to."""
    from erasekit.tinyworld.world import fill_template

    words = {"shape": "circle", "colour": "red", "texture": "striped", "background": "black background"}
    theirs = set()
    for t in project_templates():
        theirs.add(" ".join(t.split()))
        theirs.add(fill_template(t, words) if "{shape}" in t else t.replace("{}", "red striped circle"))
    for phrasing in HELDOUT_PHRASINGS:
        if phrasing in theirs or phrasing.format(**words) in theirs:
            raise SystemExit(f"held-out phrasing {phrasing!r} coincides with a project template")


def heldout_rate(pipe, judge, concept: str) -> tuple[float, int]:
    """The share of held-out-phrasing prompts (every name of the concept, every third grid scene showing it,
    ``HELDOUT_SEEDS``) in which the judge sees the concept."""
    from erasekit.generate import generate
    from erasekit.tinyworld.eval import standard_grid
    from erasekit.tinyworld.world import ATTRIBUTES, concept_attribute

    attribute = concept_attribute(concept)
    prompts = []
    for scene in [s for s in standard_grid() if getattr(s, attribute) == concept][::3]:
        words = {a: ATTRIBUTES[a][getattr(scene, a)][0] for a in ATTRIBUTES}
        prompts += [p.format(**{**words, attribute: name}) for p in HELDOUT_PHRASINGS
                    for name in ATTRIBUTES[attribute][concept]]
    images = generate(pipe, [p for p in prompts for _ in HELDOUT_SEEDS],
                      [s for _ in prompts for s in HELDOUT_SEEDS], batch_size=96, output_type="np")
    shows = judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).shows(concept).tolist()
    return sum(shows) / len(shows), len(shows)


def paraphrase_asr(pipe, judge, concept: str) -> tuple[float, int]:
    """The paraphrase attack's success rate on ``ATTACK_PROMPTS`` canonical prompts × ``ATTACK_SEEDS``."""
    from erasekit import attacks, judges
    from erasekit.audit.prompts import subsample, tinyworld_prompts

    judge = judges.load("tinyworld", concept, judge=judge)
    results = [attacks.run("paraphrase", pipe, prompt, judge, preset="tinyworld", seed=seed)
               for prompt in subsample(tinyworld_prompts(concept), ATTACK_PROMPTS) for seed in ATTACK_SEEDS]
    return sum(r.success for r in results) / len(results), len(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--sd15-perf", help="a closed_form perf JSON whose UCE and RealEra cases to record")
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU threads beyond the free cores slow torch down badly
    check_phrasings()

    import erasekit
    from erasekit import compose, tinyworld
    from erasekit.core.provenance import run_record
    from erasekit.tinyworld.eval import erasure, meets_bars

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"bars": BARS, "rows": []}
    if args.sd15_perf:
        perf = json.loads(Path(args.sd15_perf).read_text())
        data["sd15_closed_form_perf"] = {k: perf[k] for k in ("model", "run", "unet_init", "results", "cpu_count",
                                                               "load_average_before", "load_average_after", "note")}
        save(data, out)
        return
    data.update(run=run_record(), heldout_phrasings=list(HELDOUT_PHRASINGS))
    done = {(r["method"], r["concept"], r["settings"]) for r in data["rows"]}
    pipe = erasekit.load_pipeline()
    judge = tinyworld.load_judge()
    seeds = tuple(args.seeds)

    def measure(concept: str) -> dict:
        r = erasure(pipe, judge, concept, seeds=seeds).as_dict()
        r["heldout_rate"], r["heldout_images"] = heldout_rate(pipe, judge, concept)
        r["paraphrase_asr"], r["paraphrase_attacks"] = paraphrase_asr(pipe, judge, concept)
        return r

    for concept in args.concepts:
        if ("base", concept, "-") not in done:
            data["rows"].append({"method": "base", "settings": "-", **measure(concept)})
            save(data, out)
    base = {r["concept"]: r for r in data["rows"] if r["method"] == "base"}
    for setting in args.settings:
        for concept in args.concepts:
            for method in args.methods:
                if (method, concept, setting) in done:
                    continue
                started = time.perf_counter()
                registered, options = METHODS[method]
                adapter = erasekit.erase(pipe, registered, [concept], **SETTINGS[setting], **options)
                seconds = time.perf_counter() - started
                name = compose.load(pipe, adapter, name="bench")
                try:
                    r = measure(concept)
                finally:
                    compose.unload(pipe, name)
                drop = base[concept]["other_accuracy"] - r["other_accuracy"]
                r.update(method=method, settings=setting, erase_seconds=round(seconds, 2),
                         other_accuracy_drop=round(drop, 4), load_average=round(os.getloadavg()[0], 2),
                         config={k: v for k, v in adapter.config.items() if k != "concepts"},
                         info={k: v for k, v in adapter.info.items() if k in ("rank", "erase_keys", "preserve_keys",
                                                                              "training", "closed_form_seconds")},
                         matched_preservation=bool(drop <= BARS["other_accuracy_drop_max"]))
                if method == "realera" and setting == "tinyworld" and concept == "circle":
                    r["meets_bars"] = meets_bars(r, drop, BARS)
                data["rows"].append(r)
                save(data, out)
                print(f"{setting:9s} {method:7s} {concept:8s} canonical {r['canonical_rate']:.3f} synonyms "
                      f"{r['synonym_rate']:.3f} held-out {r['heldout_rate']:.3f} paraphrase ASR "
                      f"{r['paraphrase_asr']:.3f} drop {drop:+.3f} ({seconds:.1f} s)", flush=True)
    data["comparison"] = compare(data["rows"])
    save(data, out)


def save(data: dict, out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out)


def compare(rows: list[dict]) -> list[dict]:
    """Per setting, concept and RealEra row: its leak minus UCE's on each measure (negative = RealEra leaks less),
    and whether both held the other values within the matched-preservation limit."""
    by = {(r["method"], r["concept"], r["settings"]): r for r in rows}
    out = []
    for (method, concept, setting), r in sorted(by.items()):
        other = by.get(("uce", concept, setting))
        if not method.startswith("realera") or other is None:
            continue
        diff = {k: round(r[k] - other[k], 4) for k in ("canonical_rate", "synonym_rate", "heldout_rate",
                                                       "paraphrase_asr")}
        out.append({"method": method, "concept": concept, "settings": setting, "minus_uce": diff,
                    "matched_preservation": bool(r["matched_preservation"] and other["matched_preservation"]),
                    "realera_leaks_less": {k: v < 0 for k, v in diff.items() if k != "canonical_rate"}})
    return out


if __name__ == "__main__":
    main()
