"""Concept vocabulary shared by the prompt-level attacks: names of a concept, where it sits in a prompt,
prompt pairs with and without it. tinyworld knows its concepts (``erasekit.tinyworld.prompts``, re-exported here
under the names the attacks use); real models take user lists/files."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError
from ..tinyworld.prompts import concept_names as tinyworld_names
from ..tinyworld.prompts import concept_pairs as tinyworld_pairs
from ..tinyworld.prompts import scene_of as tinyworld_scene

__all__ = ["concept_names", "find_name", "read_lines", "read_pairs", "replace_name", "tinyworld_names",
           "tinyworld_pairs", "tinyworld_scene"]


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
