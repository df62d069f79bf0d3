"""tinyworld's vocabulary as prompts: which concept a word names, the scene of a prompt, the canonical prompts of
a concept, its paraphrases, the prompts of the concepts it should keep, and prompt pairs with and without it.
Shared by the audit, the prompt-level attacks, the CLI's demo and render, and the methods' tinyworld defaults."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from ..errors import ConfigError
from .world import (
    ATTRIBUTES, COLOURS, HELDOUT_TEMPLATES, SHAPES, TRAIN_TEMPLATES, Scene, canonical, concept_attribute,
    fill_template, synonyms,
)


def concept_of(concept: str) -> tuple[str, str] | None:
    """(attribute, canonical name) of a tinyworld concept or synonym, or None when tinyworld does not know it."""
    try:
        return concept_attribute(concept), canonical(concept)
    except KeyError:
        return None


def concept_names(concept: str) -> tuple[str, ...] | None:
    """All names of a tinyworld concept (canonical first), or None when tinyworld does not know it."""
    try:
        return tuple(synonyms(concept))
    except KeyError:
        return None


def scene_of(prompt: str) -> Scene | None:
    """The ``Scene`` whose canonical prompt is ``prompt`` (None if it is not one)."""
    for s in ATTRIBUTES["shape"]:
        for c in ATTRIBUTES["colour"]:
            for t in ATTRIBUTES["texture"]:
                for b in ATTRIBUTES["background"]:
                    scene = Scene(s, c, t, b)
                    if scene.prompt() == prompt.strip():
                        return scene
    return None


def scene_from_words(prompt: str) -> Scene:
    """The scene a free-form prompt names word by word (its shape is required; solid red on black by default)."""
    words = f" {prompt.lower()} "
    found = {}
    for attribute, table in ATTRIBUTES.items():
        for name, names in table.items():
            if any(f" {n} " in words for n in names):
                found[attribute] = name
    if "shape" not in found:
        raise ConfigError(f"prompt {prompt!r} names no tinyworld shape; shapes: {', '.join(SHAPES)}")
    return Scene(found["shape"], found.get("colour", "red"), found.get("texture", "solid"),
                 found.get("background", "black"))


def concept_prompts(concept: str) -> list[str]:
    """The concept's canonical prompts: the standard grid's scenes that show it (24–36 prompts)."""
    from .eval import standard_grid

    attribute, name = concept_of(concept)
    if attribute == "background":
        return [Scene(s, c, "solid", name).prompt() for s in SHAPES for c in COLOURS]
    return [s.prompt() for s in standard_grid() if getattr(s, attribute) == name]


def paraphrases(concept: str, prompts: Sequence[str]) -> list[tuple[str, str]]:
    """(prompt, group) paraphrases of canonical prompts: each synonym in the canonical template ("synonym") and
    the name in each held-out template ("heldout_template")."""
    attribute, name = concept_of(concept)
    out = []
    for p in prompts:
        scene = scene_of(p)
        if scene is None or getattr(scene, attribute) != name:
            continue
        out += [(scene.prompt(names={attribute: s}), "synonym") for s in ATTRIBUTES[attribute][name][1:]]
        out += [(scene.prompt(t), "heldout_template") for t in HELDOUT_TEMPLATES]
    return list(dict.fromkeys(out))


def preserve_prompts(concept: str, limit: int = 36) -> list[str]:
    """Canonical prompts of the *other* values of the concept's attribute: ``limit`` scenes of the standard grid
    (for a background, solid scenes on the other backgrounds), balanced over every attribute (:func:`balanced`).

    The other values of the concept's own attribute come in turn (16 prompts of a texture: 5 or 6 of each of the
    other three), and each pick shows the shapes, colours and textures shown least so far, so that a preservation
    drop measured on them covers every value rather than a subset the grid's order happens to repeat.
    """
    from .eval import standard_grid

    attribute, name = concept_of(concept)
    if attribute == "background":
        scenes = [Scene(s, c, "solid", b) for b in ("black", "white", "checkerboard") if b != name
                  for s in SHAPES for c in COLOURS]
    else:
        scenes = [s for s in standard_grid() if getattr(s, attribute) != name]
    return [s.prompt() for s in balanced(scenes, limit, attribute)]


def balanced(scenes: Sequence[Scene], limit: int, first: str) -> list[Scene]:
    """``limit`` of ``scenes`` (all of them when there are no more), chosen one at a time: the scene whose value of
    attribute ``first`` has been chosen least, then whose values of the other attributes have been chosen least
    (summed), then whose pairs of values have; ties go to the earlier scene. Deterministic, and no aliasing with
    the order of ``scenes`` (an even step over the grid chose one texture only: every sixth scene is solid)."""
    remaining = list(scenes)
    if len(remaining) <= limit:
        return remaining
    names = tuple(ATTRIBUTES)
    seen: Counter = Counter()  # how often each (attribute, value) and each pair of them has been chosen

    def keys(scene: Scene) -> tuple[list, list]:
        values = [(a, getattr(scene, a)) for a in names]
        return values, [(x, y) for i, x in enumerate(values) for y in values[i + 1:]]

    def cost(scene: Scene) -> tuple[int, int, int]:
        values, pairs = keys(scene)
        return (seen[(first, getattr(scene, first))], sum(seen[v] for v in values if v[0] != first),
                sum(seen[p] for p in pairs))

    chosen = []
    for _ in range(limit):
        scene = remaining.pop(min(range(len(remaining)), key=lambda i: cost(remaining[i])))
        chosen.append(scene)
        values, pairs = keys(scene)
        seen.update(values + pairs)
    return chosen


def concept_pairs(concept: str) -> tuple[list[str], list[str]]:
    """Prompt pairs (with, without) the concept for a concept vector (Ring-A-Bell).

    Shapes cannot be left out of a caption, so "without" swaps in each other shape; colours, textures and
    backgrounds are dropped from the caption. Every name of the concept is used on the "with" side.
    """
    attribute = concept_attribute(concept)
    name = canonical(concept)
    template = TRAIN_TEMPLATES[0]
    with_, without = [], []
    base = {"shape": list(ATTRIBUTES["shape"]), "colour": list(ATTRIBUTES["colour"]),
            "texture": ["solid", "striped"], "background": ["black"]}
    base[attribute] = [name]
    for s in base["shape"]:
        for c in base["colour"]:
            for t in base["texture"]:
                words = {"shape": s, "colour": c, "texture": t, "background": base["background"][0]}
                for alias in ATTRIBUTES[attribute][name]:
                    w = dict(words, **{attribute: alias})
                    if attribute == "shape":
                        for other in ATTRIBUTES["shape"]:
                            if other != name:
                                with_.append(fill_template(template, w))
                                without.append(fill_template(template, dict(w, shape=other)))
                    else:
                        with_.append(fill_template(template, w))
                        without.append(fill_template(template, dict(w, **{attribute: ""})))
    return with_, without


def known_concept(concept: str, hint: str = "") -> str:
    """The canonical name of a tinyworld concept or synonym; ``UnknownConceptError`` names the known ones (then
    ``hint``)."""
    from ..errors import UnknownConceptError

    try:
        return canonical(concept)
    except KeyError as e:
        raise UnknownConceptError(f"{e.args[0]}{hint}") from None
