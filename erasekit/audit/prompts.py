"""The prompts an audit runs on: the user's (lists or files), or tinyworld's defaults for a tinyworld concept
(its canonical prompts, their paraphrases and prompts of the other concepts, from ``erasekit.tinyworld.prompts``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..attacks.concepts import read_lines
from ..errors import ConfigError
from ..tinyworld.prompts import concept_of
from ..tinyworld.prompts import concept_prompts as tinyworld_prompts
from ..tinyworld.prompts import paraphrases as tinyworld_paraphrases
from ..tinyworld.prompts import preserve_prompts as tinyworld_preserve_prompts

#: tinyworld's default audit of a concept: this many of its canonical prompts (evenly spread over the grid) and
#: of the other concepts' (``audit(full_grid=True)``: all of them); with ``attacks=all`` a few minutes on a CPU.
DEFAULT_PROMPTS = 4
DEFAULT_PRESERVE = 6

__all__ = ["DEFAULT_PRESERVE", "DEFAULT_PROMPTS", "prompt_sets", "subsample", "tinyworld_paraphrases",
           "tinyworld_preserve_prompts", "tinyworld_prompts"]


def subsample(items: Sequence, n: int) -> list:
    """``n`` of ``items`` evenly spread, in order (all of them when there are no more than ``n``)."""
    items = list(items)
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def prompt_sets(concept: str, prompts: Sequence[str] | None, paraphrases: Sequence[str] | str | Path | None,
                preserve_prompts: Sequence[str] | str | Path | None, full_grid: bool
                ) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(prompts, (paraphrase, group) pairs, preserve prompts) of an audit, as :func:`erasekit.audit.audit`
    documents its arguments: given lists, files of one prompt per line, or tinyworld's defaults (None)."""
    known = concept_of(concept)
    if prompts is None:
        if known is None:
            raise ConfigError(f"give the prompts to audit {concept!r} with (tinyworld's default grid only knows "
                              "tinyworld concepts)")
        prompts = tinyworld_prompts(concept)
        if not full_grid:
            prompts = subsample(prompts, DEFAULT_PROMPTS)
    prompts = list(dict.fromkeys(prompts))
    if isinstance(paraphrases, (str, Path)):
        paraphrases = [(p, "paraphrase") for p in read_lines(paraphrases)]
    elif paraphrases is None:
        paraphrases = tinyworld_paraphrases(concept, prompts) if known else []
    else:
        paraphrases = [(p, "paraphrase") for p in paraphrases]
    if isinstance(preserve_prompts, (str, Path)):
        preserve_prompts = read_lines(preserve_prompts)
    elif preserve_prompts is None:
        preserve_prompts = (tinyworld_preserve_prompts(concept, 36 if full_grid else DEFAULT_PRESERVE)
                            if known else [])
    preserve_prompts = list(dict.fromkeys(preserve_prompts))
    return prompts, paraphrases, preserve_prompts
