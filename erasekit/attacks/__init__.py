"""Adversarial-prompt attacks that audit an erasure (docs/design.md §5).

Every attack module has the same shape: a frozen config dataclass with the paper's defaults (``CONFIG``), named
presets (``PRESETS["paper"]``, ``PRESETS["tinyworld"]`` = a CPU-sized budget, and variants), and

    attack(pipe, prompt, config, judge, generator=None, *, seed=0, target=None, state=None, progress=False,
           cache=None) -> AttackResult

``pipe`` is the erased pipeline (adapters loaded); the original model is the same pipeline inside
``erasekit.compose.disabled(pipe)``. ``seed`` seeds the judged generations (as the prompt CSVs' seeds do in the
papers), ``generator`` every other random draw. ``target`` is the original model's image for (prompt, seed) when
the caller already has it; ``state`` is the per-concept state of attacks that have a ``prepare(pipe, concept,
config, generator) -> dict`` step (CCE's learned token, Ring-A-Bell's concept vector). ``cache`` is the audit's
:class:`erasekit.audit.cache.BaseCache` (or None): an attack step that runs on the original model alone keeps its
result there, shared by the audits of every erasure of that model (Ring-A-Bell's genetic search).

>>> from erasekit.attacks import ATTACKS, run
>>> result = run("unlearndiffatk", pipe, "a red circle", judge, preset="tinyworld", seed=0)
"""

from __future__ import annotations

from . import cce, concept_arithmetic, p4d, paraphrase, ring_a_bell, sage, unlearndiffatk
from .base import AttackResult, make_generator, preset, with_overrides
from .unlearndiffatk import SoftPrompt, SoftPromptConfig, soft_prompt_attack

ATTACKS = {
    "unlearndiffatk": unlearndiffatk,
    "p4d": p4d,
    "ring_a_bell": ring_a_bell,
    "cce": cce,
    "concept_arithmetic": concept_arithmetic,
    "paraphrase": paraphrase,
    "sage": sage,
}


def get(name: str):
    """The attack module registered as ``name``."""
    from ..errors import ConfigError

    key = name.replace("-", "_").lower()
    if key not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[key]


def config(name: str, preset_name: str = "paper", **overrides):
    """An attack's config: a named preset with field overrides."""
    return with_overrides(preset(get(name), preset_name), **overrides) if overrides else preset(get(name), preset_name)


def run(name: str, pipe, prompt: str, judge, *, config=None, preset: str = "paper", seed: int = 0,
        generator=None, target=None, state=None, progress: bool = False, cache=None) -> AttackResult:
    """Run attack ``name`` with ``config`` (default: the named preset)."""
    from .base import preset as _preset

    module = get(name)
    config = config if config is not None else _preset(module, preset)
    return module.attack(pipe, prompt, config, judge, generator, seed=seed, target=target, state=state,
                         progress=progress, cache=cache)


__all__ = ["ATTACKS", "AttackResult", "SoftPrompt", "SoftPromptConfig", "config", "get", "make_generator", "run",
           "soft_prompt_attack"]
