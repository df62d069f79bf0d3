"""tinyworld: erasekit's own small Stable-Diffusion-architecture model and its judge (docs/design.md §4).

>>> from diffusers import StableDiffusionPipeline
>>> import erasekit.tinyworld as tw
>>> pipe = StableDiffusionPipeline.from_pretrained(tw.path())   # offline, ~20 MB, runs on a CPU
>>> judge = tw.load_judge()
"""

from __future__ import annotations

from pathlib import Path

from .world import (
    ATTRIBUTES, BACKGROUNDS, CANONICAL_TEMPLATE, COLOURS, HELDOUT_TEMPLATES, SHAPES, TEXTURES,
    TRAIN_TEMPLATES, Scene, canonical, concept_attribute, grid_scenes, render, synonyms,
)

MODEL_ID = "tinyworld"


ARCHS = ("unet", "mmdit")


def path(arch: str = "unet") -> Path:
    """The folder of a shipped tinyworld pipeline (``save_pretrained`` layout, judge in ``judge/``).

    ``"unet"``: Stable Diffusion 1.x's architecture (``StableDiffusionPipeline``); ``"mmdit"``: Stable Diffusion 3's
    (``StableDiffusion3Pipeline``, no T5: load it with ``text_encoder_3=None, tokenizer_3=None``, as diffusers
    documents for SD3 without T5; erasekit's loaders pass them)."""
    if arch not in ARCHS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown tinyworld architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return Path(__file__).parent / ("weights" if arch == "unet" else "weights-mmdit")


def is_tinyworld(pipe_or_path) -> bool:
    """Whether a pipeline (or a model folder) is a tinyworld model: its folder holds ``tinyworld.json``."""
    if isinstance(pipe_or_path, (str, Path)):
        folder = str(pipe_or_path)
    else:
        from ..core.sd import model_id

        folder = model_id(pipe_or_path)
    return bool(folder) and (Path(folder) / "tinyworld.json").is_file()


def caption_templates(concept: str, n: int = 64, seed: int = 0, avoid=()) -> list[str]:
    """``n`` prompt templates ("{}" = the concept's place) in the style of tinyworld's training captions.

    Each is one of ``TRAIN_TEMPLATES`` with the concept's attribute left as "{}" and the other attributes
    filled with random names (colour, texture and background each dropped with probability 0.15, as in
    training captions), so that an erasure covers the concept in context and not only the bare word. Synonyms
    of the concept never appear, nor any name of a concept in ``avoid`` (an attribute drawn as one takes another
    value: a preserved "triangle" is never "a red triangle" while red is erased). Raises KeyError for a word that
    is not a tinyworld concept.
    """
    import random

    from .world import fill_template, random_scene

    attribute = concept_attribute(concept)
    avoided = set()
    for word in avoid:
        try:
            avoided.add(canonical(word))
        except KeyError:
            continue
    slot = "\x00"  # the concept's place while filling (fill_template formats twice: no literal "{}")
    rng = random.Random(seed)

    def value(a: str, drawn: str) -> str:
        allowed = [v for v in ATTRIBUTES[a] if v not in avoided]
        return drawn if drawn not in avoided or not allowed else rng.choice(allowed)

    out = []
    for _ in range(n):
        scene = random_scene(rng)
        words = {a: slot if a == attribute else
                 "" if a != "shape" and rng.random() < 0.15 else rng.choice(table[value(a, getattr(scene, a))])
                 for a, table in ATTRIBUTES.items()}
        out.append(fill_template(rng.choice(TRAIN_TEMPLATES), words).replace(slot, "{}"))
    return out


def related_to(concepts) -> list[str]:
    """The siblings of every tinyworld concept in ``concepts`` (canonical names, in order, none of the concepts
    themselves); words that are not tinyworld concepts are skipped."""
    erased, out = set(), []
    for concept in concepts:
        try:
            erased.add(canonical(concept))
            out += related(concept)
        except KeyError:
            continue
    return [c for c in dict.fromkeys(out) if c not in erased]


def related(concept: str) -> list[str]:
    """The other concepts of a tinyworld concept's attribute, canonical names ("circle" → the other shapes)."""
    name = canonical(concept)
    return [other for other in ATTRIBUTES[concept_attribute(name)] if other != name]


def load_judge(model_path: str | Path | None = None, device: str = "cpu"):
    """Load the judge shipped beside a tinyworld pipeline (default: the packaged one)."""
    from .judge import TinyworldJudge

    return TinyworldJudge.from_pretrained(Path(model_path or path()) / "judge", device=device)


__all__ = [
    "ARCHS", "ATTRIBUTES", "BACKGROUNDS", "CANONICAL_TEMPLATE", "COLOURS", "HELDOUT_TEMPLATES", "MODEL_ID", "SHAPES",
    "TEXTURES", "TRAIN_TEMPLATES", "Scene", "canonical", "concept_attribute", "caption_templates", "grid_scenes", "is_tinyworld",
    "load_judge", "related", "related_to",
    "path", "render", "synonyms",
]
