"""The :class:`Composer`: the erasures loaded on one denoiser (a UNet, or an MMDiT transformer: SD3, FLUX), their
per-module hooks, gates and fused weights."""

from __future__ import annotations

import inspect
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from ..adapter import COMPONENTS, Adapter, ModuleDelta, check_compatible, denoiser_component, find_module
from ..core.lora import add_low_rank, add_low_rank_per_sample, column_scale, project_down, project_up
from ..errors import AdapterError, AdapterMismatchError
from .gates import Gate, TokenMemory, build_gate, check_weight, parse_gating, similarity
from .guards import GuardSet, build_guard, context_encoder

logger = logging.getLogger("erasekit.compose")


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
    plans: dict = field(default_factory=dict)  # Composer state id, weight dtype, device -> _Plan (the latest few)

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
        """``[A_1; …; A_n]``, ``[B_1 … B_n]`` and the ranks of low-rank terms (made once per plan)."""
        tensors = [term.cast(self.module.weight) for term in terms]
        if len(tensors) == 1:
            return tensors[0][0], tensors[0][1], [tensors[0][0].shape[0]]
        return (torch.cat([d for d, _ in tensors], 0), torch.cat([u for _, u in tensors], 1),
                [d.shape[0] for d, _ in tensors])


@dataclass
class _Plan:
    """What one slot's hook does in one state of the composer (what is loaded, enabled, weighted, fused: its
    ``state_id``) and for one dtype/device of the module's weight (a moved module re-casts its terms): its active
    terms sorted by how they are applied."""

    full: list  # [(term, loaded)]: full deltas, added one by one
    low: list  # [(term, loaded)]: low-rank terms, one stacked down- and up-projection
    factored: list  # [(term, loaded)]: gated with combine="factors" (SPM's reference form)
    gated: bool  # some low-rank term has a per-sample gate
    stack: tuple = ()  # the low-rank terms' stacked (down, up, ranks), on the module's dtype/device
    folded: tuple = ()  # (gates, batch, dtype, up): the stacked up-projection with w_i γ_i folded in, per sample

    @property
    def empty(self) -> bool:
        return not (self.full or self.low or self.factored)


@dataclass
class _Loaded:
    name: str
    adapter: Adapter
    weight: float
    enabled: bool = True
    fused: bool = False
    gate: Gate | None = None
    guard: object = None  # the runtime of an inference-time guard (erasekit.compose.guards)


_COMPOSERS: "weakref.WeakKeyDictionary[nn.Module, Composer]" = weakref.WeakKeyDictionary()


def _key(pipe):
    """The registry key of a pipeline: its denoiser (``unet`` or ``transformer``), where the hooks live (the pipeline
    itself if it has none)."""
    name = denoiser_component(pipe)
    return getattr(pipe, name) if name is not None else pipe


