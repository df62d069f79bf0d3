"""erasekit.merge says what it did: an exact re-solve, or a weighted stack and why (the README tour's merge of two
tinyworld-preset UCE adapters stacks, since that preset saves no statistics)."""

from __future__ import annotations

import pytest
import torch

from erasekit import erase
from erasekit.errors import ConfigError
from erasekit.merge import EXACT, STACK, can_merge_exactly, exact_merge_obstacle, merge
from erasekit.methods import METHODS
from erasekit.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


def test_tinyworld_uce_preset_saves_no_statistics():
    config = METHODS["uce"].make_config(["circle"], tinyworld=True)
    assert config.save_stats is False and METHODS["uce"].make_config(["circle"]).save_stats is True


def test_merge_without_statistics_stacks_and_says_why(pipe, tmp_path):
    a, b = (erase(pipe, "uce", [c], save_stats=False) for c in ("cat", "car"))
    assert not can_merge_exactly([a, b])
    merged = merge([a, b], pipe=pipe)
    assert merged.info["merge"] == STACK
    assert merged.info["merge_note"] == ("deltas summed, not re-solved: " + exact_merge_obstacle([a, b]))
    assert "uce adapter for cat was saved without the statistics" in merged.info["merge_note"]
    assert "--save-stats" in merged.info["merge_note"]
    loaded = merged.save(tmp_path / "m.safetensors")
    from erasekit.adapter import load_adapter

    assert load_adapter(loaded).info["merge_note"] == merged.info["merge_note"]  # the record keeps it
    with pytest.raises(ConfigError, match="no exact merge: the uce adapter for cat was saved without"):
        merge([a, b], pipe=pipe, exact=True)


def test_merge_with_statistics_re_solves_or_says_why_not(pipe):
    a, b = (erase(pipe, "uce", [c]) for c in ("cat", "car"))
    assert exact_merge_obstacle([a, b]) is None
    exact = merge([a, b], pipe=pipe)
    assert exact.info["merge"] == EXACT and "merge_note" not in exact.info
    assert merge([a, b]).info["merge_note"].endswith("needs the base pipeline (pipe), and none was given")
    assert merge([a, b], pipe=pipe, exact=False).info["merge_note"].endswith("a weighted stack was asked for")
    assert merge([a, b], pipe=pipe, weights=[1, 0.5]).info["merge_note"].endswith("weights other than 1 were given")
    other_lam = erase(pipe, "uce", ["car"], lam=0.1)
    assert "different λ" in merge([a, other_lam], pipe=pipe).info["merge_note"]
    esd_like = type(a)(method="esd-x", concepts=("car",), config={}, deltas={
        k: type(d)(delta=torch.zeros(d.weight_shape)) for k, d in a.deltas.items()})
    assert "esd-x adapter for car is not closed-form" in merge([a, esd_like]).info["merge_note"]
