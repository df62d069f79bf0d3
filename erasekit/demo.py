"""``erasekit demo``: the main job on tinyworld: erase a concept, generate before and after, and tabulate what
tinyworld's judge sees: the concept under its name and its synonyms, and the attribute on the other concepts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from .errors import ConfigError


def check(method: str, concept: str) -> tuple[str, str]:
    """(attribute, canonical name) of the demo's concept, once the method and the concept are known to exist."""
    from .methods import METHODS
    from .tinyworld.prompts import known_concept
    from .tinyworld.world import concept_attribute

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    name = known_concept(concept)
    return concept_attribute(name), name


def demo_rows(concept: str, attribute: str) -> list[tuple[str, list, dict | None]]:
    """(label, scenes, names) of each table row: the concept's scenes by name and by each synonym, and a spread of
    the other concepts' scenes."""
    from .tinyworld.world import COLOURS, SHAPES, Scene, synonyms

    base = [Scene(s, c, "solid", "black") for s in SHAPES for c in COLOURS]
    target = [sc for sc in base if getattr(sc, attribute) == concept]
    others = [sc for sc in base if getattr(sc, attribute) != concept][:: max(1, len(base) // 24)]
    names = synonyms(concept)
    return [(f"{concept!r} prompts", target, {}), *[(f"via synonym {w!r}", target, {attribute: w}) for w in names[1:]],
            (f"other {attribute}s", others, None)]


def run_demo(pipe, judge, concept: str, method: str, seeds: Sequence[int], folder: Path,
             say: Callable[[str], None] = print) -> list[str]:
    """Erase ``concept`` from the tinyworld ``pipe`` with ``method``; save the adapter and the before/after sheets in
    ``folder``; return the table of what ``judge`` sees before and after (progress lines go to ``say``)."""
    from . import compose
    from .api import erase
    from .generate import contact_sheet, generate

    attribute, concept = check(method, concept)
    rows = demo_rows(concept, attribute)
    prompts = [sc.prompt(names=n or {}) for _, scenes, n in rows for sc in scenes]
    scenes = [sc for _, scenes, _ in rows for sc in scenes]
    seeds = list(seeds)
    all_prompts = [p for p in prompts for _ in seeds]
    all_scenes = [sc for sc in scenes for _ in seeds]
    all_seeds = seeds * len(prompts)

    say(f"tinyworld: {len(all_prompts)} images before and after erasing {concept!r} with {method} …")
    before = generate(pipe, all_prompts, all_seeds)
    started = time.perf_counter()
    adapter = erase(pipe, method, [concept])
    seconds = time.perf_counter() - started
    try:  # created after the erasure, so that a failed one leaves no folder behind
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {str(folder)!r}: {e.strerror}") from None
    adapter_path = folder / f"{concept}.{method}.safetensors"
    adapter.save(adapter_path)
    name = compose.load(pipe, adapter)
    after = generate(pipe, all_prompts, all_seeds)
    compose.unload(pipe, [name])

    def seen(images):
        verdict = judge(images)
        return [lab == getattr(sc, attribute) for lab, sc in zip(verdict.labels(attribute), all_scenes)]

    ok_before, ok_after = seen(before), seen(after)
    say(f"\nerased {concept!r} in {seconds:.2f} s → {adapter_path} ({adapter_path.stat().st_size / 1e3:.0f} kB)\n")
    measures = [f"{label}: " + (f"{attribute} correct" if label == f"other {attribute}s" else f"{concept} seen")
                for label, _, _ in rows]
    width = max(len(m) for m in measures + ["what the judge sees"])  # one column, however long a synonym is
    lines = [f"{'what the judge sees':<{width}} {'before':>8} {'after':>8}"]
    start = 0
    for what, (_, scenes_, _) in zip(measures, rows):
        n = len(scenes_) * len(seeds)
        b, a = sum(ok_before[start:start + n]), sum(ok_after[start:start + n])
        lines.append(f"{what:<{width}} {f'{b}/{n}':>8} {f'{a}/{n}':>8}")
        start += n
    contact_sheet(before, columns=len(seeds) * 6).save(folder / "before.png")
    contact_sheet(after, columns=len(seeds) * 6).save(folder / "after.png")
    return lines
