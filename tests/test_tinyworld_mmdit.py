"""Erasure judged on tinyworld-mmdit (SD3's architecture; issue #25). The full protocol, 4 seeds × the standard
grid against the issue's bars, is ``benchmarks/mmdit_tinyworld.py``; here a few prompts, phrased outside the
evaluation grid's template, and the base model judged beside the erased one."""

import pytest
import torch

from erasekit import compose, erase
from erasekit.generate import generate
from erasekit.methods import uce

CIRCLE = ["a solid red circle on a black background", "a striped blue circle", "a picture of a dotted green disc",
          "an outlined yellow round shape on a white background", "purple circle plain chessboard",
          "a drawing of an orange circle that is striped"]
OTHERS = [("a solid red square on a black background", "square"), ("a striped blue star", "star"),
          ("a picture of a dotted green triangle", "triangle"), ("an outlined yellow cross on a white background",
                                                                  "cross"),
          ("purple diamond plain chessboard", "diamond"), ("a drawing of an orange square that is striped", "square")]
SEEDS = (0, 1, 2)


def judged_shapes(pipe, judge, prompts, adapter=None) -> list[str]:
    name = compose.load(pipe, adapter) if adapter is not None else None
    try:
        images = generate(pipe, [p for p in prompts for _ in SEEDS], [s for _ in prompts for s in SEEDS],
                          output_type="np")
    finally:
        if name is not None:
            compose.unload(pipe, name)
    return judge(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).labels("shape")


@pytest.fixture(scope="module")
def base(tinyworld_mmdit_pipe, judge):
    return judged_shapes(tinyworld_mmdit_pipe, judge, CIRCLE + [p for p, _ in OTHERS])


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_closed_forms_erase_circle_from_tinyworld_mmdit(tinyworld_mmdit_pipe, judge, base, method):
    """The judge stops seeing circle (synonyms included) and sees the other shapes as often as on the base model;
    only the two layers that read the text change (the context rows' and the pooled text's embedders)."""
    adapter = erase(tinyworld_mmdit_pipe, method, ["circle"])
    assert set(adapter.deltas) == {"transformer.context_embedder", f"transformer.{uce.MMDIT_POOLED}"}
    assert tuple(adapter.config["guides"]) == ("square | triangle | star | cross | diamond",)  # the preset's guide_related
    shapes = judged_shapes(tinyworld_mmdit_pipe, judge, CIRCLE + [p for p, _ in OTHERS], adapter)
    n = len(CIRCLE) * len(SEEDS)
    assert sum(s == "circle" for s in base[:n]) >= n * 2 // 3, base[:n]  # the base model draws them
    assert sum(s == "circle" for s in shapes[:n]) <= 1, shapes[:n]
    expected = [want for _, want in OTHERS for _ in SEEDS]
    kept, was = (sum(s == w for s, w in zip(labels[n:], expected)) for labels in (shapes, base))
    assert kept >= was - 1, list(zip(shapes[n:], expected))
