"""TRCE erasing a shape, a colour and a texture from tinyworld: stage 1 alone, stage 2 alone and both, judged by
tinyworld's judge.

Protocol: each concept is given as its canonical word and erased with the registry's tinyworld preset
(``MethodSpec.tinyworld``; tinyworld's data from ``methods.presets``: caption templates, the siblings preserved,
the first not-erased sibling as the safe concept, every synonym but the last as implied terms), ``stages`` set per
row. Measured on 4 seeds × the standard grid (``erasekit.tinyworld.eval.erasure``): the share of the concept's
canonical prompts in which the judge still sees it; the same through each synonym, split into the synonyms
training used and the held-out last one; through tinyworld's held-out phrasings (``HELDOUT_TEMPLATES``, never in
tinyworld's training nor in TRCE's templates, canonical name); the accuracy drop on the attribute's other values
against the base model's; and the share of the concept's canonical prompts the judge labels as the safe concept.
Rows are written after each one (rerunning skips rows already in the file). ``--settings paper_loss`` runs the
trained rows with the paper's stage-2 loss alone (``preserve_weight`` 0 instead of the preset's 100); rows carry
``"settings"``. ``--perf`` adds stage 1's erase time on SD 1.5's shapes (random weights, as ``erasekit bench perf``'s
closed-form case).

    python benchmarks/trce_tinyworld.py                           # → benchmarks/trce_tinyworld.json
    python benchmarks/trce_tinyworld.py --concepts circle --variants both --seeds 0 1
    python benchmarks/trce_tinyworld.py --settings paper_loss --variants stage2 both
    python benchmarks/trce_tinyworld.py --perf --concepts         # the SD 1.5 timing only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("trce_tinyworld.json")
BARS = {"canonical_rate_max": 0.10, "synonym_rate_max": 0.20, "other_accuracy_drop_max": 0.02}
CONCEPTS = ("circle", "red", "striped")
VARIANTS = {"stage1": ("cross_attention",), "stage2": ("early_steps",), "both": ("cross_attention", "early_steps")}
#: options over the registry's tinyworld preset, per setting
SETTINGS = {"tinyworld": {}, "paper_loss": {"preserve_weight": 0.0}}


def phrasing_rate(pipe, judge, concept: str, seeds) -> float:
    """Share of the concept's grid scenes, prompted in tinyworld's held-out templates, where the judge sees it."""
    from erasekit.generate import generate
    from erasekit.tinyworld import HELDOUT_TEMPLATES, concept_attribute
    from erasekit.tinyworld.eval import standard_grid

    attribute = concept_attribute(concept)
    prompts = [s.prompt(t) for s in standard_grid() if getattr(s, attribute) == concept for t in HELDOUT_TEMPLATES]
    images = generate(pipe, [p for p in prompts for _ in seeds], [sd for _ in prompts for sd in seeds],
                      output_type="np", batch_size=96)
    shows = judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).shows(concept).tolist()
    return sum(shows) / len(shows)


def label_share(pipe, judge, concept: str, label: str, seeds) -> float:
    """Share of the concept's canonical grid prompts whose image the judge labels ``label``."""
    from erasekit.generate import generate
    from erasekit.tinyworld import concept_attribute
    from erasekit.tinyworld.eval import standard_grid

    attribute = concept_attribute(concept)
    prompts = [s.prompt() for s in standard_grid() if getattr(s, attribute) == concept]
    images = generate(pipe, [p for p in prompts for _ in seeds], [sd for _ in prompts for sd in seeds],
                      output_type="np", batch_size=96)
    labels = judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).labels(attribute)
    return sum(x == label for x in labels) / len(labels)


def measure(pipe, judge, concept: str, seeds, safe: str, trained: tuple[str, ...]) -> dict:
    from erasekit.tinyworld.eval import erasure

    r = erasure(pipe, judge, concept, seeds=seeds).as_dict()
    held = [w for w in r["synonym_rates"] if w not in trained]
    return {**r, "trained_synonyms": list(trained), "heldout_synonyms": held,
            "heldout_synonym_rate": sum(r["synonym_rates"][w] for w in held) / max(1, len(held)),
            "heldout_phrasing_rate": phrasing_rate(pipe, judge, concept, seeds),
            "safe_share": label_share(pipe, judge, concept, safe, seeds) if safe else None}


