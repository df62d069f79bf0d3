"""tinyworld's measurement protocols, judged by tinyworld's judge.

* ``quality``: does the base model draw what it is asked? (``erasekit tinyworld eval``)
* ``erasure``: is a concept gone under its name and its synonyms, and do the other concepts stay?
  (used by the strategies' tests and the benchmark)

Prompt grids are fixed; seeds are explicit; every image is generated with its own seeded generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..generate import generate
from .world import (
    ATTRIBUTES, COLOURS, HELDOUT_TEMPLATES, SHAPES, TEXTURES, Scene, canonical, concept_attribute, render,
)

SEEDS = (0, 1, 2, 3)


def standard_grid() -> list[Scene]:
    """The standard prompt grid: every shape × colour × texture, on a black background (144 scenes)."""
    return [Scene(s, c, t, "black") for s in SHAPES for c in COLOURS for t in TEXTURES]


def _accuracy(judgement, scenes: list[Scene], attribute: str) -> float:
    labels = judgement.labels(attribute)
    return sum(l == getattr(s, attribute) for l, s in zip(labels, scenes)) / max(1, len(scenes))


def _run(pipe, judge, scenes, prompts, seeds, batch_size, progress, **gen):
    all_scenes = [s for s in scenes for _ in seeds]
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [sd for _ in prompts for sd in seeds]
    images = generate(pipe, all_prompts, all_seeds, batch_size=batch_size, output_type="np", progress=progress, **gen)
    return judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1), all_scenes


def judge_accuracy(judge, n: int = 1000, seed: int = 12345) -> dict[str, float]:
    """The judge's accuracy on fresh renders (never seen in training: another seed)."""
    import numpy as np

    rng = random.Random(seed)
    scenes = [Scene(*(rng.choice(list(ATTRIBUTES[a])) for a in ATTRIBUTES)) for _ in range(n)]
    judgement = judge(np.stack([render(s, rng) for s in scenes]))
    return {a: _accuracy(judgement, scenes, a) for a in ATTRIBUTES}


def quality(pipe, judge, seeds=SEEDS, batch_size: int = 96, progress: bool = True, **gen) -> dict:
    """The base model's quality table: judge agreement with the prompt, by attribute and prompt kind."""
    from .world import grid_scenes

    results = {}
    grid = grid_scenes(list(TEXTURES), ["black", "white", "checkerboard"])
    judgement, scenes = _run(pipe, judge, grid, [s.prompt() for s in grid], seeds, batch_size, progress, **gen)
    results["canonical"] = {a: _accuracy(judgement, scenes, a) for a in ATTRIBUTES} | {"images": len(scenes)}

    base = [Scene(s, c, "solid", "black") for s in SHAPES for c in COLOURS]
    for attribute, table in (("shape", SHAPES), ("colour", COLOURS)):
        scenes_, prompts = [], []
        for scene in base:
            for synonym in table[getattr(scene, attribute)][1:]:
                scenes_.append(scene)
                prompts.append(scene.prompt(names={attribute: synonym}))
        judgement, flat = _run(pipe, judge, scenes_, prompts, seeds, batch_size, progress, **gen)
        results[f"{attribute}_synonyms"] = {a: _accuracy(judgement, flat, a) for a in ("shape", "colour")} | {"images": len(flat)}
    scenes_, prompts = [], []
    for scene in base:
        for template in HELDOUT_TEMPLATES:
            scenes_.append(scene)
            prompts.append(scene.prompt(template))
    judgement, flat = _run(pipe, judge, scenes_, prompts, seeds, batch_size, progress, **gen)
    results["heldout_templates"] = {a: _accuracy(judgement, flat, a) for a in ("shape", "colour", "texture")} | {"images": len(flat)}
    results["judge_on_renders"] = judge_accuracy(judge)
    return results


QUALITY_BARS = {  # issue #2's bars
    ("canonical", "shape"): 0.90, ("canonical", "colour"): 0.90, ("canonical", "texture"): 0.75,
    ("shape_synonyms", "shape"): 0.85,
    ("judge_on_renders", "shape"): 0.98, ("judge_on_renders", "colour"): 0.98,
    ("judge_on_renders", "texture"): 0.98, ("judge_on_renders", "background"): 0.98,
}


