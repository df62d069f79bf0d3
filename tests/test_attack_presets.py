"""The tinyworld attack presets may only grow stronger (issue #22 §2): robust recipes are judged with the presets
recorded in ``benchmarks/attack_presets_tinyworld.json`` when that work began, and no later change may weaken one."""

import dataclasses
import json
from pathlib import Path

import pytest

from erasekit.attacks import ATTACKS

FROZEN = json.loads((Path(__file__).parents[1] / "benchmarks" / "attack_presets_tinyworld.json").read_text())
#: search-effort fields: a larger value searches more
MORE_IS_STRONGER = {"iterations", "steps", "n_timesteps", "population", "generations", "num_train_images"}
#: a smaller value judges more often
LESS_IS_STRONGER = {"eval_every"}


def weaker_fields(frozen: dict, current: dict) -> list[str]:
    """The fields in which ``current`` is weaker than, or simply different from, ``frozen`` (as JSON)."""
    bad = []
    for name, was in frozen.items():
        now = current.get(name)
        if name in MORE_IS_STRONGER and now is not None and now >= was:
            continue
        if name in LESS_IS_STRONGER and now is not None and now <= was:
            continue
        if name == "scales" and now is not None and set(was) <= set(now):  # concept arithmetic: more scales tried
            continue
        if now != was:
            bad.append(f"{name}: {was!r} -> {now!r}")
    return bad


@pytest.mark.parametrize("attack,preset", [(a, p) for a, ps in FROZEN["presets"].items() for p in ps])
def test_frozen_attack_preset_is_not_weakened(attack, preset):
    assert attack in ATTACKS, f"attack {attack} was removed from the registry"
    assert preset in ATTACKS[attack].PRESETS, f"preset {attack}:{preset} was removed"
    current = json.loads(json.dumps(dataclasses.asdict(ATTACKS[attack].PRESETS[preset])))
    assert not weaker_fields(FROZEN["presets"][attack][preset], current), (
        f"{attack}:{preset} differs from the frozen preset: {weaker_fields(FROZEN['presets'][attack][preset], current)}")


def test_every_registered_attack_has_a_frozen_tinyworld_preset():
    assert set(FROZEN["presets"]) == set(ATTACKS)
    assert all("tinyworld" in ps for ps in FROZEN["presets"].values())


def test_the_check_sees_a_weakened_preset():
    frozen = FROZEN["presets"]["p4d"]["tinyworld"]
    assert weaker_fields(frozen, {**frozen, "iterations": frozen["iterations"] - 1}) == [
        f"iterations: {frozen['iterations']} -> {frozen['iterations'] - 1}"]
    assert weaker_fields(frozen, {**frozen, "iterations": frozen["iterations"] * 2, "eval_every": 1}) == []
    assert weaker_fields(frozen, {**frozen, "lr": 1.0})
