"""Layered erasure: a closed-form cross-attention edit and ESD-u's fine-tuning of the rest of the UNet, one adapter.

Two published erasures that change disjoint parts of the UNet, erased each on the base model and stacked into one
static adapter (``ΔW = ΔW_UCE + ΔW_ESD-u``; no module carries both, so the stack is each part applied as it was
trained):

* **UCE** (Gandikota et al., WACV 2024, https://arxiv.org/abs/2308.14761, Eq. 7): the cross-attention key/value
  projections ``attn2.to_k``/``to_v`` map the concept's keys to its guide's values, the preserved keys held. It
  erases what the text *says*: the concept's words and prompts near them.
* **ESD-u** (Gandikota et al., ICCV 2023, https://arxiv.org/abs/2303.07345, §3; the authors' "esd-u" module set):
  every UNet layer but cross-attention is fine-tuned so that the conditional score on the concept equals the
  frozen model's negatively guided one,
  ``ε_θ(x_t, c, t) ← ε_θ₀(x_t, t) − η [ε_θ₀(x_t, c, t) − ε_θ₀(x_t, t)]``, with the preserved prompts' predictions
  held (``preserve_weight``; :mod:`erasekit.methods.esd`). It acts on what the UNet *draws*, whatever text
  conditioning reaches it: a soft prompt, a learned token or a searched prompt that slips past the cross-attention
  edit meets the unconditional layers' change too.

The ESD paper names esd-u the setting for concepts that must go from every prompt (nudity) and esd-x for those
tied to a word (an artist); UCE is the fast, specific word-level edit. Stacked, the word-level edit keeps the
concept's prompts from reaching the UNet and the layer-level change lowers what attacks that craft other text
bring back. On tinyworld (benchmarks/robust_tinyworld.py, issue #22 §2's first candidate): circle 100 % erased at
1.7 points, CCE's attack success 100 % (UCE alone) → 17 %, P4D 100 % → 50 %; SAGE still 100 % — it does not hold
against every attack (README, "Limits"; every candidate tried: docs/notes-robust.md).

``layered-adv`` (issue #22 §2's best candidate so far) trains the ESD-u part against the audit's soft-prompt attack
(``adversary_steps``: RACE's adversarial ESD, Kim et al., ECCV 2024) and guides the concept's prompts away from it
from its siblings (``anchors``; on tinyworld ``anchor_related``: the other shapes for circle), the siblings held
twice as hard (:mod:`erasekit.methods.esd`). On tinyworld (full suite, 2026-12-05), circle: 100 % erased at 3.1
points, the union of the six attacks 50 % (``layered``: 83 %); red and striped: 100 % erased, union 67 % (``layered``:
100 %), at 18.8 points of the other colours and textures (``layered``: 6.2 and 0) — it does not hold against every
attack either (README, "Limits"; docs/notes-robust.md).

The UCE part takes UCE's own presets for the model it erases from (:func:`erasekit.methods.presets.resolve`, as
``erasekit erase --method uce`` would) and this config's ``preserve``; the ESD-u part takes this config's ESD
fields. The adapter records both parts' configs (``info["parts"]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..adapter import Adapter
from ..errors import ConfigError
from .esd import EsdConfig
from .trainer import rollout_options, training_options


@dataclass(frozen=True)
@training_options
@rollout_options
class LayeredConfig:
    """Args:
        concepts: prompts to erase, e.g. ("circle",).
        templates: prompts ESD-u trains the concepts in, "{}" standing for the concept (ESD's ``templates``);
            empty: the bare concept, on tinyworld its caption templates.
        negative_guidance: ESD-u's η, the strength of the negative guidance in its target.
        preserve_weight: λ of ESD-u's preservation term (the preserved prompts' predictions held); 0 = the paper's
            ESD-u alone.
        preserve: prompts both parts keep: UCE's preserved keys, and the prompts whose predictions ESD-u holds
            (needs preserve_weight > 0).
        preserve_related: on tinyworld, ESD-u also holds the erased concepts' siblings (needs preserve_weight > 0).
        rank: rank of each ESD-u delta; 0 trains full-rank deltas, as the authors' code does.
        anchors: what ESD-u guides the concepts' prompts toward, away from the concept, instead of ∅ (ESD's
            ``anchors``): one for all concepts or one per concept, each one prompt or several separated by "|";
            empty = ESD-u's own target.
        anchor_related: on tinyworld, each concept's anchor is its siblings that are not erased.
        adversary_steps: steps of the soft-prompt attack run against ESD-u's student before each update (ESD's
            ``adversary_steps``); 0 = no adversary.
    """

    concepts: tuple[str, ...]
    templates: tuple[str, ...] = ()
    negative_guidance: float = 2.0
    preserve_weight: float = 0.0
    preserve: tuple[str, ...] = ()
    preserve_related: bool = False
    anchors: tuple[str, ...] = ()
    anchor_related: bool = False
    adversary_steps: int = 0

    def __post_init__(self):
        self.esd_u()  # ESD's checks (training fields, preservation), with its messages

    def esd_u(self) -> EsdConfig:
        """The ESD-u part's config: this config's fields, ``train_method="esd-u"``."""
        fields = {f.name for f in dataclasses.fields(EsdConfig)}
        return EsdConfig(train_method="esd-u", **{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


def erase(pipe, config: LayeredConfig) -> Adapter:
    """UCE's adapter and ESD-u's, both erased from ``pipe``'s base weights, stacked into one static adapter."""
    from ..merge import stack
    from . import METHODS
    from .presets import resolve

    cross = METHODS["uce"].erase(pipe, resolve("uce", pipe, {"preserve": config.preserve}, config.concepts))
    rest = METHODS["esd-u"].erase(pipe, config.esd_u())
    overlap = sorted(set(cross.deltas) & set(rest.deltas))
    if overlap:  # the module selections are disjoint by construction; a stack of overlapping parts would add up
        raise ConfigError(f"UCE's and ESD-u's deltas overlap on {overlap[0]}: the layered stack needs disjoint parts")
    stacked = stack([cross, rest], [1.0, 1.0])
    parts = [{"method": part.method, "config": part.config, "modules": len(part.deltas), "info": part.info}
             for part in (cross, rest)]
    method = "layered-adv" if config.adversary_steps else "layered"
    return dataclasses.replace(stacked, method=method, concepts=tuple(config.concepts),
                               config=dataclasses.asdict(config), info={"parts": parts})


__all__ = ["LayeredConfig", "erase"]