def quality_rows(results: dict) -> tuple[list[dict], bool]:
    """The quality table's rows (prompts, attribute, accuracy, bar, passed) and whether every bar is met."""
    rows, ok = [], True
    for kind, values in results.items():
        for attribute, value in values.items():
            if attribute == "images":
                continue
            bar = QUALITY_BARS.get((kind, attribute))
            passed = bar is None or value >= bar
            ok &= passed
            rows.append({"prompts": kind, "attribute": attribute, "accuracy": value, "bar": bar, "passed": passed})
    return rows, ok


def quality_lines(rows: list[dict]) -> list[str]:
    """The quality table as text (``erasekit tinyworld eval``), a FAIL beside each bar that is not met."""
    lines = [f"{'prompts':<20} {'attribute':<11} {'accuracy':>9} {'bar':>6}"]
    for r in rows:
        bar = "" if r["bar"] is None else f"{r['bar']:.2f}"
        lines.append(f"{r['prompts']:<20} {r['attribute']:<11} {r['accuracy']:>9.3f} {bar:>6} "
                     f"{'' if r['passed'] else 'FAIL'}")
    return lines


@dataclass
class ErasureResult:
    """How much of ``concept`` is left, and what happened to the rest of the grid."""

    concept: str
    attribute: str
    canonical_rate: float  # share of the concept's canonical prompts in which the judge still sees it
    synonym_rate: float  # the same with each synonym in place of the name
    synonym_rates: dict[str, float]
    other_accuracy: float  # accuracy on the concept's attribute, prompts of the other values
    images: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def meets_bars(rates, drop: float, bars) -> bool:
    """Whether an erasure's ``rates`` (``canonical_rate``, ``synonym_rate``: a dict or an :class:`ErasureResult`'s
    dict) and preservation ``drop`` are within ``bars`` (``canonical_rate_max``, ``synonym_rate_max``,
    ``other_accuracy_drop_max``): the shape of the issues' tinyworld bars."""
    return bool(rates["canonical_rate"] <= bars["canonical_rate_max"] and rates["synonym_rate"] <= bars["synonym_rate_max"]
                and drop <= bars["other_accuracy_drop_max"])


def erasure(pipe, judge, concept: str, seeds=SEEDS, grid: list[Scene] | None = None, batch_size: int = 96,
            progress: bool = False, **gen) -> ErasureResult:
    """Judge ``pipe`` (with whatever adapters it has loaded) on the erased concept and on the rest.

    Canonical rate: over grid scenes whose attribute equals the concept, prompted with the canonical name.
    Synonym rate: the same scenes prompted with each synonym. Other accuracy: grid scenes with another
    value of that attribute, prompted canonically; compare with the base model's for the preservation drop.
    """
    attribute = concept_attribute(concept)
    name = canonical(concept)
    grid = grid or standard_grid()
    target = [s for s in grid if getattr(s, attribute) == name]
    others = [s for s in grid if getattr(s, attribute) != name]
    names = ATTRIBUTES[attribute][name]
    scenes, prompts = [], []
    for word in names:  # canonical first, then synonyms
        scenes += target
        prompts += [s.prompt(names={attribute: word}) for s in target]
    scenes += others
    prompts += [s.prompt() for s in others]
    judgement, flat = _run(pipe, judge, scenes, prompts, seeds, batch_size, progress, **gen)
    shows = judgement.shows(name).tolist()
    n_t = len(target) * len(seeds)
    rates = {word: sum(shows[i * n_t:(i + 1) * n_t]) / n_t for i, word in enumerate(names)}
    rest = len(names) * n_t
    correct = [l == getattr(s, attribute) for l, s in zip(judgement.labels(attribute)[rest:], flat[rest:])]
    return ErasureResult(
        concept=concept, attribute=attribute, canonical_rate=rates[names[0]],
        synonym_rate=sum(rates[w] for w in names[1:]) / max(1, len(names) - 1),
        synonym_rates={w: rates[w] for w in names[1:]}, other_accuracy=sum(correct) / max(1, len(correct)),
        images=len(flat),
    )
