"""The erasekit adapter: one ``.safetensors`` file holding an erasure as deltas, plus its record.

Format 1 (spec with a header example: ``adapters/README.md``). Tensors are deltas, never full weights,
keyed by component and diffusers module path::

    unet.<module path>.lora_A.weight          [r, in] (Conv2d: [r, in, kh, kw])   "down"
    unet.<module path>.lora_B.weight          [out, r] (Conv2d: [out, r, 1, 1])   "up"
    text_encoder.<module path>.delta          [out, in] (Conv2d: [out, in, kh, kw]), only where no low rank exists
    stats.<name>                              optional closed-form statistics for exact merging
    gate.<name>                               optional gating data (e.g. SPM's erased-prompt embeddings)

so that ``W_eff = W + weight · gate(prompt) · (lora_B @ lora_A)`` (or ``+ delta``). The record is one JSON
object under the ``erasekit.adapter`` metadata key (safetensors metadata values are strings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FORMAT_VERSION = "1.0"  # major.minor; a reader refuses an unknown major
METADATA_KEY = "erasekit.adapter"
FORMAT_KEY = "erasekit.format"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class ModuleDelta:
    """The change to one ``nn.Linear``/``nn.Conv2d`` weight: low-rank ``up @ down`` or a full ``delta``."""

    down: torch.Tensor | None = None  # lora_A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor | None = None  # lora_B: [out, r] or [out, r, 1, 1]
    delta: torch.Tensor | None = None  # [out, in] or [out, in, kh, kw]

    def __post_init__(self):
        low_rank = self.down is not None and self.up is not None
        if low_rank == (self.delta is not None) or (self.down is None) != (self.up is None):
            raise ValueError("a ModuleDelta is either (down, up) or delta")

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the module weight this delta applies to."""
        if self.delta is not None:
            return tuple(self.delta.shape)
        return (self.up.shape[0],) + tuple(self.down.shape[1:])

    def dense(self) -> torch.Tensor:
        """The full ΔW (fp32)."""
        if self.delta is not None:
            return self.delta.float()
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down).reshape(self.weight_shape)


@dataclass(frozen=True)
class Adapter:
    """An erasure, as returned by every strategy's ``erase(pipe, config)`` and stored in one file.

    Attributes:
        method: registry name of the strategy ("uce", "esd", ...).
        concepts: what was erased, as the user named it.
        config: the strategy's full config (``dataclasses.asdict`` of its frozen config).
        deltas: "<component>.<module path>" -> ModuleDelta, component in ``COMPONENTS``.
        base_model: id or path of the model the deltas were computed on.
        fingerprint: component -> {"architecture": hex digest, "weights": hex digest} of that base.
        gating: {"rule": "static"}, or a prompt-similarity rule with what it needs (SPM).
        stats: optional named tensors (closed-form statistics for exact merging, gate embeddings).
        info: free-form extra record (created time, library versions, merge provenance ...).
    """

    method: str
    concepts: tuple[str, ...]
    config: dict
    deltas: dict[str, ModuleDelta]
    base_model: str = ""
    fingerprint: dict = field(default_factory=dict)
    gating: dict = field(default_factory=lambda: {"rule": "static"})
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(k.startswith(c + ".") for k in self.deltas))

    @property
    def is_static(self) -> bool:
        return self.gating.get("rule", "static") == "static"

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for d in self.deltas.values() for t in (d.down, d.up, d.delta) if t is not None)
