"""Concept vocabulary shared by the prompt-level attacks: names of a concept, where it sits in a prompt,
prompt pairs with and without it. tinyworld knows its concepts; real models take user lists/files."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError


def tinyworld_names(concept: str) -> tuple[str, ...] | None:
    """All names of a tinyworld concept (canonical first), or None when tinyworld does not know it."""
    from ..tinyworld import synonyms

    try:
        return tuple(synonyms(concept))
    except KeyError:
        return None


def read_lines(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a text file (one paraphrase / prompt per line)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"file not found: {p}")
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def concept_names(concept: str, synonyms: tuple[str, ...] = (), synonyms_file: str = "") -> tuple[str, ...]:
    """The concept's name followed by its paraphrases: explicit ones, a file's, else tinyworld's."""
    extra = list(synonyms) + (read_lines(synonyms_file) if synonyms_file else [])
    if not extra:
        known = tinyworld_names(concept)
        if known:
            return known
    names = [concept] + [s for s in extra if s != concept]
    return tuple(dict.fromkeys(names))


def find_name(prompt: str, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` (longest first) that occurs in ``prompt`` as whole words, case-insensitively."""
    for name in sorted(names, key=len, reverse=True):
        if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", prompt, flags=re.IGNORECASE):
            return name
    return None


def replace_name(prompt: str, name: str, replacement: str) -> str:
    return re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", lambda _: replacement, prompt, flags=re.IGNORECASE)


def tinyworld_scene(prompt: str):
    """The tinyworld ``Scene`` whose canonical prompt is ``prompt`` (None if it is not one)."""
    from ..tinyworld import ATTRIBUTES, Scene

    for s in ATTRIBUTES["shape"]:
        for c in ATTRIBUTES["colour"]:
            for t in ATTRIBUTES["texture"]:
                for b in ATTRIBUTES["background"]:
                    scene = Scene(s, c, t, b)
                    if scene.prompt() == prompt.strip():
                        return scene
    return None


def tinyworld_pairs(concept: str) -> tuple[list[str], list[str]]:
    """Prompt pairs (with, without) the concept for a concept vector (Ring-A-Bell) on tinyworld.

    Shapes cannot be left out of a caption, so "without" swaps in each other shape; colours, textures and
    backgrounds are dropped from the caption. Every name of the concept is used on the "with" side.
    """
    from ..tinyworld import ATTRIBUTES, TRAIN_TEMPLATES, canonical, concept_attribute
    from ..tinyworld.world import fill_template

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


def read_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """Prompt pairs from a file: one pair per line, "with<TAB>without" (or a 2-column CSV)."""
    import csv

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"prompt-pair file not found: {p}")
    delimiter = "\t" if "\t" in p.read_text().split("\n", 1)[0] else ","
    with_, without = [], []
    with open(p, newline="") as f:
        for row in csv.reader(f, delimiter=delimiter):
            if len(row) >= 2 and row[0].strip() and not row[0].startswith("#"):
                with_.append(row[0].strip())
                without.append(row[1].strip())
    if not with_:
        raise ConfigError(f"no prompt pairs in {p} (expected 'with<TAB>without' per line)")
    return with_, without
