"""Merge several adapters into one file (``erasekit merge``).

Closed-form adapters (UCE, TIME) that carry their solve's statistics merge **exactly**: one joint re-solve of
UCE's Eq. 7 over all their erase and preserve keys (:func:`erasekit.methods.uce.merge`), equal to erasing all
concepts at once. Any other set of static adapters merges as a **weighted stack**: ``ΔW = Σ_i w_i ΔW_i`` per
module, low-rank factors concatenated (rank = the sum of ranks; ``up`` scaled by ``w_i``), full deltas summed.
The result's metadata says which (``info["merge"]``: "exact re-solve" or "weighted stack") and lists the
sources; a stack also says why it is not a re-solve (``info["merge_note"]``: e.g. adapters saved without
statistics, as the tinyworld UCE preset saves them; erase with ``save_stats=True`` to merge exactly). Gated
adapters (SPM) keep their meaning only as separate files; merging them is refused.

>>> from erasekit.merge import merge
>>> merged = merge([uce_circle, uce_red], pipe=pipe)      # doctest: +SKIP
>>> merged.info["merge"]                                  # doctest: +SKIP
'exact re-solve'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapter import Adapter, ModuleDelta
from .errors import ConfigError

EXACT_METHODS = ("uce", "time")
STACK = "weighted stack"
EXACT = "exact re-solve"


def _name(adapter: Adapter) -> str:
    return f"{adapter.method} adapter for {', '.join(adapter.concepts) or 'nothing'}"


def exact_merge_obstacle(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> str | None:
    """Why no exact joint re-solve of ``adapters`` exists, or None when one does: it needs closed-form adapters
    (UCE, TIME) saved with their statistics, one λ, the same modules and unit weights."""
    from .methods import uce

    for a in adapters:
        if a.method not in EXACT_METHODS:
            return f"the {_name(a)} is not closed-form (only {', '.join(EXACT_METHODS)} adapters re-solve)"
        if not all(n in a.stats for n in uce.STAT_NAMES):
            return (f"the {_name(a)} was saved without the statistics of its solve (save_stats=False; the "
                    "tinyworld UCE preset saves none); erase with --save-stats to merge exactly")
    if len({a.config.get("lam") for a in adapters}) != 1:
        return f"the adapters were solved with different λ ({sorted({str(a.config.get('lam')) for a in adapters})})"
    if len({tuple(sorted(a.deltas)) for a in adapters}) != 1:
        return "the adapters edit different modules"
    if not all(float(w) == 1.0 for w in (weights or [])):
        return "weights other than 1 were given"
    return None


def can_merge_exactly(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> bool:
    """An exact joint re-solve exists (:func:`exact_merge_obstacle` finds nothing in the way)."""
    return exact_merge_obstacle(adapters, weights) is None


def merge(adapters: Sequence[Adapter], pipe=None, weights: Sequence[float] | None = None,
          exact: bool | None = None) -> Adapter:
    """Merge ``adapters`` into one adapter.

    Args:
        adapters: two or more loaded adapters.
        pipe: the base pipeline; needed for the exact re-solve (its weights give the new deltas).
        weights: one weight per adapter for the weighted stack (default 1 each).
        exact: force (True) or forbid (False) the exact re-solve; None: exact when possible and ``pipe`` given.

    Raises:
        ConfigError: fewer than two adapters, gated adapters, mismatched weights, or ``exact=True`` impossible.
    """
    adapters = list(adapters)
    if len(adapters) < 2:
        raise ConfigError("merge needs at least two adapters")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weights for {len(adapters)} adapters: give one weight per adapter")
    guards = [a for a in adapters if a.is_guard]
    if guards:
        raise ConfigError(f"{guards[0].method} adapter for {', '.join(guards[0].concepts)} is an inference-time guard "
                          f"({guards[0].guard.get('rule')}): it has no deltas to merge; load it beside the merged "
                          "adapter instead")
    gated = [a for a in adapters if not a.is_static]
    if gated:
        raise ConfigError(f"{gated[0].method} adapter for {', '.join(gated[0].concepts)} is gated "
                          f"({gated[0].gating.get('rule')}): gated adapters compose at generation time; load them "
                          "side by side instead of merging")
    obstacle = exact_merge_obstacle(adapters, weights)
    if exact and obstacle:
        raise ConfigError(f"no exact merge: {obstacle}")
    if exact is None:
        exact = obstacle is None and pipe is not None
        if obstacle is None and pipe is None:
            obstacle = "the exact re-solve needs the base pipeline (pipe), and none was given"
    elif not exact and obstacle is None:
        obstacle = "a weighted stack was asked for"
    if exact:
        if pipe is None:
            raise ConfigError("an exact merge re-solves on the base model: give the pipeline (--model)")
        from .methods import uce

        merged = uce.merge(adapters, pipe)
        merged.info["merge"] = EXACT
        return merged
    merged = stack(adapters, weights)
    merged.info["merge_note"] = f"deltas summed, not re-solved: {obstacle}"
    return merged


def stack(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """The weighted stack ``Σ_i w_i ΔW_i`` (module docstring)."""
    prints = [a.fingerprint for a in adapters if a.fingerprint]
    for a in adapters:
        for component, digest in a.fingerprint.items():
            other = next((p[component] for p in prints if component in p), digest)
            if other.get("architecture") != digest.get("architecture"):
                raise ConfigError("the adapters were made on models of different architectures; they cannot merge")
    names = sorted({k for a in adapters for k in a.deltas})
    deltas = {}
    for key in names:
        parts = [(w, a.deltas[key]) for a, w in zip(adapters, weights) if key in a.deltas]
        shapes = {d.weight_shape for _, d in parts}
        if len(shapes) != 1:
            raise ConfigError(f"the adapters disagree on the shape of {key}: {sorted(shapes)}")
        if all(d.delta is None for _, d in parts):
            deltas[key] = ModuleDelta(down=torch.cat([d.down.float() for _, d in parts], 0).contiguous(),
                                      up=torch.cat([w * d.up.float() for w, d in parts], 1).contiguous())
        else:
            deltas[key] = ModuleDelta(delta=sum(w * d.dense() for w, d in parts).contiguous())
    fingerprint: dict = {}
    for p in prints:
        for component, digest in p.items():
            fingerprint.setdefault(component, digest)
    concepts = tuple(c for a in adapters for c in a.concepts)
    sources = [{"method": a.method, "concepts": list(a.concepts), "weight": w, "config": a.config}
               for a, w in zip(adapters, weights)]
    methods = {a.method for a in adapters}
    return Adapter(method=methods.pop() if len(methods) == 1 else "merged", concepts=concepts,
                   config={"concepts": list(concepts), "weights": list(weights)}, deltas=deltas,
                   base_model=adapters[0].base_model, fingerprint=fingerprint,
                   info={"merge": STACK, "merged_from": sources})


__all__ = ["merge", "stack", "can_merge_exactly", "exact_merge_obstacle"]
