"""Compose erasure adapters on a diffusers pipeline at generation time, without touching base weights.

For every adapted ``nn.Linear``/``nn.Conv2d`` of ``unet``, ``text_encoder`` and ``text_encoder_2``::

    W_eff = W + Σ_i w_i · γ_i(prompt) · B_i A_i          (or  + w_i · γ_i · Δ_i  for a full delta)

``w_i`` is the user's weight and ``γ_i`` the adapter's gate: 1 for static adapters, SPM's Facilitated Transport
similarity for membranes (``gating["rule"] == "prompt_similarity"``; Lyu et al. 2024, SPM, https://arxiv.org/abs/2312.16145).
The term is added to the module's *output* by one ``register_forward_hook`` per module (all adapters on that module
share it; their low-rank terms are stacked into one up-projection ``[B_1 … B_n] [c_1 A_1 x; …; c_n A_n x]``, so the
full-size output is touched once however many adapters compose; the arithmetic is ``erasekit.core.lora``'s ΔW
applier, shared with training), so base weights stay untouched: ``unload`` removes the hooks and outputs are
bit-identical to the base again. Weight 0 or a disabled adapter skips its term (bit-identical base output). ``fuse`` writes static adapters
into the weights (keeping a CPU copy of the originals, restored bit-exactly by ``unfuse``).

Gates are per sample. A forward pre-hook on the UNet reads ``encoder_hidden_states`` ``(B, L, D)`` and computes, for
each row b and each gated adapter with erased prompts ``P``::

    γ_b = factor · max_{q ∈ P} max(clipcos(row_b, q), tokenuni(row_b, q))
    clipcos(p, q)  = cos(flatten(E(p)), flatten(E(q)))        E = the pipeline's own prompt encoding (77 × D)
    tokenuni(p, q) = |tok(p) ∩ tok(q)| / |tok(q)|             special tokens removed
    tokencos(p, q) = mean_{j ∈ tok(q)} max(0, max_{i ∈ tok(p)} cos(W_i, W_j))   W: the encoder's token embeddings

so a classifier-free-guidance batch ``[uncond…, cond…]`` gets each row's own gate (the unconditional row too —
unlike the reference, which applies the positive prompt's γ to both branches). ``E(q)`` is computed once at load with
``erasekit.core.sd.encode`` (what ``pipe.encode_prompt`` gives; hooks off). The token ids of a row are recovered by a forward hook on ``text_encoder`` that
remembers the ids behind each hidden-state row it produced (rows are matched by a hash of their content; for SDXL
the first encoder's slice of the context); where they are unknown (``prompt_embeds`` passed directly, ``clip_skip``)
the gate falls back to clipcos alone. Gates are computed once per prompt batch: the denoising loop passes the same
``encoder_hidden_states`` tensor at every step, and the last one's gates are reused. They are constants for autograd
(no gradient flows through γ).

``tokencos`` (metric ``"tokencos"``, alone) is erasekit's soft ``tokenuni``: token identity is replaced by the
cosine of the encoder's input token embeddings, so it is 1 where ``tokenuni`` is 1 and ≥ ``tokenuni`` everywhere,
and a synonym scores by how close its token embedding is. Use it where the flattened ``clipcos`` does not separate
prompts (tinyworld's 64-wide encoder: 0.83 on prompts of the erased concept, 0.84 on all others; ``tokencos``:
1.0, 0.58–0.78 on synonyms, ≤ 0.17 on others).

The gating record (``Adapter.gating``) read here::

    {"rule": "prompt_similarity",
     "prompts": ["nudity", ...],            # the erased prompts P
     "metric": "clipcos_tokenuni",          # or "clipcos", "tokenuni", "tokencos"
     "facilitate_factor": 1.0,              # multiplies γ
     "combine": "sum"}                      # optional; "factors": the reference code's factor summing (below)

``combine == "factors"`` reproduces the SPM reference's weight merge: each factor is scaled before summing, so the
adapters ``i`` combined this way on one module contribute ``(Σ_i w_i γ_i B_i)(Σ_j γ_j A_j)`` — ``γ²`` for one adapter
and cross terms ``B_i A_j`` for several (their ranks must match) — instead of the linear ``Σ_i w_i γ_i B_i A_i``.

State lives in one ``Composer`` per UNet, kept in a ``weakref.WeakKeyDictionary`` keyed by ``pipe.unet`` (the
pipeline object is not modified; the composer holds its components weakly, so it goes away with them). The hooks live
on the modules, so keying by the UNet means that pipelines sharing it (``Pipeline.from_pipe(pipe)``) share the erasures
too, and any of them can list, disable or unload them.

Example::

    from erasekit import compose
    name = compose.load(pipe, "adapters/vangogh.uce.safetensors", weight=1.0)
    image = pipe("a starry night").images[0]
    with compose.disabled(pipe):
        base = pipe("a starry night").images[0]
    compose.unload(pipe)                        # bitwise back to the base model
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import COMPONENTS, GATING_RULES, Adapter, ModuleDelta, check_compatible, find_module, load_adapter
from .core import sd
from .core.lora import add_low_rank, project_down, project_up
from .errors import AdapterError, AdapterMismatchError

logger = logging.getLogger(__name__)

__all__ = [
    "Composer", "load", "set_weights", "enable", "disable", "disabled", "fuse", "unfuse", "unload",
    "list_erasures", "gates",
]

GATE_METRICS = ("clipcos_tokenuni", "clipcos", "tokenuni", "tokencos")
GATE_COMBINES = ("sum", "factors")
_CACHE_SIZE = 1024  # hidden-state rows whose token ids are remembered


# --------------------------------------------------------------------------------------------------------------
# One adapter on one module, and one adapted module
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Term:
    """One adapter's delta on one module, cast to the module's device/dtype (re-cast if the module moves)."""

    name: str
    delta: ModuleDelta
    tensors: tuple[torch.Tensor, ...] = ()  # (down, up) or (delta,), on the module's device/dtype

    def cast(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.tensors or self.tensors[0].device != weight.device or self.tensors[0].dtype != weight.dtype:
            source = (self.delta.delta,) if self.delta.delta is not None else (self.delta.down, self.delta.up)
            self.tensors = tuple(t.to(device=weight.device, dtype=weight.dtype).contiguous() for t in source)
        return self.tensors

    @property
    def low_rank(self) -> bool:
        return self.delta.delta is None


@dataclass
class _Slot:
    """An adapted module: its hook, the adapters' terms on it, and the original weight while fused."""

    key: str  # "<component>.<module path>" as in the adapter
    module: nn.Module
    terms: dict[str, _Term] = field(default_factory=dict)
    handle: object = None
    original: torch.Tensor | None = None  # CPU copy of the base weight while any adapter is fused
    _stack_of: list = field(default_factory=list)  # the term tensors behind _stack
    _stack: tuple = ()

    def down(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return project_down(self.module, x, w)

    def up(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return project_up(self.module, h, w)

    def term(self, x: torch.Tensor, term: _Term) -> torch.Tensor:
        tensors = term.cast(self.module.weight)
        if term.low_rank:
            return self.up(self.down(x, tensors[0]), tensors[1])
        return self.down(x, tensors[0])  # a full delta is applied like the module itself, without bias

    def stacked(self, terms: list[_Term]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``[A_1; …; A_n]``, ``[B_1 … B_n]`` and the ranks of low-rank terms, cached while the terms' tensors stay."""
        tensors = [term.cast(self.module.weight) for term in terms]
        if len(tensors) == 1:
            return tensors[0][0], tensors[0][1], [tensors[0][0].shape[0]]
        flat = [t for pair in tensors for t in pair]
        if len(flat) != len(self._stack_of) or any(a is not b for a, b in zip(flat, self._stack_of)):
            self._stack_of = flat
            self._stack = (torch.cat([d for d, _ in tensors], 0), torch.cat([u for _, u in tensors], 1),
                           [d.shape[0] for d, _ in tensors])
        return self._stack

    def add_low_rank(self, x: torch.Tensor, output: torch.Tensor, terms: list[_Term], coefs: list) -> torch.Tensor:
        """``output + Σ_i B_i (c_i A_i x)`` with the stacked factors (see ``erasekit.core.lora.add_low_rank``)."""
        down, up, ranks = self.stacked(terms)
        return add_low_rank(self.module, x, output, down, up, coefs, ranks)


@dataclass
class _Gate:
    """What a prompt-similarity adapter needs at generation (SPM's Facilitated Transport)."""

    prompts: tuple[str, ...]
    embeds: torch.Tensor  # (Q, L, D) fp32, the pipeline's own encoding of the erased prompts
    token_sets: tuple[frozenset[int], ...]  # tok(q) without special tokens; empty when no tokenizer
    metric: str = "clipcos_tokenuni"
    factor: float = 1.0
    combine: str = "sum"
    token_embedding: torch.Tensor | None = None  # (V, D) the text encoder's input embeddings (tokencos; shared)


@dataclass
class _Loaded:
    name: str
    adapter: Adapter
    weight: float
    enabled: bool = True
    fused: bool = False
    gate: _Gate | None = None


# --------------------------------------------------------------------------------------------------------------
# The composer
# --------------------------------------------------------------------------------------------------------------

_COMPOSERS: "weakref.WeakKeyDictionary[nn.Module, Composer]" = weakref.WeakKeyDictionary()


def _key(pipe):
    """The registry key of a pipeline: its UNet, where the hooks live (the pipeline itself if it has none)."""
    unet = getattr(pipe, "unet", None)
    return unet if isinstance(unet, nn.Module) else pipe


def _row_key(row: torch.Tensor) -> bytes:
    """A content key for one hidden-state row (used to match UNet context rows to text-encoder calls)."""
    data = row.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16)
    digest.update(repr((tuple(data.shape), str(data.dtype))).encode())
    return digest.digest()


class Composer:
    """The erasures loaded on one UNet (and the pipelines sharing it): adapters, per-module hooks, gates, fused state.

    Obtain it with ``Composer.of(pipe)``; the module-level functions (``load``, ``fuse``, ...) are thin wrappers.
    """

    def __init__(self, pipe):
        self._components: dict[str, weakref.ref] = {
            c: weakref.ref(getattr(pipe, c)) for c in COMPONENTS if isinstance(getattr(pipe, c, None), nn.Module)
        }
        self.tokenizer = getattr(pipe, "tokenizer", None)
        self.adapters: dict[str, _Loaded] = {}
        self.slots: dict[str, _Slot] = {}
        self._suspended = 0  # > 0: every hook is a no-op (used while encoding the erased prompts)
        self._gate_handles: list = []
        self._current_gates: dict[str, torch.Tensor] | None = None
        self._coefficients: dict[tuple, torch.Tensor] = {}  # w·γ shaped for one output layout, per UNet call
        self._last_context: tuple | None = None  # (weakref to encoder_hidden_states, version, gates)
        self._token_ids: OrderedDict[bytes, frozenset[int]] = OrderedDict()

    # ---- registry --------------------------------------------------------------------------------------------

    @classmethod
    def of(cls, pipe, create: bool = True) -> "Composer | None":
        """The composer of ``pipe`` (created on first use when ``create``)."""
        composer = _COMPOSERS.get(_key(pipe))
        if composer is None and create:
            composer = _COMPOSERS[_key(pipe)] = cls(pipe)
        return composer

    def component(self, name: str) -> nn.Module | None:
        ref = self._components.get(name)
        return ref() if ref is not None else None

    # ---- names -----------------------------------------------------------------------------------------------

    def _get(self, name: str) -> _Loaded:
        if name not in self.adapters:
            loaded = sorted(self.adapters) or "none"
            raise AdapterError(f"unknown erasure {name!r}; loaded erasures: {loaded}")
        return self.adapters[name]

    def _names(self, names: str | Iterable[str] | None) -> list[str]:
        if names is None:
            return list(self.adapters)
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            self._get(name)
        return names

    # ---- load --------------------------------------------------------------------------------------------------

    def load(self, pipe, adapter: Adapter, name: str, weight: float, strict: bool) -> str:
        if name in self.adapters:
            raise AdapterError(f"an erasure named {name!r} is already loaded; pass another name= or unload it first")
        weight = _check_weight(weight, name)
        check_compatible(adapter, pipe, strict=strict)
        gate_spec = _gate_spec(adapter, name)

        # 1. Resolve and check every module before changing anything.
        targets: list[tuple[str, nn.Module, ModuleDelta]] = []
        for key, delta in adapter.deltas.items():
            component, _, path = key.partition(".")
            if component not in COMPONENTS:
                raise AdapterMismatchError(f"erasure {name!r}: key {key!r} names no component of {COMPONENTS}")
            root = self.component(component)
            if root is None:
                raise AdapterMismatchError(f"erasure {name!r} changes {component!r}, which this pipeline does not have")
            if gate_spec is not None and component != "unet":
                raise AdapterError(
                    f"erasure {name!r} is gated by prompt similarity but changes {key!r}: gates are computed from "
                    "the UNet's encoder_hidden_states, so gated deltas must be on the unet only")
            module = find_module(root, path)
            if module is None:
                raise AdapterMismatchError(f"erasure {name!r}: module {path!r} not found in pipe.{component}")
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise AdapterMismatchError(
                    f"erasure {name!r}: {key!r} is a {type(module).__name__}, expected nn.Linear or nn.Conv2d")
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                raise AdapterMismatchError(f"erasure {name!r}: {key!r} is a grouped or non-zero-padded Conv2d")
            if tuple(delta.weight_shape) != tuple(module.weight.shape):
                raise AdapterMismatchError(
                    f"erasure {name!r}: {key!r} has delta shape {tuple(delta.weight_shape)}, "
                    f"the module's weight is {tuple(module.weight.shape)}")
            if gate_spec is not None and gate_spec["combine"] == "factors":
                self._check_factor_ranks(key, delta, name)
            targets.append((key, module, delta))

        gate = self._build_gate(pipe, gate_spec) if gate_spec is not None else None

        # 2. Register.
        self.adapters[name] = _Loaded(name, adapter, weight, gate=gate)
        for key, module, delta in targets:
            slot = self.slots.get(key)
            if slot is None:
                slot = self.slots[key] = _Slot(key, module)
                slot.handle = module.register_forward_hook(self._make_hook(slot))
            slot.terms[name] = _Term(name, delta)
            slot.terms[name].cast(module.weight)  # cast once at load
        if gate is not None:
            self._ensure_gate_hooks()
        return name

    def _check_factor_ranks(self, key: str, delta: ModuleDelta, name: str) -> None:
        if delta.delta is not None:
            raise AdapterError(f"erasure {name!r}: combine='factors' needs low-rank deltas, {key!r} is a full delta")
        slot = self.slots.get(key)
        for other, term in (slot.terms.items() if slot else ()):
            loaded = self.adapters[other]
            if loaded.gate is not None and loaded.gate.combine == "factors" and term.delta.rank != delta.rank:
                raise AdapterError(
                    f"erasure {name!r}: combine='factors' sums factors, but {key!r} has rank {delta.rank} here and "
                    f"rank {term.delta.rank} in erasure {other!r}")

    def _build_gate(self, pipe, spec: dict) -> _Gate:
        prompts = tuple(spec["prompts"])
        with self._hooks_suspended(), torch.no_grad():
            embeds = sd.encode(pipe, list(prompts)).embeds  # (Q, L, D), as pipe.encode_prompt
        token_sets: tuple[frozenset[int], ...] = ()
        if self.tokenizer is not None:
            special = set(self.tokenizer.all_special_ids)
            ids = self.tokenizer(list(prompts), truncation=True, max_length=self.tokenizer.model_max_length).input_ids
            token_sets = tuple(frozenset(i for i in row if i not in special) for row in ids)
        token_embedding = None
        encoder = self.component("text_encoder")
        if spec["metric"] == "tokencos" and encoder is not None and token_sets:
            token_embedding = encoder.get_input_embeddings().weight.detach()  # a view: no copy
        unet = self.component("unet")
        device = next(unet.parameters()).device
        return _Gate(prompts, embeds.detach().to(device=device, dtype=torch.float32), token_sets,
                     spec["metric"], spec["factor"], spec["combine"], token_embedding)

    # ---- hooks -----------------------------------------------------------------------------------------------

    @contextmanager
    def _hooks_suspended(self):
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def _active(self, name: str) -> _Loaded | None:
        loaded = self.adapters.get(name)
        if loaded is None or not loaded.enabled or loaded.fused or loaded.weight == 0.0:
            return None
        return loaded

    def _make_hook(self, slot: _Slot):
        def hook(module, args, output):
            if self._suspended:
                return None
            active = [(t, loaded) for t in slot.terms.values() if (loaded := self._active(t.name)) is not None]
            if not active:
                return None  # bit-identical base output
            x = args[0]
            factored, low_rank, coefs = [], [], []
            for term, loaded in active:
                if loaded.gate is not None and loaded.gate.combine == "factors":
                    factored.append((term, loaded))
                    continue
                coef = self._coefficient(loaded, output, slot)
                if term.low_rank:  # stacked below: Σ_i B_i (c_i A_i x) as one down- and one up-projection
                    low_rank.append(term)
                    coefs.append(coef)
                    continue
                delta = slot.term(x, term)
                output = output + (delta if isinstance(coef, float) and coef == 1.0 else delta * coef)
            if low_rank:  # the full-size output is touched once, however many low-rank adapters
                output = slot.add_low_rank(x, output, low_rank, coefs)
            if factored:
                output = output + self._factored_term(x, output, slot, factored)
            return output

        return hook

    def _coefficient(self, loaded: _Loaded, output: torch.Tensor, slot: _Slot, with_weight: bool = True):
        """``w_i`` (a float) for a static adapter; ``w_i γ_i`` per sample, shaped to broadcast, for a gated one."""
        weight = loaded.weight if with_weight else 1.0
        if loaded.gate is None:
            return weight
        if self._current_gates is None or loaded.name not in self._current_gates:
            raise AdapterError(
                f"gated erasure {loaded.name!r}: module {slot.key!r} ran outside a UNet forward with "
                "encoder_hidden_states, so its prompt gate is unknown")
        memo = (loaded.name, weight, tuple(output.shape[:1]), output.ndim, output.dtype, output.device)
        if memo in self._coefficients:
            return self._coefficients[memo]
        gate = self._current_gates[loaded.name]
        batch = output.shape[0]
        if gate.shape[0] != batch:
            if bool((gate == gate[0]).all()):
                gate = gate[:1].expand(batch)
            else:
                raise AdapterError(
                    f"gated erasure {loaded.name!r}: per-sample gates for a batch of {gate.shape[0]}, but module "
                    f"{slot.key!r} produced a batch of {batch}")
        coef = (gate * weight).to(device=output.device, dtype=output.dtype).view(batch, *([1] * (output.ndim - 1)))
        self._coefficients[memo] = coef
        return coef

    def _factored_term(self, x, output, slot: _Slot, factored) -> torch.Tensor:
        """``(Σ_i w_i γ_i B_i)(Σ_j γ_j A_j) x``, computed as ``Σ_i w_i γ_i B_i (Σ_j γ_j A_j x)`` (SPM reference)."""
        hidden = None
        for term, loaded in factored:
            down = slot.down(x, term.cast(slot.module.weight)[0])
            h = down * self._coefficient(loaded, down, slot, with_weight=False)
            hidden = h if hidden is None else hidden + h
        total = None
        for term, loaded in factored:
            up = slot.up(hidden, term.cast(slot.module.weight)[1]) * self._coefficient(loaded, output, slot)
            total = up if total is None else total + up
        return total

    def _ensure_gate_hooks(self) -> None:
        if self._gate_handles:
            return
        unet = self.component("unet")
        self._gate_handles.append(unet.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True))
        self._gate_handles.append(unet.register_forward_hook(self._unet_post_hook, always_call=True))
        encoder = self.component("text_encoder")
        if encoder is not None and self.tokenizer is not None:
            self._gate_handles.append(encoder.register_forward_hook(self._text_encoder_hook, with_kwargs=True))

    def _remove_gate_hooks(self) -> None:
        for handle in self._gate_handles:
            handle.remove()
        self._gate_handles = []
        self._current_gates = None
        self._last_context = None
        self._token_ids.clear()

    def _text_encoder_hook(self, module, args, kwargs, output):
        """Remember the token ids behind each hidden-state row the text encoder produced (for tokenuni)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or self._suspended:
            return None
        special = set(self.tokenizer.all_special_ids)
        rows = [output[0]]
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is not None and len(hidden_states) > 1:
            rows.append(hidden_states[-2])  # SDXL's penultimate-layer context
        for states in rows:
            for ids, row in zip(input_ids.tolist(), states):
                self._remember(self._token_ids, _row_key(row), frozenset(i for i in ids if i not in special))
        return None

    def _unet_pre_hook(self, module, args, kwargs):
        if self._suspended:
            return None
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if context is None:
            self._current_gates = None
            return None
        self._coefficients.clear()
        last = self._last_context
        if last is not None and last[0]() is context and last[1] == context._version:
            self._current_gates = last[2]  # same prompt batch as the previous denoising step
        else:
            self._current_gates = self.compute_gates(context)
            self._last_context = (weakref.ref(context), context._version, self._current_gates)
        return None

    def _unet_post_hook(self, module, args, output):
        self._current_gates = None
        self._coefficients.clear()
        return None

    @staticmethod
    def _remember(cache: OrderedDict, key, value) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)

    # ---- gates -------------------------------------------------------------------------------------------------

    def compute_gates(self, context: torch.Tensor) -> dict[str, torch.Tensor]:
        """γ for every gated adapter and every row of ``context`` ``(B, L, D)``: name -> ``(B,)`` fp32 tensor."""
        gated = {n: a for n, a in self.adapters.items() if a.gate is not None}
        if not gated:
            return {}
        tokens = [self._tokens_for(row) for row in context] if self._token_ids else [None] * context.shape[0]
        return {name: _similarity(loaded.gate, context, tokens) for name, loaded in gated.items()}

    def _tokens_for(self, row: torch.Tensor) -> frozenset[int] | None:
        tokens = self._token_ids.get(_row_key(row))
        encoder = self.component("text_encoder")
        width = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if tokens is None and width is not None and row.shape[-1] > width:
            tokens = self._token_ids.get(_row_key(row[..., :width]))  # SDXL: [encoder 1 | encoder 2] context
        return tokens

    # ---- weights, switches -------------------------------------------------------------------------------------

    def set_weight(self, name: str, weight: float) -> None:
        loaded = self._get(name)
        weight = _check_weight(weight, name)
        if loaded.fused and weight != loaded.weight:
            raise AdapterError(f"erasure {name!r} is fused into the weights; call unfuse() before changing its weight")
        loaded.weight = weight

    def set_enabled(self, name: str, enabled: bool) -> None:
        loaded = self._get(name)
        if loaded.fused and not enabled:
            raise AdapterError(f"erasure {name!r} is fused into the weights; call unfuse() before disabling it")
        loaded.enabled = enabled

    # ---- fuse --------------------------------------------------------------------------------------------------

    def fuse(self, names: str | Iterable[str] | None) -> list[str]:
        if names is None:
            chosen = [n for n, a in self.adapters.items() if a.gate is None and a.enabled and not a.fused]
            skipped = [n for n, a in self.adapters.items() if a.gate is not None]
            if skipped:
                logger.info("not fusing gated erasures %s: they stay applied through hooks", skipped)
        else:
            chosen = self._names(names)
            for name in chosen:
                loaded = self.adapters[name]
                if loaded.gate is not None:
                    raise AdapterError(
                        f"erasure {name!r} is gated by prompt similarity ({loaded.gate.metric}); fusing it into the "
                        "weights would lose the gating, so it stays applied through hooks")
                if not loaded.enabled:
                    raise AdapterError(f"erasure {name!r} is disabled; enable it before fusing")
        for name in chosen:
            self.adapters[name].fused = True
        self._sync_fused_weights([s for s in self.slots.values() if any(n in s.terms for n in chosen)])
        return chosen

    def unfuse(self) -> None:
        for loaded in self.adapters.values():
            loaded.fused = False
        self._sync_fused_weights([s for s in self.slots.values() if s.original is not None])

    def _sync_fused_weights(self, slots: Sequence[_Slot]) -> None:
        """Set each slot's weight to ``W + Σ_fused w_i ΔW_i`` computed in fp32 from the original (or restore it)."""
        for slot in slots:
            weight = slot.module.weight
            fused = [(t, self.adapters[n]) for n, t in slot.terms.items() if self.adapters[n].fused]
            with torch.no_grad():
                if not fused:
                    if slot.original is not None:
                        weight.copy_(slot.original)  # bit-exact restore
                        slot.original = None
                    continue
                if slot.original is None:
                    slot.original = weight.detach().to("cpu", copy=True)
                total = slot.original.to(device=weight.device, dtype=torch.float32)
                for term, loaded in fused:
                    total = total + loaded.weight * term.delta.dense().to(weight.device)
                weight.copy_(total.to(weight.dtype))

    # ---- unload ------------------------------------------------------------------------------------------------

    def unload(self, names: str | Iterable[str] | None) -> None:
        names = self._names(names)
        for name in names:
            del self.adapters[name]
        touched = []
        for key, slot in list(self.slots.items()):
            if not any(n in slot.terms for n in names):
                continue
            for name in names:
                slot.terms.pop(name, None)
            touched.append(slot)
        self._sync_fused_weights(touched)  # restores the original where nothing fused is left
        for slot in touched:
            if not slot.terms:
                slot.handle.remove()
                del self.slots[slot.key]
        if not any(a.gate is not None for a in self.adapters.values()):
            self._remove_gate_hooks()
        else:
            self._last_context = None

    # ---- listing -----------------------------------------------------------------------------------------------

    def listing(self) -> list[dict]:
        return [
            dict(name=a.name, method=a.adapter.method, concepts=list(a.adapter.concepts), weight=a.weight,
                 enabled=a.enabled, fused=a.fused, gated=a.gate is not None)
            for a in self.adapters.values()
        ]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _check_weight(weight, name: str) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise AdapterError(f"weight of erasure {name!r} must be a number, got {weight!r}") from None
    if not math.isfinite(value):
        raise AdapterError(f"weight of erasure {name!r} must be finite, got {weight!r}")
    return value


def _gate_spec(adapter: Adapter, name: str) -> dict | None:
    gating = dict(adapter.gating or {"rule": "static"})
    rule = gating.get("rule", "static")
    if rule not in GATING_RULES:
        raise AdapterError(f"erasure {name!r}: unknown gating rule {rule!r}; expected one of {tuple(GATING_RULES)}")
    if rule == "static":
        return None
    prompts = gating.get("prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise AdapterError(f"erasure {name!r}: a prompt_similarity gate needs gating['prompts'], got {prompts!r}")
    metric = gating.get("metric", "clipcos_tokenuni")
    if metric not in GATE_METRICS:
        raise AdapterError(f"erasure {name!r}: unknown gate metric {metric!r}; expected one of {GATE_METRICS}")
    combine = gating.get("combine", "sum")
    if combine not in GATE_COMBINES:
        raise AdapterError(f"erasure {name!r}: unknown gate combine {combine!r}; expected one of {GATE_COMBINES}")
    factor = _check_weight(gating.get("facilitate_factor", gating.get("factor", 1.0)), name)
    return dict(prompts=list(prompts), metric=metric, combine=combine, factor=factor)


def _similarity(gate: _Gate, context: torch.Tensor, tokens: list[frozenset[int] | None]) -> torch.Tensor:
    """SPM Facilitated Transport: ``factor · max_q max(clipcos, tokenuni)`` for each row of ``context`` → ``(B,)``."""
    rows = context.detach().float()  # (B, L, D)
    if gate.embeds.device != rows.device:
        gate.embeds = gate.embeds.to(rows.device)  # the pipeline moved since load
    embeds = gate.embeds  # (Q, L', D)
    if rows.shape[-1] != embeds.shape[-1]:
        raise AdapterMismatchError(
            f"gate prompts encode to width {embeds.shape[-1]}, but the UNet context has width {rows.shape[-1]}")
    length = min(rows.shape[1], embeds.shape[1])
    a = F.normalize(rows[:, :length].flatten(1), dim=1)
    b = F.normalize(embeds[:, :length].flatten(1), dim=1)
    score = a @ b.T  # clipcos, (B, Q)
    if gate.metric != "clipcos" and gate.token_sets and any(t is not None for t in tokens):
        # NaN where tok(p) is unknown or tok(q) is empty: clipcos alone there
        if gate.metric == "tokencos" and gate.token_embedding is not None:
            overlap = _tokencos(gate.token_embedding, tokens, gate.token_sets)
        else:  # tokenuni(p, q) = |tok(p) ∩ tok(q)| / |tok(q)|
            overlap = torch.tensor(
                [[len(t & q) / len(q) if t is not None and q else math.nan for q in gate.token_sets] for t in tokens],
                dtype=torch.float32)
        overlap = overlap.to(device=score.device, dtype=score.dtype)
        matched = overlap if gate.metric in ("tokenuni", "tokencos") else torch.maximum(score, overlap)
        score = torch.where(torch.isnan(overlap), score, matched)
    return gate.factor * score.max(dim=1).values


def _tokencos(embedding: torch.Tensor, tokens: list[frozenset[int] | None],
              token_sets: tuple[frozenset[int], ...]) -> torch.Tensor:
    """``tokencos(p, q) = mean_{j ∈ q} max(0, max_{i ∈ p} cos(W_i, W_j))`` for rows ``p`` × gate prompts ``q``:
    ``(B, Q)`` fp32, NaN where ``p`` is unknown (``None``) or ``q`` is empty, 0 where ``p`` has no tokens."""
    out = torch.full((len(tokens), len(token_sets)), math.nan)
    unit = {t: F.normalize(embedding[sorted(t)].detach().float(), dim=-1) for t in {*token_sets, *tokens} if t}
    for b, p in enumerate(tokens):
        for q_index, q in enumerate(token_sets):
            if p is not None and q:  # each token of q: its closest token of p
                out[b, q_index] = (unit[q] @ unit[p].T).max(dim=1).values.clamp(min=0.0).mean().cpu() if p else 0.0
    return out


def as_adapter(adapter_or_path) -> tuple[Adapter, str]:
    """``(adapter, default name)``; a path is read with ``erasekit.adapter.load_adapter``."""
    if isinstance(adapter_or_path, Adapter):
        adapter = adapter_or_path
        return adapter, "-".join([adapter.method, "+".join(adapter.concepts)]) if adapter.concepts else adapter.method
    if isinstance(adapter_or_path, (str, Path)):
        path = Path(adapter_or_path)
        name = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem
        return load_adapter(path), name
    raise AdapterError(f"expected an Adapter or a path to an adapter file, got {type(adapter_or_path).__name__}")


def _composer(pipe) -> Composer:
    composer = Composer.of(pipe, create=False)
    if composer is None:
        raise AdapterError("unknown erasure: no erasures are loaded on this pipeline")
    return composer


# --------------------------------------------------------------------------------------------------------------
# Public API: functions on any stock pipeline
# --------------------------------------------------------------------------------------------------------------


def load(pipe, adapter_or_path: Adapter | str | Path, name: str | None = None, weight: float = 1.0,
         strict: bool = False) -> str:
    """Apply an erasure to ``pipe`` through forward hooks and return its name.

    >>> import erasekit
    >>> from erasekit import compose
    >>> pipe = erasekit.load_pipeline(device="cpu")
    >>> compose.load(pipe, erasekit.erase(pipe, "uce", ["circle"]), name="circle")
    'circle'
    >>> [(e["name"], e["method"], e["weight"]) for e in compose.list_erasures(pipe)]
    [('circle', 'uce', 1.0)]
    >>> compose.unload(pipe)                                   # the base model again, bit for bit

    Args:
        pipe: a diffusers pipeline with ``unet`` (and ``text_encoder``/``text_encoder_2`` if the adapter changes them).
        adapter_or_path: an ``Adapter`` or the path of an adapter ``.safetensors`` file.
        name: the erasure's name; defaults to the file name without ``.safetensors``, or ``"<method>-<concepts>"``.
        weight: ``w`` in ``W + w·γ·B A``; 0 leaves the output bit-identical to the base.
        strict: passed to ``erasekit.adapter.check_compatible`` (refuse an adapter made on another checkpoint).

    Raises:
        AdapterError: duplicate name, bad gating record; ``AdapterMismatchError`` for a missing module or shape.
    """
    adapter, default = as_adapter(adapter_or_path)
    return Composer.of(pipe).load(pipe, adapter, name or default, weight, strict)


def set_weights(pipe, names: str | Sequence[str], weights: float | Sequence[float]) -> None:
    """Set ``w_i`` of each named erasure (one weight for all, or one per name)."""
    composer = _composer(pipe)
    names = composer._names(names)
    if isinstance(weights, str) or not isinstance(weights, Iterable):
        weights = [weights] * len(names)  # one weight for all (a bad value is reported by name below)
    weights = list(weights)
    if len(weights) != len(names):
        raise AdapterError(f"got {len(weights)} weights for {len(names)} erasures {names}")
    for name, weight in zip(names, weights):
        composer.set_weight(name, weight)


def enable(pipe, name: str) -> None:
    """Turn an erasure back on."""
    _composer(pipe).set_enabled(name, True)


def disable(pipe, name: str) -> None:
    """Turn an erasure off (its term is skipped: bit-identical to not having it)."""
    _composer(pipe).set_enabled(name, False)


@contextmanager
def disabled(pipe):
    """Context manager: every erasure off (fused ones unfused) inside, the previous state restored in ``finally``."""
    composer = Composer.of(pipe, create=False)
    if composer is None or not composer.adapters:
        yield
        return
    fused = [n for n, a in composer.adapters.items() if a.fused]
    enabled = {n: a.enabled for n, a in composer.adapters.items()}
    composer.unfuse()
    for loaded in composer.adapters.values():
        loaded.enabled = False
    try:
        yield
    finally:
        for name, was_enabled in enabled.items():
            if name in composer.adapters:
                composer.adapters[name].enabled = was_enabled
        still = [n for n in fused if n in composer.adapters]
        if still:
            composer.fuse(still)


def fuse(pipe, names: str | Sequence[str] | None = None) -> list[str]:
    """Write static erasures into the base weights (``W ← W + w ΔW`` in fp32); returns the names fused.

    ``names=None`` fuses every enabled static erasure and leaves gated ones on their hooks; naming a gated erasure
    raises ``AdapterError`` (its gating would be lost). A CPU copy of each fused module's original weight is kept.
    """
    return _composer(pipe).fuse(names)


def unfuse(pipe) -> None:
    """Restore the original weights of every fused module bit-exactly; the erasures stay loaded (hooks)."""
    composer = Composer.of(pipe, create=False)
    if composer is not None:
        composer.unfuse()


def unload(pipe, names: str | Sequence[str] | None = None) -> None:
    """Remove erasures (all by default): hooks removed, fused weights restored; the base is back bit for bit."""
    composer = Composer.of(pipe, create=False)
    if composer is None:
        if names is not None:
            raise AdapterError("unknown erasure: no erasures are loaded on this pipeline")
        return
    composer.unload(names)
    if not composer.adapters:
        composer._remove_gate_hooks()
        _COMPOSERS.pop(_key(pipe), None)


def list_erasures(pipe) -> list[dict]:
    """One dict per loaded erasure: ``name, method, concepts, weight, enabled, fused, gated``."""
    composer = Composer.of(pipe, create=False)
    return composer.listing() if composer is not None else []


def gates(pipe, prompts: str | Sequence[str]) -> list[dict[str, float]]:
    """γ of every gated erasure for each prompt (as the UNet would see it, clipcos and tokenuni), for inspection."""
    composer = _composer(pipe)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    with torch.no_grad():
        context = sd.encode(pipe, prompts).embeds
        values = composer.compute_gates(context)
    return [{name: float(v[i]) for name, v in values.items()} for i in range(len(prompts))]