def sd15_stage1_seconds(repeats: int = 3) -> dict:
    """Stage 1 alone on SD 1.5's shapes (attn2 k/v random, the rest zero: erase reads nothing else): 1 concept in
    the reference's 15 templates; 20 concepts (the reference's concept count, 300 pairs) with 100 preserve prompts."""
    from erasekit.api import erase
    from erasekit.bench.perf.closed_form import build_pipe, prompts, timed

    pipe = build_pipe("sd15", True, "cpu", torch.float32)
    concepts, preserve = prompts()
    out = {}
    stage1 = ("cross_attention",)
    for name, run, n in (("1_concept", lambda: erase(pipe, "trce", ["crimson disc"], stages=stage1), repeats),
                         ("20_concepts_100_preserve",
                          lambda: erase(pipe, "trce", concepts[:20], preserve=preserve[:100], stages=stage1), 1)):
        result = timed(run, n)
        adapter = result.pop("_result")
        out[name] = {**result, **{k: adapter.info["cross_attention"][k] for k in ("rank", "erase_keys",
                                                                                 "preserve_prompts")}}
        print(name, out[name], flush=True)
    return {"model": "sd15 UNet + CLIP ViT-L (random weights, float32, cpu)", "results": out,
            "torch_threads": torch.get_num_threads(), "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="*", default=list(CONCEPTS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--settings", choices=tuple(SETTINGS), default="tinyworld",
                        help="the registry's tinyworld preset, or the paper's stage-2 loss alone (SETTINGS)")
    parser.add_argument("--perf", action="store_true", help="also time stage 1 on SD 1.5's shapes")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # CPU threads beyond the free cores slow torch down badly

    import erasekit
    from erasekit import compose, tinyworld
    from erasekit.core.provenance import run_record
    from erasekit.methods.presets import resolve
    from erasekit.tinyworld.eval import meets_bars

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"bars": BARS, "rows": []}
    data["run"] = run_record()
    done = {(r["variant"], r["concept"], r.get("settings", "tinyworld")) for r in data["rows"]}

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(out)

    if args.perf:
        data["sd15_stage1_erase"] = sd15_stage1_seconds()
        save()
    if not args.concepts:
        return 0
    pipe = erasekit.load_pipeline()
    judge = tinyworld.load_judge()
    seeds = tuple(args.seeds)
    for concept in args.concepts:
        resolved = resolve("trce", pipe, {}, (concept,))
        safe, trained = resolved.safe[0], resolved.implied
        if ("base", concept, "tinyworld") not in done:
            data["rows"].append({"variant": "base", **measure(pipe, judge, concept, seeds, safe, trained)})
            save()
        base = next(r for r in data["rows"] if r["variant"] == "base" and r["concept"] == concept)
        for variant in args.variants:
            if (variant, concept, args.settings) in done:
                continue
            started = time.perf_counter()
            adapter = erasekit.erase(pipe, "trce", [concept], stages=VARIANTS[variant], progress=False,
                                     **SETTINGS[args.settings])
            seconds = time.perf_counter() - started
            name = compose.load(pipe, adapter, name="bench")
            try:
                r = measure(pipe, judge, concept, seeds, safe, trained)
            finally:
                compose.unload(pipe, name)
            drop = base["other_accuracy"] - r["other_accuracy"]
            training = adapter.info.get("training", {})
            if args.settings != "tinyworld":
                r["settings"] = args.settings
            r.update(variant=variant, erase_seconds=round(seconds, 2), other_accuracy_drop=round(drop, 4),
                     stage1_seconds=adapter.info.get("cross_attention", {}).get("seconds"),
                     loss_first=training.get("loss_first"), loss_last=training.get("loss_last"),
                     config={k: v for k, v in adapter.config.items() if k not in ("concepts", "templates")},
                     load_average=[round(x, 2) for x in os.getloadavg()],
                     meets_bars=meets_bars(r, drop, BARS))
            data["rows"].append(r)
            save()
            print(f"{args.settings:10s} {variant:6s} {concept:8s} canonical {r['canonical_rate']:.3f} "
                  f"synonyms {r['synonym_rates']} phrasings {r['heldout_phrasing_rate']:.3f} drop {drop:+.3f} ({seconds:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
