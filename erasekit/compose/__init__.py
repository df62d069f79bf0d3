"""Compose erasure adapters on a diffusers pipeline at generation time, without touching base weights.

For every adapted ``nn.Linear``/``nn.Conv2d`` of the denoiser (``unet``; ``transformer`` for an MMDiT pipeline:
SD3, FLUX), ``text_encoder`` and ``text_encoder_2``::

    W_eff = W + Σ_i w_i · γ_i(prompt) · B_i A_i          (or  + w_i · γ_i · Δ_i  for a full delta)

``w_i`` is the user's weight and ``γ_i`` the adapter's gate: 1 for static adapters, SPM's Facilitated Transport
similarity for membranes (``gating["rule"] == "prompt_similarity"``; Lyu et al. 2024, SPM, https://arxiv.org/abs/2312.16145).
The term is added to the module's *output* by one ``register_forward_hook`` per module (all adapters on that module
share it; their low-rank terms are stacked into one up-projection ``[B_1 … B_n] [c_1 A_1 x; …; c_n A_n x]``, so the
full-size output is touched once however many adapters compose; the arithmetic is ``erasekit.core.lora``'s ΔW
applier, shared with training), so base weights stay untouched: ``unload`` removes the hooks and outputs are
bit-identical to the base again. Weight 0 or a disabled adapter skips its term (bit-identical base output). ``fuse`` writes static adapters
into the weights (keeping a CPU copy of the originals, restored bit-exactly by ``unfuse``).

Gates are per sample. A forward pre-hook on the denoiser reads ``encoder_hidden_states`` ``(B, L, D)`` (a keyword
argument of the UNet's and the SD3 transformer's forward; SD3's ``L`` is 77 CLIP rows then 256 T5 rows, zeros without
T5) and computes, for each row b and each gated adapter with erased prompts ``P``::

    γ_b = factor · max_{q ∈ P} max(clipcos(row_b, q), tokenuni(row_b, q))
    clipcos(p, q)  = cos(flatten(E(p)), flatten(E(q)))        E = the pipeline's own prompt encoding (L × D)
    tokenuni(p, q) = |tok(p) ∩ tok(q)| / |tok(q)|             special tokens removed
    tokencos(p, q) = mean_{j ∈ tok(q)} max(0, max_{i ∈ tok(p)} cos(W_i, W_j))   W: the encoder's token embeddings

so a classifier-free-guidance batch ``[uncond…, cond…]`` gets each row's own gate (the unconditional row too — unlike
the reference, which applies the positive prompt's γ to both branches). ``E(q)`` is computed once at load with
``erasekit.core.sd.encode`` (what ``pipe.encode_prompt`` gives; hooks off). The token ids of a row are recovered by a
forward hook on ``text_encoder`` that remembers the ids behind each hidden-state row it produced (rows are matched by
a hash of their content; for SDXL the first encoder's slice of the context, for SD3 its block of the CLIP rows); where
they are unknown (``prompt_embeds`` passed directly, ``clip_skip``) the gate falls back to clipcos alone. Gates are
computed once per prompt batch: the denoising loop passes the same ``encoder_hidden_states`` tensor at every step, and
the last one's gates are reused. They are constants for autograd (no gradient flows through γ).

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

Inference-time guards (adapters of kind ``"guard"``, format 1.1; SAFREE, Yoon et al., ICLR 2025,
https://arxiv.org/abs/2410.12761) change no weights: the same UNet pre-hook hands ``encoder_hidden_states`` to
each enabled guard, which replaces the rows of the prompts it flags (the unconditional row of a CFG batch has no
tokens and is never flagged) for as many denoising steps as its rule says, and may scale the skip features of those
rows in the first decoder blocks (:mod:`erasekit.compose.guards`). Gates are computed from the original context.
A guard loads, lists (``kind: "guard"``), weighs, disables and unloads like any erasure; ``fuse`` refuses it by
name and ``fuse()`` skips it. Guards need a UNet (its CLIP context and decoder): loading one on an MMDiT pipeline
raises ``AdapterMismatchError``.

State lives in one ``Composer`` per denoiser, kept in a ``weakref.WeakKeyDictionary`` keyed by ``pipe.unet`` (or
``pipe.transformer``; the pipeline object is not modified; the composer holds its components weakly, so it goes away
with them). The hooks live on the modules, so keying by the denoiser means that pipelines sharing it
(``Pipeline.from_pipe(pipe)``) share the erasures too, and any of them can list, disable or unload them.

Example::

    from erasekit import compose
    name = compose.load(pipe, "adapters/vangogh.uce.safetensors", weight=1.0)
    image = pipe("a starry night").images[0]
    with compose.disabled(pipe):
        base = pipe("a starry night").images[0]
    compose.unload(pipe)                        # bitwise back to the base model
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..adapter import DENOISERS, Adapter, load_adapter
from ..core import sd
from ..errors import AdapterError
from .composer import Composer
from .gates import GATE_COMBINES, GATE_METRICS

__all__ = [
    "Composer", "load", "set_weights", "enable", "disable", "disabled", "fuse", "unfuse", "unload",
    "list_erasures", "gates", "gated", "why_not_gated", "as_adapter", "GATE_METRICS", "GATE_COMBINES",
]


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


def why_not_gated(changes: Sequence[str]) -> str | None:
    """Why an erasure whose deltas change the components ``changes`` cannot be given a prompt gate (``gated``,
    ``erasekit erase --gate``), as the end of a sentence about it; ``None`` where it can. No components: an
    inference-time guard; "denoiser" stands for either denoiser (a method's ``MethodSpec.changes``)."""
    if not changes:
        return "is an inference-time guard: it has no deltas to gate (it decides per prompt already)"
    outside = [c for c in changes if c not in (*DENOISERS, "denoiser")]
    if outside:
        return (f"changes {', '.join(outside)}: gates are computed from the denoiser's text context, so only "
                "adapters whose deltas are all on the denoiser (UNet or transformer) can be gated")
    return None


def gated(adapter_or_path: Adapter | str | Path, metric: str = "clipcos_tokenuni",
          prompts: Sequence[str] | None = None, facilitate_factor: float = 1.0) -> Adapter:
    """A copy of a weight adapter that acts in proportion to the prompt's similarity to what it erased: SPM's
    Facilitated Transport (``W + w·γ(prompt)·ΔW``, see above) given to any adapter whose deltas are on the
    denoiser (ESD, UCE, ...), for composing many of them.

    Each static adapter of a method such as ESD-x changes its layers for every prompt; alone it may hold the other
    concepts (ESD-x's tinyworld preset trains on keeping the siblings' predictions), but several summed act on
    every prompt at once (tinyworld, the full suite: four ESD-x adapters for circle, square, red and striped loaded
    together erase 86 % of them at a 25-point loss on the values not erased; each loaded gated by ``tokencos``, 92 %
    at 0.0 points; README, "Many concepts at once"). The gate is computed at generation, as for SPM's membranes; the deltas are unchanged.

    >>> from erasekit import compose
    >>> compose.load(pipe, compose.gated("esd-x-circle.safetensors", metric="tokencos"))   # doctest: +SKIP

    Args:
        adapter_or_path: an ``Adapter`` or the path of an adapter file (not a guard; deltas on the denoiser only).
        metric: the gate's similarity (``GATE_METRICS``; "tokencos" where the flattened encodings do not separate
            prompts, as on tinyworld's 64-wide encoder).
        prompts: the prompts whose similarity opens the gate; default the adapter's concepts.
        facilitate_factor: multiplies γ (SPM's ``facilitate_factor``).

    Raises:
        AdapterError: a guard, deltas outside the denoiser, an unknown metric, no prompts, a bad factor.
    """
    from .gates import check_weight

    adapter, name = as_adapter(adapter_or_path)
    refusal = why_not_gated(sorted({k.split(".", 1)[0] for k in adapter.deltas}))
    if refusal:
        raise AdapterError(f"erasure {name!r} {refusal}")
    if metric not in GATE_METRICS:
        raise AdapterError(f"unknown gate metric {metric!r}; expected one of {GATE_METRICS}")
    prompts = [prompts] if isinstance(prompts, str) else list(adapter.concepts if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise AdapterError(f"erasure {name!r}: a gate needs at least one non-empty prompt, got {prompts!r}")
    factor = check_weight(facilitate_factor, name)
    combine = adapter.gating.get("combine", "sum") if adapter.gating.get("rule") == "prompt_similarity" else "sum"
    gating = {"rule": "prompt_similarity", "prompts": prompts, "metric": metric, "facilitate_factor": factor,
              "combine": combine}
    return dataclasses.replace(adapter, gating=gating, stats={k: v for k, v in adapter.stats.items()
                                                               if not k.startswith("gate.")})


def _composer(pipe) -> Composer:
    composer = Composer.of(pipe, create=False)
    if composer is None:
        raise AdapterError("unknown erasure: no erasures are loaded on this pipeline")
    return composer


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
        pipe: a diffusers pipeline with ``unet`` or ``transformer`` (and ``text_encoder``/``text_encoder_2`` if the
            adapter changes them).
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
    names = composer.resolve_names(names)
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
    for name in enabled:
        composer.set_enabled(name, False)
    try:
        yield
    finally:
        for name, was_enabled in enabled.items():
            if name in composer.adapters:
                composer.set_enabled(name, was_enabled)
        still = [n for n in fused if n in composer.adapters]
        if still:
            composer.fuse(still)


def fuse(pipe, names: str | Sequence[str] | None = None) -> list[str]:
    """Write static erasures into the base weights (``W ← W + w ΔW`` in fp32); returns the names fused.

    ``names=None`` fuses every enabled static erasure and leaves gated ones and guards on their hooks; naming a gated
    erasure raises ``AdapterError`` (its gating would be lost), and so does naming a guard (it has no weights to
    fuse). A CPU copy of each fused module's original weight is kept.
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
        composer.remove_context_hooks()
        Composer.drop(pipe)


def list_erasures(pipe) -> list[dict]:
    """One dict per loaded erasure: ``name, method, concepts, weight, enabled, fused, gated, kind`` ("weights" or
    "guard", an inference-time guard) and ``digest`` (:attr:`erasekit.adapter.Adapter.digest`: what it does)."""
    composer = Composer.of(pipe, create=False)
    return composer.listing() if composer is not None else []


def gates(pipe, prompts: str | Sequence[str]) -> list[dict[str, float]]:
    """γ of every gated erasure for each prompt (as the denoiser would see it), for inspection."""
    composer = _composer(pipe)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    with torch.no_grad():
        context = sd.encode(pipe, prompts).embeds
        values = composer.compute_gates(context)
    return [{name: float(v[i]) for name, v in values.items()} for i in range(len(prompts))]
