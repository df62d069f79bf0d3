"""The adapter in memory: :class:`Adapter` (one erasure as ``ModuleDelta`` s plus its record) and :func:`describe`.

The file format's names (``FORMAT_VERSION``, the metadata keys, ``COMPONENTS``, ``GATING_RULES``, ``KINDS``,
``GUARD_RULES``) are defined here; writing and reading files is :mod:`erasekit.adapter.writer` /
:mod:`erasekit.adapter.reader`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.lora import ModuleDelta

FORMAT_VERSION = "1.3"  # major.minor this erasekit reads and writes; a reader refuses an unknown major
#: the format version that brought sparse full deltas (``….delta_values`` / ``_indices`` / ``_shape``): a file holding
#: one declares at least this version; files without them keep the version of their kind
SPARSE_SINCE = "1.2"
#: the format version that brought the ``transformer`` component (MMDiT pipelines: SD3, FLUX): a file whose deltas or
#: fingerprint name it declares at least this version (1.2 readers refuse its keys)
TRANSFORMER_SINCE = "1.3"
METADATA_KEY = "erasekit.adapter"
FORMAT_KEY = "erasekit.format"
#: the pipeline components an adapter may change: a UNet (SD 1.x/2.x/SDXL) or an MMDiT ``transformer`` (SD3, FLUX),
#: and the text encoders
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
#: the components that denoise (exactly one of them per pipeline): prompt gates and guards read its text context
DENOISERS = ("unet", "transformer")

#: gating rule -> the fields it needs in ``Adapter.gating`` (besides "rule") and their JSON types
GATING_RULES = {
    "static": {},
    "prompt_similarity": {"prompts": list, "metric": str, "facilitate_factor": (int, float)},
}

#: adapter kind -> the format version a file of that kind declares (the lowest that can hold it): weight adapters
#: are unchanged since 1.0, so they stay readable by every 1.x erasekit; inference-time guards came in 1.1
KINDS = {"weights": "1.0", "guard": "1.1"}

#: guard rule -> the fields it needs in ``Adapter.guard`` (besides "rule") and their JSON types; the rule's runtime
#: is registered under the same name in :data:`erasekit.compose.guards.GUARDS`
GUARD_RULES = {
    "safree": {"prompts": list, "alpha": (int, float), "pooling": str, "mask_token_id": int, "subspace": str,
               "project": str, "segments": list, "svf": dict, "reattention": dict},
}


@dataclass(frozen=True)
class Adapter:
    """An erasure, as returned by every strategy's ``erase(pipe, config)`` and stored in one file.

    Attributes:
        method: registry name of the strategy ("uce", "esd", ...).
        concepts: what was erased, as the user named it.
        config: the strategy's full config (``dataclasses.asdict`` of its frozen config). Must be JSON-able:
            tuples are stored as lists (and come back as lists).
        deltas: "<component>.<module path>" -> ModuleDelta, component in ``COMPONENTS`` (``unet`` or, for an MMDiT
            pipeline such as SD3's, ``transformer``; ``text_encoder``, ``text_encoder_2``).
        base_model: id or path of the model the deltas were computed on.
        fingerprint: component -> {"architecture": hex digest, "weights": hex digest} of that base
            (see :func:`fingerprint`).
        gating: {"rule": "static"}, or a prompt-similarity rule with what it needs (SPM); see ``GATING_RULES``.
        stats: optional named tensors (closed-form statistics for exact merging, gate embeddings as "gate.<name>",
            a guard's data as "guard.<name>").
        info: free-form extra record (merge provenance ...). The file's own stamps (created time, library
            versions, dtype) are in the file's record, see :func:`read_record`.
        guard: ``{}`` for a weight adapter; for an inference-time guard (no deltas: it filters the UNet's text
            context at generation time), its rule and parameters, ``{"rule": "safree", ...}``; see ``GUARD_RULES``.
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
    guard: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"guard"`` for an inference-time guard (``guard`` set, no deltas), else ``"weights"``."""
        return "guard" if self.guard else "weights"

    @property
    def is_guard(self) -> bool:
        return bool(self.guard)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(k.startswith(c + ".") for k in self.deltas))

    @property
    def is_static(self) -> bool:
        return self.gating.get("rule", "static") == "static"

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for d in self.deltas.values() for t in (d.down, d.up, d.delta) if t is not None)

    @property
    def is_low_rank(self) -> bool:
        """True when every delta is a (lora_A, lora_B) pair: the layout stock diffusers LoRA loading accepts."""
        return bool(self.deltas) and all(d.delta is None for d in self.deltas.values())

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of what this erasure does: method, concepts, config, gating, guard and every tensor (deltas
        and stats, with dtype and shape). Two adapters with one digest act alike; an audit records it per erasure,
        so that its results are not resumed for another adapter of the same name."""
        h = hashlib.sha256()
        record = {"method": self.method, "concepts": list(self.concepts), "config": self.config,
                  "gating": self.gating, "guard": self.guard}
        h.update(json.dumps(record, sort_keys=True, default=str).encode())
        tensors = {f"delta.{k}.{part}": t for k, d in self.deltas.items()
                   for part, t in (("down", d.down), ("up", d.up), ("delta", d.delta)) if t is not None}
        tensors.update({f"stats.{k}": t for k, t in self.stats.items()})
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32) -> Path:
        """Write this adapter to one ``.safetensors`` file, atomically. See :func:`save_adapter`."""
        from .writer import save_adapter

        return save_adapter(self, path, dtype=dtype)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Adapter:
        """Read and validate an adapter file. See :func:`load_adapter`."""
        from .reader import load_adapter

        return load_adapter(path)

    def describe(self) -> dict:
        """A JSON-able summary: the record plus one entry per module (kind, rank, weight shape). See :func:`describe`."""
        return describe(self)


def describe(adapter: Adapter, size: int | None = None) -> dict:
    """A JSON-able summary of ``adapter``: its record plus one entry per module (kind, rank, weight shape).

    ``size`` (the file's size in bytes), when given, is reported as ``"bytes"``.
    """
    out = {
        "kind": adapter.kind, "method": adapter.method, "concepts": list(adapter.concepts),
        "base_model": adapter.base_model,
        "components": list(adapter.components), "gating": adapter.gating, "config": adapter.config,
        "fingerprint": adapter.fingerprint, "parameters": adapter.num_parameters,
    }
    if size is not None:
        out["bytes"] = size
    if adapter.is_guard:
        out["guard"] = adapter.guard
    out.update({
        "stats": sorted(adapter.stats), "info": adapter.info,
        "modules": [_module_entry(k, d) for k, d in sorted(adapter.deltas.items())],
    })
    return out


def _module_entry(key: str, delta: ModuleDelta) -> dict:
    entry = {"module": key, "kind": "lowrank" if delta.delta is None else "full", "rank": delta.rank,
             "shape": list(delta.weight_shape)}
    if delta.delta is not None:
        from .spec import stored_sparse

        entry["nonzero"] = int(torch.count_nonzero(delta.delta))
        entry["stored"] = "sparse" if stored_sparse(delta.delta, delta.delta.dtype) else "dense"
    return entry
