"""Inference-time guards: adapters of kind ``"guard"`` (format 1.1) that change no weights. A guard filters the
UNet's text context, row by row, at generation time, and may scale the UNet decoder's skip features of the rows it
filters. Like gating rules, a guard rule is registered by name (:data:`GUARDS`, the names of
:data:`erasekit.adapter.GUARD_RULES`); :class:`GuardSet` runs the guards of one composer: one plan per prompt batch,
the denoising-step counter, and the up-block hooks.

SAFREE (Yoon, Yu, Patil, Yao, Bansal, "SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image And Video
Generation", ICLR 2025, https://arxiv.org/abs/2410.12761), as its authors' code does it (``safree_projection``,
``f_beta`` and the FreeU-style re-attention of github.com/jaehong31/SAFREE), for one prompt with inner tokens
``1 … n`` (BOS at position 0, EOS at n + 1) and context rows ``e_p``:

* concept subspace ``C``: an orthonormal basis of the erased concepts' embeddings, made at erase time and stored in
  the file (``guard.basis``); ``P_C = C Cᵀ``.
* masked-token rule: ``m_i`` = the pooled embedding of the prompt with token i masked (the authors replace it by id
  0, CLIP's ``!``; pooled = the context row at EOS, CLIP's pooled output); ``d_i = ‖(I − P_C) m_i‖``. Token i is
  a trigger when ``d_i ≥ (1 + α) · mean_{j≠i} d_j``: masking it moves the prompt away from the concept.
* projection within the input's own space: ``I`` = span of the ``m_i``; a trigger token's row becomes
  ``(I − P_C) P_I e_p`` (the others stay bit for bit).
* self-validating filter: ``β = 1 − mean_p cos((I − P_C) P_I e_p, e_p)`` over BOS, the tokens and EOS; the
  filtered rows are used for the denoising steps ``0 … t'``, ``t' = round(upper · σ(steepness · (10 β −
  midpoint)))`` (authors: upper 10, midpoint 5.333, steepness 2 × 2.5), the original rows after.
* re-attention: while a row is filtered, the low frequencies (the centred ``2·threshold`` square of the 2-D
  spectrum) of the skip features entering the first two decoder blocks are scaled by ``s1`` / ``s2`` (FreeU's
  Fourier filter with the authors' 0.9 / 0.2 and backbone factors 1, so only the skip features change).

erasekit's generalisations, all options of :class:`erasekit.methods.safree.SafreeConfig`: ``pooling="mean"``
(the mean of the token and EOS rows, for encoders whose EOS row is no summary, as tinyworld's), masking by
deletion (``mask_token_id = -1``), a one-token prompt compared with itself unmasked (the authors' rule has no
other tokens to compare with, and never flags it), a concept subspace from every row of the concept prompts
(``subspace="tokens"``) and ``project="following"`` (a trigger token and every row after it, for causal encoders
that carry a token's meaning forward). SDXL's context concatenates two encoders: ``C`` and ``I`` are spanned per
encoder slice (``segments``), i.e. block-diagonal projections.

A guard's weight ``w`` interpolates: filtered tokens are ``e + w (e' − e)`` and the skip scales ``1 + w (s − 1)``;
0 or a disabled guard leaves the output bit-identical. Rows whose token ids are unknown (``prompt_embeds`` passed
without the text encoder running in this process) pass unfiltered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from ..adapter import GUARD_RULES, Adapter
from ..adapter.spec import check_guard
from ..errors import AdapterError, AdapterMismatchError

#: encodes inner token-id lists to the pipeline's context rows (B, L, D): BOS + ids + EOS, padded to the longest
Encode = Callable[[list[list[int]]], torch.Tensor]


# ---------------------------------------------------------------------------------------------- the algebra

def orthonormal_basis(vectors: torch.Tensor, segments: Sequence[int], rank: int = 0) -> torch.Tensor:
    """Rows spanning ``vectors`` (N, D) slice by slice (``segments`` sum to D), orthonormal, float64: per slice the
    right singular vectors above numerical rank (``torch.linalg.pinv``'s tolerance), at most ``rank`` (0: all)."""
    vectors = vectors.detach().to("cpu", torch.float64)
    rows, start = [], 0
    for width in segments:
        part = vectors[:, start:start + width]
        _, s, vh = torch.linalg.svd(part, full_matrices=False)
        keep = int((s > s.max() * max(part.shape) * torch.finfo(torch.float32).eps).sum()) if s.numel() else 0
        keep = min(keep, rank) if rank else keep
        block = vectors.new_zeros(keep, vectors.shape[1])
        block[:, start:start + width] = vh[:keep]
        rows.append(block)
        start += width
    return torch.cat(rows)


def project_onto(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``P x`` for rows ``x`` (..., D) and an orthonormal basis (k, D)."""
    return (x @ basis.T) @ basis


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(I − P) x``: what is left of ``x`` outside the span of ``basis``."""
    return x - project_onto(x, basis)


def masked_ids(ids: Sequence[int], mask_token_id: int) -> list[list[int]]:
    """The prompt once per token with that token masked: replaced by ``mask_token_id``, or deleted (-1)."""
    fill = [] if mask_token_id < 0 else [mask_token_id]
    return [list(ids[:i]) + fill + list(ids[i + 1:]) for i in range(len(ids))]


def pooled(rows: torch.Tensor, lengths: Sequence[int], pooling: str) -> torch.Tensor:
    """One vector per encoded prompt (B, L, D) with ``lengths`` inner tokens: the EOS row (CLIP's pooled output) or
    the mean of the token and EOS rows."""
    if pooling == "eot":
        return torch.stack([rows[b, n + 1] for b, n in enumerate(lengths)])
    return torch.stack([rows[b, 1:n + 2].mean(0) for b, n in enumerate(lengths)])


def trigger_tokens(distances: torch.Tensor, alpha: float, alone: float | None = None) -> torch.Tensor:
    """SAFREE's masked-token rule: token i is a trigger when ``d_i ≥ (1 + α) · mean_{j≠i} d_j``. A one-token
    prompt compares with ``alone`` (the unmasked prompt's distance) instead, or is never flagged (``None``)."""
    n = distances.shape[0]
    if n == 1:
        return distances >= (1 + alpha) * alone if alone is not None else torch.zeros(1, dtype=torch.bool)
    others = (distances.sum() - distances) / (n - 1)
    return distances >= (1 + alpha) * others


def svf_steps(beta: float, upper: int, midpoint: float, steepness: float) -> int:
    """The self-validating filter: ``t' = round(upper · σ(steepness · (10 β − midpoint)))``; the filtered context
    is used for steps ``0 … t'``, so ``t' + 1`` steps."""
    z = steepness * (10 * beta - midpoint)
    sigmoid = 1 / (1 + math.exp(-z)) if z > -700 else 0.0
    return round(upper * sigmoid) + 1


def skip_filter(x: torch.Tensor, scale: torch.Tensor, threshold: int = 1) -> torch.Tensor:
    """FreeU's Fourier filter per row: the centred ``2·threshold`` square of each row's 2-D spectrum times
    ``scale[b]`` (B,); rows with scale 1 are returned untouched (the same values)."""
    rows = torch.nonzero(scale != 1).flatten()
    if rows.numel() == 0:
        return x
    sub = x[rows].float()
    spectrum = torch.fft.fftshift(torch.fft.fftn(sub, dim=(-2, -1)), dim=(-2, -1))
    h, w = sub.shape[-2:]
    box = torch.zeros(h, w, device=x.device)
    box[max(0, h // 2 - threshold):h // 2 + threshold, max(0, w // 2 - threshold):w // 2 + threshold] = 1
    factor = 1 + (scale[rows].to(x.device, torch.float32).view(-1, 1, 1, 1) - 1) * box
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * factor, dim=(-2, -1)), dim=(-2, -1)).real
    out = x.clone()
    out[rows] = filtered.to(x.dtype)
    return out


# ---------------------------------------------------------------------------------------------- plans

@dataclass
class Plan:
    """What one guard does to one prompt batch: the rows it filters (others pass untouched)."""

    rows: torch.Tensor  # (r,) long: rows of encoder_hidden_states the guard filters
    tokens: torch.Tensor  # (r, L) bool: the positions replaced in those rows
    filtered: torch.Tensor  # (r, L, D): the filtered rows (equal to the originals outside ``tokens``)
    steps: torch.Tensor  # (r,) long: for how many denoising steps each row is filtered
    details: list[dict] = field(default_factory=list)  # per row: trigger token indices, β, steps


class Safree:
    """SAFREE's runtime: the subspace and rule parameters of one guard adapter (see the module docstring)."""

    rule = "safree"

    def __init__(self, name: str, guard: dict, basis: torch.Tensor):
        self.name = name
        self.alpha = float(guard["alpha"])
        self.pooling, self.project, self.mask_token_id = guard["pooling"], guard["project"], guard["mask_token_id"]
        self.segments = [int(s) for s in guard["segments"]]
        self.svf = dict(guard["svf"])
        self.scales = tuple(float(s) for s in guard["reattention"].get("scales", ()))
        self.threshold = int(guard["reattention"].get("threshold", 1))
        self.basis = basis.detach().to("cpu", torch.float64)

    @classmethod
    def from_adapter(cls, adapter: Adapter, name: str, widths: Sequence[int]) -> "Safree":
        """Check the record and tensors against the pipeline's text-encoder ``widths``; AdapterError if they do not
        fit."""
        guard = adapter.guard
        basis = adapter.stats.get("guard.basis")
        bad = []
        if guard["pooling"] not in ("eot", "mean"):
            bad.append(f"pooling {guard['pooling']!r} (expected 'eot' or 'mean')")
        if guard["project"] not in ("flagged", "following"):
            bad.append(f"project {guard['project']!r} (expected 'flagged' or 'following')")
        if not math.isfinite(guard["alpha"]) or guard["mask_token_id"] < -1:
            bad.append(f"alpha {guard['alpha']!r} / mask_token_id {guard['mask_token_id']!r}")
        if not all(isinstance(s, int) and s > 0 for s in guard["segments"]):
            bad.append(f"segments {guard['segments']!r} (positive widths)")
        svf, re = guard["svf"], guard["reattention"]
        if svf and not (set(svf) == {"upper", "midpoint", "steepness"} and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in svf.values())):
            bad.append(f"svf {svf!r} (upper, midpoint, steepness numbers, or {{}})")
        scales = re.get("scales", [])
        if re and not (isinstance(scales, list) and len(scales) == 2 and all(
                isinstance(s, (int, float)) and math.isfinite(s) for s in scales)
                and isinstance(re.get("threshold", 1), int) and re.get("threshold", 1) > 0):
            bad.append(f"reattention {re!r} (scales [s1, s2], threshold ≥ 1, or {{}})")
        if bad:
            raise AdapterError(f"guard {name!r}: bad safree parameters: {'; '.join(bad)}")
        if basis is None or basis.ndim != 2 or not basis.is_floating_point():
            raise AdapterError(f"guard {name!r}: a safree guard needs its concept subspace 'guard.basis' (k, D)")
        if basis.shape[1] != sum(guard["segments"]) or list(guard["segments"]) != list(widths):
            raise AdapterMismatchError(
                f"guard {name!r} was made for text encoders of widths {guard['segments']} (subspace width "
                f"{basis.shape[1]}), but this pipeline's are {list(widths)}")
        return cls(name, guard, basis)

    @property
    def reattention(self) -> tuple[float, ...]:
        """Skip-feature scales of the first decoder blocks while a row is filtered (empty: no re-attention)."""
        return self.scales

    def plan(self, context: torch.Tensor, tokens: list[tuple[int, ...] | None], encode: Encode) -> Plan | None:
        """The rows of ``context`` (B, L, D) this guard filters, with their filtered values; None if none."""
        first: dict[tuple[int, ...], int] = {}  # each distinct prompt once: its first row
        for b, t in enumerate(tokens):
            if t and len(t) <= context.shape[1] - 2:
                first.setdefault(t, b)
        if not first:
            return None
        lists = [m for ids in first for m in masked_ids(ids, self.mask_token_id)]
        vectors = pooled(encode(lists).to("cpu", torch.float64), [len(m) for m in lists], self.pooling)
        results, start = {}, 0
        for ids, b in first.items():
            masked = vectors[start:start + len(ids)]
            start += len(ids)
            results[ids] = self._filter(context[b].detach().to("cpu", torch.float64), ids, masked)
        rows, masks, filtered, steps, details = [], [], [], [], []
        for b, t in enumerate(tokens):
            result = results.get(t) if t else None
            if result is None:
                continue
            rows.append(b)
            masks.append(result[0])
            filtered.append(result[1])
            steps.append(result[2])
            details.append(result[3])
        if not rows:
            return None
        dtype = context.dtype
        return Plan(torch.tensor(rows, device=context.device), torch.stack(masks).to(context.device),
                    torch.stack(filtered).to(context.device, dtype), torch.tensor(steps), details)

    def _filter(self, row: torch.Tensor, ids: tuple[int, ...], masked: torch.Tensor):
        """(positions, filtered row, steps, details) for one prompt's context row (L, D), or None if no trigger."""
        n = len(ids)
        distances = project_out(masked, self.basis).norm(dim=1)
        alone = float(project_out(pooled(row[None], [n], self.pooling), self.basis).norm()) if n == 1 else None
        triggers = trigger_tokens(distances, self.alpha, alone)
        if not bool(triggers.any()):
            return None
        own = orthonormal_basis(masked, self.segments)

        def filtered(x):  # (I − P_C) P_I x
            return project_out(project_onto(x, own), self.basis)

        positions = torch.zeros(row.shape[0], dtype=torch.bool)
        flagged = torch.nonzero(triggers).flatten() + 1
        if self.project == "following":
            positions[int(flagged[0]):] = True
        else:
            positions[flagged] = True
        active = row[:n + 2]
        cos = torch.nn.functional.cosine_similarity(filtered(active), active, dim=1)
        beta = float(1 - cos.mean())
        steps = svf_steps(beta, **self.svf) if self.svf else 1 << 30
        out = torch.where(positions[:, None], filtered(row), row)
        return positions, out, steps, {"triggers": (flagged - 1).tolist(), "beta": round(beta, 4), "steps": steps}


#: guard rule -> its runtime (``from_adapter(adapter, name, widths)``, ``plan(...)``, ``reattention``)
GUARDS = {"safree": Safree}
assert set(GUARDS) == set(GUARD_RULES)


def build_guard(adapter: Adapter, name: str, widths: Sequence[int]):
    """The runtime of guard adapter ``adapter``; AdapterError for an unknown rule or parameters that do not fit."""
    check_guard(adapter.guard, f"erasure {name!r}")  # the record's field types (as a reader checks them)
    rule = adapter.guard.get("rule")
    if rule not in GUARDS:
        raise AdapterError(f"erasure {name!r}: unknown guard rule {rule!r}; this erasekit applies {tuple(GUARDS)}")
    return GUARDS[rule].from_adapter(adapter, name, widths)


# ---------------------------------------------------------------------------------------------- the runtime

def context_encoder(component: Callable[[str], object], tokenizers: tuple, memory) -> Encode:
    """An :data:`Encode` over a pipeline's parts (``component(name)`` gives ``unet``, ``text_encoder``, ...): the
    pipeline's own context rows of inner token-id lists (the guards' masked prompts), with text-encoder adapters
    applied as they are to the prompts themselves, and nothing remembered by ``memory`` (a ``TokenMemory``)."""
    from ..core import sd

    def encode(id_lists: list[list[int]]) -> torch.Tensor:
        view = SimpleNamespace(unet=component("unet"), tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
                               text_encoder=component("text_encoder"), text_encoder_2=component("text_encoder_2"))
        view._execution_device = view.unet.device
        length = max(len(x) for x in id_lists) + 2
        ids = [torch.tensor([sd.sequence(tok, x, length) for x in id_lists]) for tok, _ in sd.encoders(view)]
        with memory.paused(), torch.no_grad():
            return sd.encode_ids(view, ids).embeds

    return encode


class GuardSet:
    """The guards of one composer: plans for the current prompt batch, the denoising-step counter, re-attention.

    A prompt batch is one ``encoder_hidden_states`` tensor: the stock denoising loop passes the same tensor at every
    step (a tensor of equal content counts as the same batch). Its step counter starts at 0 on a new batch and moves
    on when the timestep changes (a scheduler that calls the UNet twice per step, as Heun's, counts one step); a
    timestep above the last one starts a new run of the same batch.
    """

    def __init__(self):
        self.guards: dict[str, object] = {}
        self._context: torch.Tensor | None = None
        self._plans: dict[str, Plan | None] = {}
        self._step, self._last_t = 0, None
        self._scales: dict[int, torch.Tensor] | None = None  # decoder block -> (B,) skip scales, this UNet call
        self._handles: list = []

    def add(self, name: str, guard, unet) -> None:
        self.guards[name] = guard
        self.reset()
        if not self._handles:
            for index, block in enumerate(list(getattr(unet, "up_blocks", []))[:2]):
                self._handles.append(block.register_forward_pre_hook(self._make_block_hook(index), with_kwargs=True))

    def remove(self, name: str) -> None:
        self.guards.pop(name, None)
        self.reset()
        if not self.guards:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def reset(self) -> None:
        self._context, self._plans, self._step, self._last_t, self._scales = None, {}, 0, None, None

    def plan(self, name: str) -> Plan | None:
        """The current prompt batch's plan of guard ``name`` (for inspection and tests)."""
        return self._plans.get(name)

    def apply(self, context: torch.Tensor, timestep, active: list[tuple[str, float]],
              tokens: Callable[[torch.Tensor], list], encode: Encode) -> torch.Tensor | None:
        """The filtered context for this UNet call (None: unchanged); sets the skip scales of the call."""
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else None if timestep is None else float(timestep)
        same = self._context is not None and (self._context is context or (
            self._context.shape == context.shape and self._context.device == context.device
            and torch.equal(self._context, context)))
        if not same or (t is not None and self._last_t is not None and t > self._last_t):
            self.reset()
            self._context = context
        elif t != self._last_t:
            self._step += 1
        self._last_t = t
        out, scales = None, {}
        for name, weight in active:
            if name not in self._plans:
                with torch.no_grad():
                    self._plans[name] = self.guards[name].plan(context, tokens(context), encode)
            plan = self._plans[name]
            live = plan.steps > self._step if plan is not None else None
            if live is None or not bool(live.any()):
                continue
            live = live.to(plan.rows.device)
            rows, mask, filtered = plan.rows[live], plan.tokens[live][..., None], plan.filtered[live]
            out = context.clone() if out is None else out
            before = out[rows]
            after = filtered if weight == 1.0 else before + weight * (filtered - before)
            out[rows] = torch.where(mask, after, before)
            for block, s in enumerate(self.guards[name].reattention):
                scale = scales.setdefault(block, torch.ones(context.shape[0], device=context.device))
                scale[rows] = scale[rows] * (1 + weight * (s - 1))
        self._scales = scales or None
        return out

    def end_call(self) -> None:
        self._scales = None

    def _make_block_hook(self, index: int):
        def hook(module, args, kwargs):
            scales = self._scales.get(index) if self._scales else None
            if scales is None:
                return None
            threshold = min(getattr(g, "threshold", 1) for g in self.guards.values())
            if "res_hidden_states_tuple" in kwargs:
                kwargs["res_hidden_states_tuple"] = tuple(skip_filter(x, scales, threshold)
                                                          for x in kwargs["res_hidden_states_tuple"])
                return args, kwargs
            if len(args) > 1:
                args = (args[0], tuple(skip_filter(x, scales, threshold) for x in args[1]), *args[2:])
                return args, kwargs
            return None

        return hook


__all__ = ["GUARDS", "GuardSet", "Plan", "Safree", "build_guard", "context_encoder", "masked_ids", "orthonormal_basis", "pooled",
           "project_onto", "project_out", "skip_filter", "svf_steps", "trigger_tokens"]
