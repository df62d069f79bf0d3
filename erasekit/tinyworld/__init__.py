"""tinyworld: erasekit's own small Stable-Diffusion-architecture model and its judge (DESIGN.md §4).

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


def path() -> Path:
    """The folder of the shipped tinyworld pipeline (``save_pretrained`` layout, judge in ``judge/``)."""
    return Path(__file__).parent / "weights"


def load_judge(model_path: str | Path | None = None, device: str = "cpu"):
    """Load the judge shipped beside a tinyworld pipeline (default: the packaged one)."""
    from .judge import TinyworldJudge

    return TinyworldJudge.from_pretrained(Path(model_path or path()) / "judge", device=device)


__all__ = [
    "ATTRIBUTES", "BACKGROUNDS", "CANONICAL_TEMPLATE", "COLOURS", "HELDOUT_TEMPLATES", "MODEL_ID", "SHAPES",
    "TEXTURES", "TRAIN_TEMPLATES", "Scene", "canonical", "concept_attribute", "grid_scenes", "load_judge",
    "path", "render", "synonyms",
]