def _positions(denoiser: nn.Module) -> dict[str, int]:
    """The positional index of ``encoder_hidden_states`` and ``timestep`` in the denoiser's ``forward`` (a UNet takes
    ``(sample, timestep, encoder_hidden_states)``, an SD3 transformer ``(hidden_states, encoder_hidden_states,
    pooled_projections, timestep)``), for calls that pass them positionally."""
    names = [n for n, p in inspect.signature(denoiser.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {n: names.index(n) for n in ("encoder_hidden_states", "timestep") if n in names}


class Composer:
    """The erasures loaded on one denoiser (and the pipelines sharing it): adapters, per-module hooks, gates, fused
    state. The denoiser is the pipeline's ``unet`` (SD 1.x, 2.x, SDXL) or ``transformer`` (SD3, FLUX).

    Obtain it with ``Composer.of(pipe)``; the module-level functions (``load``, ``fuse``, ...) are thin wrappers.
    """

    def __init__(self, pipe):
        self._components: dict[str, weakref.ref] = {
            c: weakref.ref(getattr(pipe, c)) for c in COMPONENTS if isinstance(getattr(pipe, c, None), nn.Module)
        }
        self.denoiser_name = denoiser_component(pipe)  # "unet", "transformer" or None
        self.tokenizer = getattr(pipe, "tokenizer", None)
        self.tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        self.adapters: dict[str, _Loaded] = {}
        self.slots: dict[str, _Slot] = {}
        self._suspended = 0  # > 0: every hook is a no-op (used while encoding the erased prompts)
        self._loads = 0  # counts loads and unloads
        self._state_ids: dict[tuple, int] = {}  # every state seen -> its id (toggling back finds the earlier plans)
        self.state_id = 0  # what is loaded, enabled, weighted and fused now: the key of the hooks' plans
        self._positions: dict[str, int] = {}  # positional indices of the denoiser's forward arguments
        self._context_handles: list = []  # the denoiser pre/post hooks and the text-encoder hook (gates, guards)
        self._current_gates: dict[str, torch.Tensor] | None = None
        self._coefficients: dict[tuple, torch.Tensor] = {}  # w·γ shaped for one output layout, per denoiser call
        self._last_context: tuple | None = None  # (weakref to encoder_hidden_states, version, gates)
        encoder = self.component("text_encoder")
        self.tokens = TokenMemory(self.tokenizer, getattr(getattr(encoder, "config", None), "hidden_size", None))
        self.guards = GuardSet()

    # ---- registry --------------------------------------------------------------------------------------------

    @classmethod
    def of(cls, pipe, create: bool = True) -> "Composer | None":
        """The composer of ``pipe`` (created on first use when ``create``)."""
        composer = _COMPOSERS.get(_key(pipe))
        if composer is None and create:
            composer = _COMPOSERS[_key(pipe)] = cls(pipe)
        return composer

    @staticmethod
    def drop(pipe) -> None:
        """Forget the composer of ``pipe`` (after its last erasure is unloaded)."""
        _COMPOSERS.pop(_key(pipe), None)

    def component(self, name: str) -> nn.Module | None:
        ref = self._components.get(name)
        return ref() if ref is not None else None

    @property
    def denoiser(self) -> nn.Module | None:
        """The pipeline's ``unet`` or ``transformer``, whose ``encoder_hidden_states`` gates and guards read."""
        return self.component(self.denoiser_name) if self.denoiser_name is not None else None

    # ---- names -----------------------------------------------------------------------------------------------

    def _get(self, name: str) -> _Loaded:
        if name not in self.adapters:
            loaded = sorted(self.adapters) or "none"
            raise AdapterError(f"unknown erasure {name!r}; loaded erasures: {loaded}")
        return self.adapters[name]

    def resolve_names(self, names: str | Iterable[str] | None) -> list[str]:
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
        weight = check_weight(weight, name)
        if adapter.is_guard and self.denoiser_name != "unet":  # before the fingerprint: the clearer reason
            raise AdapterMismatchError(
                f"erasure {name!r} is an inference-time guard ({adapter.guard.get('rule')}), which filters a UNet's "
                "CLIP text context and re-weights its decoder's skip features; this pipeline's denoiser is "
                f"{'an MMDiT transformer (SD3, FLUX), which has no decoder' if self.denoiser_name else 'missing'}, so "
                "guards do not run on it (weight erasures do)")
        check_compatible(adapter, pipe, strict=strict)
        if adapter.is_guard:
            return self._load_guard(adapter, name, weight)
        gate_spec = parse_gating(adapter, name)
        if gate_spec is not None and type(self.denoiser).__name__ == "FluxTransformer2DModel":
            raise AdapterMismatchError(
                f"erasure {name!r} is gated by prompt similarity, which compares the denoiser's CLIP context with the "
                "erased prompts' encoding; FLUX's transformer reads T5 rows alone, so gated erasures do not run on "
                "FLUX (load it without its gate: a static adapter)")

        # 1. Resolve and check every module before changing anything.
        targets: list[tuple[str, nn.Module, ModuleDelta]] = []
        for key, delta in adapter.deltas.items():
            component, _, path = key.partition(".")
            if component not in COMPONENTS:
                raise AdapterMismatchError(f"erasure {name!r}: key {key!r} names no component of {COMPONENTS}")
            root = self.component(component)
            if root is None:
                raise AdapterMismatchError(f"erasure {name!r} changes {component!r}, which this pipeline does not have")
            if gate_spec is not None and component != self.denoiser_name:
                raise AdapterError(
                    f"erasure {name!r} is gated by prompt similarity but changes {key!r}: gates are computed from "
                    f"the denoiser's encoder_hidden_states, so gated deltas must be on the {self.denoiser_name} only")
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

        if gate_spec is not None:
            with self._hooks_suspended(), torch.no_grad():  # the erased prompts, encoded as pipe.encode_prompt does
                gate = build_gate(pipe, gate_spec, self.tokenizer, self.component("text_encoder"),
                                  next(self.denoiser.parameters()).device)
        else:
            gate = None

        # 2. Register.
        self.adapters[name] = _Loaded(name, adapter, weight, gate=gate)
        for key, module, delta in targets:
            slot = self.slots.get(key)
            if slot is None:
                slot = self.slots[key] = _Slot(key, module)
                slot.handle = module.register_forward_hook(self._make_hook(slot))
            slot.terms[name] = _Term(name, delta)
            slot.terms[name].cast(module.weight)  # cast once at load
        self.changed(loads=True)
        if gate is not None:
            self._ensure_context_hooks()
        return name

    def _load_guard(self, adapter: Adapter, name: str, weight: float) -> str:
        """An inference-time guard: no module hooks; it filters the UNet's context in the UNet pre-hook."""
        if adapter.deltas:
            raise AdapterError(f"erasure {name!r} is a guard with weight deltas; a guard changes no weights")
        encoders = [self.component(c) for c in ("text_encoder", "text_encoder_2") if self.component(c) is not None]
        guard = build_guard(adapter, name, [e.config.hidden_size for e in encoders])
        self.adapters[name] = _Loaded(name, adapter, weight, guard=guard)
        self.changed(loads=True)
        self.guards.add(name, guard, self.denoiser)
        self._ensure_context_hooks()
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

    def changed(self, loads: bool = False) -> None:
        """Something loaded (``loads``), enabled, weighted or fused changed: the hooks take the plans of the new
        state (made at their next call, or kept from when the composer was last in it: ``compose.disabled``
        toggles between two states)."""
        if loads:  # plans of earlier loads hold unloaded terms' tensors
            self._loads += 1
            for slot in self.slots.values():
                slot.plans.clear()
        state = (self._loads, *((n, a.enabled, a.fused, a.weight) for n, a in self.adapters.items()))
        self.state_id = self._state_ids.setdefault(state, len(self._state_ids))

    def _plan(self, slot: _Slot) -> _Plan:
        weight = slot.module.weight
        key = (self.state_id, weight.dtype, weight.device)
        plan = slot.plans.get(key)
        if plan is not None:
            return plan
        full, low, factored = [], [], []
        for term in slot.terms.values():
            loaded = self._active(term.name)
            if loaded is None:
                continue
            if loaded.gate is not None and loaded.gate.combine == "factors":
                factored.append((term, loaded))
            else:
                (low if term.low_rank else full).append((term, loaded))
        while len(slot.plans) >= 4:  # the latest states only
            slot.plans.pop(next(iter(slot.plans)))
        stack = slot.stacked([term for term, _ in low]) if low else ()
        slot.plans[key] = plan = _Plan(full, low, factored, any(loaded.gate is not None for _, loaded in low), stack)
        return plan

    def _make_hook(self, slot: _Slot):
        def hook(module, args, output):
            if self._suspended:
                return None
            plan = self._plan(slot)
            if plan.empty:
                return None  # bit-identical base output
            x = args[0]
            for term, loaded in plan.full:
                coef = self._coefficient(loaded, output, slot)
                delta = slot.term(x, term)
                output = output + (delta if isinstance(coef, float) and coef == 1.0 else delta * coef)
            if plan.low:  # the full-size output is touched once, however many low-rank adapters
                output = self._add_low_rank(slot, plan, x, output)
            if plan.factored:
                output = output + self._factored_term(x, output, slot, plan.factored)
            return output

        return hook

    def _add_low_rank(self, slot: _Slot, plan: _Plan, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + Σ_i B_i (c_i A_i x)`` over the plan's low-rank terms: one stacked down-projection and one
        up-projection. With per-sample gates, ``c_i`` is folded into a per-sample up-projection that is kept while
        the prompt batch's gates are (every denoising step of one generation), so a gated step costs the two
        projections alone, as a static one does."""
        batch, conv = output.shape[0], isinstance(slot.module, nn.Conv2d)
        down, up, ranks = plan.stack
        if plan.gated and not torch.is_grad_enabled() and output.is_contiguous() and (
                (output.ndim, x.ndim) == (3, 3) and not conv or output.ndim == 4 and conv and up.shape[2:] == (1, 1)):
            folded = plan.folded
            if not (folded and folded[0] is self._current_gates and folded[1:3] == (batch, output.dtype)
                    and folded[3].device == output.device):
                coefs = [self._coefficient(loaded, output, slot) for _, loaded in plan.low]
                scale = column_scale(coefs, ranks, output.new_empty(batch, 1), 1).to(up.dtype)  # (B, R)
                up_b = up.reshape(up.shape[0], -1)[None] * scale[:, None, :]  # (B, out, R): c_i B_i per sample
                up_b = (up_b if conv else up_b.transpose(1, 2)).contiguous()
                plan.folded = folded = (self._current_gates, batch, output.dtype, up_b)
            return add_low_rank_per_sample(slot.module, x, output, down, folded[3])
        coefs = [self._coefficient(loaded, output, slot) for _, loaded in plan.low]
        return add_low_rank(slot.module, x, output, down, up, coefs, ranks)

    def _coefficient(self, loaded: _Loaded, output: torch.Tensor, slot: _Slot, with_weight: bool = True):
        """``w_i`` (a float) for a static adapter; ``w_i γ_i`` per sample, shaped to broadcast, for a gated one."""
        weight = loaded.weight if with_weight else 1.0
        if loaded.gate is None:
            return weight
        if self._current_gates is None or loaded.name not in self._current_gates:
            raise AdapterError(
                f"gated erasure {loaded.name!r}: module {slot.key!r} ran outside a {self.denoiser_name} forward with "
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

    def _ensure_context_hooks(self) -> None:
        """The denoiser's pre/post hooks (gates, guards) and the text-encoder hook that remembers token ids.

        The pre-hook reads ``encoder_hidden_states`` as a keyword (how every diffusers pipeline passes it: the UNet's
        and the SD3 transformer's) or at its position in the denoiser's ``forward``."""
        if self._context_handles:
            return
        denoiser = self.denoiser
        self._positions = _positions(denoiser)
        self._context_handles.append(denoiser.register_forward_pre_hook(self._denoiser_pre_hook, with_kwargs=True))
        self._context_handles.append(denoiser.register_forward_hook(self._denoiser_post_hook, always_call=True))
        encoder = self.component("text_encoder")
        if encoder is not None and self.tokenizer is not None:
            self._context_handles.append(encoder.register_forward_hook(self._text_encoder_hook, with_kwargs=True))

    def remove_context_hooks(self) -> None:
        for handle in self._context_handles:
            handle.remove()
        self._context_handles = []
        self._current_gates = None
        self._last_context = None
        self.tokens.clear()

    def _text_encoder_hook(self, module, args, kwargs, output):
        return None if self._suspended else self.tokens.hook(module, args, kwargs, output)

    def _argument(self, name: str, args: tuple, kwargs: dict):
        """A denoiser ``forward`` argument, passed as a keyword or positionally."""
        if name in kwargs:
            return kwargs[name]
        index = self._positions.get(name)
        return args[index] if index is not None and index < len(args) else None

    def _denoiser_pre_hook(self, module, args, kwargs):
        if self._suspended:
            return None
        context = self._argument("encoder_hidden_states", args, kwargs)
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
        guards = [(n, a.weight) for n, a in self.adapters.items() if a.guard is not None and self._active(n)]
        if not guards:
            return None
        timestep = self._argument("timestep", args, kwargs)
        encode = context_encoder(self.component, (self.tokenizer, self.tokenizer_2), self.tokens)
        filtered = self.guards.apply(context, timestep, guards, self._row_tokens, encode)
        if filtered is None:
            return None
        if "encoder_hidden_states" in kwargs:
            return args, {**kwargs, "encoder_hidden_states": filtered}
        index = self._positions["encoder_hidden_states"]
        return (*args[:index], filtered, *args[index + 1:]), kwargs

    def _denoiser_post_hook(self, module, args, output):
        self._current_gates = None
        self._coefficients.clear()
        self.guards.end_call()
        return None

    def _row_tokens(self, context: torch.Tensor) -> list[tuple[int, ...] | None]:
        return [self.tokens.tokens(row) for row in context]


    # ---- gates -------------------------------------------------------------------------------------------------

    def compute_gates(self, context: torch.Tensor) -> dict[str, torch.Tensor]:
        """γ for every gated adapter and every row of ``context`` ``(B, L, D)``: name -> ``(B,)`` fp32 tensor."""
        gated = {n: a for n, a in self.adapters.items() if a.gate is not None}
        if not gated:
            return {}
        special = set(self.tokenizer.all_special_ids) if self.tokenizer is not None else set()
        ids = self._row_tokens(context) if self.tokens.rows else [None] * context.shape[0]
        tokens = [None if t is None else frozenset(i for i in t if i not in special) for t in ids]
        return {name: similarity(loaded.gate, context, tokens) for name, loaded in gated.items()}

    # ---- weights, switches -------------------------------------------------------------------------------------

    def set_weight(self, name: str, weight: float) -> None:
        loaded = self._get(name)
        weight = check_weight(weight, name)
        if loaded.fused and weight != loaded.weight:
            raise AdapterError(f"erasure {name!r} is fused into the weights; call unfuse() before changing its weight")
        loaded.weight = weight
        self.changed()

    def set_enabled(self, name: str, enabled: bool) -> None:
        loaded = self._get(name)
        if loaded.fused and not enabled:
            raise AdapterError(f"erasure {name!r} is fused into the weights; call unfuse() before disabling it")
        loaded.enabled = enabled
        self.changed()

    # ---- fuse --------------------------------------------------------------------------------------------------

    def fuse(self, names: str | Iterable[str] | None) -> list[str]:
        if names is None:
            chosen = [n for n, a in self.adapters.items()
                      if a.gate is None and a.guard is None and a.enabled and not a.fused]
            skipped = [n for n, a in self.adapters.items() if a.gate is not None or a.guard is not None]
            if skipped:
                logger.info("not fusing gated erasures and guards %s: they stay applied through hooks", skipped)
        else:
            chosen = self.resolve_names(names)
            for name in chosen:
                loaded = self.adapters[name]
                if loaded.guard is not None:
                    raise AdapterError(
                        f"erasure {name!r} is an inference-time guard ({loaded.guard.rule}): it changes no weights, "
                        "so it cannot be fused; it stays applied through hooks (fuse() without names fuses the "
                        "static erasures and leaves guards as they are)")
                if loaded.gate is not None:
                    raise AdapterError(
                        f"erasure {name!r} is gated by prompt similarity ({loaded.gate.metric}); fusing it into the "
                        "weights would lose the gating, so it stays applied through hooks")
                if not loaded.enabled:
                    raise AdapterError(f"erasure {name!r} is disabled; enable it before fusing")
        for name in chosen:
            self.adapters[name].fused = True
        self.changed()
        self._sync_fused_weights([s for s in self.slots.values() if any(n in s.terms for n in chosen)])
        return chosen

    def unfuse(self) -> None:
        for loaded in self.adapters.values():
            loaded.fused = False
        self.changed()
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
        names = self.resolve_names(names)
        for name in names:
            if self.adapters.pop(name).guard is not None:
                self.guards.remove(name)
        self.changed(loads=True)
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
        if not any(a.gate is not None or a.guard is not None for a in self.adapters.values()):
            self.remove_context_hooks()
        else:
            self._last_context = None

    # ---- listing -----------------------------------------------------------------------------------------------

    def listing(self) -> list[dict]:
        return [
            dict(name=a.name, method=a.adapter.method, concepts=list(a.adapter.concepts), weight=a.weight,
                 enabled=a.enabled, fused=a.fused, gated=a.gate is not None, kind=a.adapter.kind,
                 digest=a.adapter.digest)
            for a in self.adapters.values()
        ]
