"""Merge several adapters into one file (``erasekit merge``).

Closed-form adapters (UCE, TIME) that carry their solve's statistics merge **exactly**: one joint re-solve of
UCE's Eq. 7 over all their erase and preserve keys (:func:`erasekit.methods.uce.merge`), equal to erasing all
concepts at once. Any other set of static adapters merges as a **weighted stack**: ``ΔW = Σ_i w_i ΔW_i`` per
module, low-rank factors concatenated (rank = the sum of ranks; ``up`` scaled by ``w_i``), full deltas summed.
The result's metadata says which (``info["merge"]``: "exact re-solve" or "weighted stack") and lists the
sources. Gated adapters (SPM) keep their meaning only as separate files; merging them is refused.

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


def can_merge_exactly(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> bool:
    """All adapters are closed-form with statistics, one λ, the same modules and unit weights: an exact joint
    re-solve exists."""
    from .methods import uce

    return (all(a.method in EXACT_METHODS and all(n in a.stats for n in uce.STAT_NAMES) for a in adapters)
            and len({a.config.get("lam") for a in adapters}) == 1
            and len({tuple(sorted(a.deltas)) for a in adapters}) == 1
            and all(float(w) == 1.0 for w in (weights or [])))


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
    gated = [a for a in adapters if not a.is_static]
    if gated:
        raise ConfigError(f"{gated[0].method} adapter for {', '.join(gated[0].concepts)} is gated "
                          f"({gated[0].gating.get('rule')}): gated adapters compose at generation time; load them "
                          "side by side instead of merging")
    possible = can_merge_exactly(adapters, weights)
    if exact and not possible:
        raise ConfigError("an exact merge needs closed-form adapters (uce, time) saved with statistics, with one λ, "
                          "the same modules and unit weights")
    if exact is None:
        exact = possible and pipe is not None
    if exact:
        if pipe is None:
            raise ConfigError("an exact merge re-solves on the base model: give the pipeline (--model)")
        from .methods import uce

        merged = uce.merge(adapters, pipe)
        merged.info["merge"] = EXACT
        return merged
    return stack(adapters, weights)


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


__all__ = ["merge", "stack", "can_merge_exactly"]
