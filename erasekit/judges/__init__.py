"""Judges: does an image show the audited concept? (the classifiers of the erasure papers, behind one protocol)

A judge is any object with ``name``, ``version``, ``threshold`` and ``concept`` attributes and a
``__call__(images) -> list[float]`` that scores each image for the concept; an image *shows* the concept when
its score exceeds the threshold (``score > threshold``, the UnlearnDiffAtk/NudeNet convention). Every audit
report records the judge's name, version and threshold (:func:`describe`).

A judge may also offer ``log_prob(images: Tensor) -> Tensor``: the log-probability of its concept for float
images (N, 3, H, W) in [−1, 1], differentiable in the images. Attacks that search through the whole generator use
it as their surrogate loss (SAGE); without it they fall back to another surrogate. tinyworld's judge has one.

Presets (``load(name, concept, **options)``):

* ``tinyworld`` — tinyworld's own classifier (:mod:`erasekit.judges.tinyworld`), the default;
* ``clip`` — zero-shot CLIP via open_clip from a local weight file (:mod:`erasekit.judges.clip`; extra ``clip``);
* ``nudenet`` — the NudeNet v3 detector shipped in the ``nudenet`` wheel, with each paper's class set and
  threshold as named presets (:mod:`erasekit.judges.nudenet`; extra ``nudenet``).

Optional dependencies (open_clip, nudenet) are imported only when such a judge is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from ..errors import ConfigError

JUDGES = ("tinyworld", "clip", "nudenet")


@runtime_checkable
class Judge(Protocol):
    """What audits and attacks need from a judge."""

    name: str
    version: str
    threshold: float
    concept: str

    def __call__(self, images) -> list[float]:
        """One score of ``concept`` per image (PIL images or uint8 (N, H, W, 3) arrays)."""
        ...


def verdict(judge: Judge, images) -> tuple[list[float], list[bool]]:
    """Scores and decisions (``score > threshold``) for a list of images."""
    scores = [float(s) for s in judge(images)]
    return scores, [s > judge.threshold for s in scores]


def describe(judge: Judge) -> dict:
    """The record every report carries: name, version, threshold, concept (+ the judge's own ``info``)."""
    record = {"name": judge.name, "version": judge.version, "threshold": float(judge.threshold),
              "concept": getattr(judge, "concept", "")}
    record.update(getattr(judge, "info", {}) or {})
    return record


@dataclass
class FunctionJudge:
    """A judge from a plain function ``fn(images) -> scores`` (tests, custom classifiers).

    Args:
        fn: maps a list of images to one float per image.
        concept: the concept the scores are about.
        name, version: recorded in reports.
        threshold: an image shows the concept when its score exceeds this.
    """

    fn: Callable[[Any], list[float]]
    concept: str = ""
    name: str = "function"
    version: str = "0"
    threshold: float = 0.5
    info: dict = field(default_factory=dict)

    def __call__(self, images) -> list[float]:
        return [float(s) for s in self.fn(images)]


def load(name: str, concept: str, **options) -> Judge:
    """Build a judge by preset name: ``tinyworld`` | ``clip`` | ``nudenet`` (options go to its constructor)."""
    if name == "tinyworld":
        from .tinyworld import TinyworldConceptJudge

        return TinyworldConceptJudge(concept, **options)
    if name == "clip":
        from .clip import ClipJudge

        return ClipJudge(concept, **options)
    if name == "nudenet":
        from .nudenet import NudeNetJudge

        return NudeNetJudge(concept=concept or "nudity", **options)
    raise ConfigError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")


__all__ = ["FunctionJudge", "JUDGES", "Judge", "describe", "load", "verdict"]
