"""Prompt-similarity gates (SPM's Facilitated Transport, Lyu et al. 2024, https://arxiv.org/abs/2312.16145):
the gating record's checks and ``γ`` of each denoiser context row (a UNet's, or an SD3 transformer's). See
:mod:`erasekit.compose` for the formulas."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapter import GATING_RULES, Adapter
from ..errors import AdapterError, AdapterMismatchError

GATE_METRICS = ("clipcos_tokenuni", "clipcos", "tokenuni", "tokencos")
GATE_COMBINES = ("sum", "factors")


@dataclass
class Gate:
    """What a prompt-similarity adapter needs at generation (SPM's Facilitated Transport)."""

    prompts: tuple[str, ...]
    embeds: torch.Tensor  # (Q, L, D) fp32, the pipeline's own encoding of the erased prompts
    token_sets: tuple[frozenset[int], ...]  # tok(q) without special tokens; empty when no tokenizer
    metric: str = "clipcos_tokenuni"
    factor: float = 1.0
    combine: str = "sum"
    token_embedding: torch.Tensor | None = None  # (V, D) the text encoder's input embeddings (tokencos; shared)


def check_weight(weight, name: str) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise AdapterError(f"weight of erasure {name!r} must be a number, got {weight!r}") from None
    if not math.isfinite(value):
        raise AdapterError(f"weight of erasure {name!r} must be finite, got {weight!r}")
    return value


def parse_gating(adapter: Adapter, name: str) -> dict | None:
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
    factor = check_weight(gating.get("facilitate_factor", gating.get("factor", 1.0)), name)
    return dict(prompts=list(prompts), metric=metric, combine=combine, factor=factor)


def build_gate(pipe, spec: dict, tokenizer, encoder, device) -> Gate:
    """The :class:`Gate` of a parsed gating record: the erased prompts encoded by the pipeline (call with the
    composer's hooks suspended), their token sets, and the token embeddings ``tokencos`` reads."""
    from ..core import sd

    prompts = tuple(spec["prompts"])
    embeds = sd.encode(pipe, list(prompts)).embeds  # (Q, L, D), as pipe.encode_prompt
    token_sets: tuple[frozenset[int], ...] = ()
    if tokenizer is not None:
        special = set(tokenizer.all_special_ids)
        ids = tokenizer(list(prompts), truncation=True, max_length=tokenizer.model_max_length).input_ids
        token_sets = tuple(frozenset(i for i in row if i not in special) for row in ids)
    token_embedding = None
    if spec["metric"] == "tokencos" and encoder is not None and token_sets:
        token_embedding = encoder.get_input_embeddings().weight.detach()  # a view: no copy
    return Gate(prompts, embeds.detach().to(device=device, dtype=torch.float32), token_sets,
                spec["metric"], spec["factor"], spec["combine"], token_embedding)


def similarity(gate: Gate, context: torch.Tensor, tokens: list[frozenset[int] | None]) -> torch.Tensor:
    """SPM Facilitated Transport: ``factor · max_q max(clipcos, tokenuni)`` for each row of ``context`` → ``(B,)``."""
    rows = context.detach().float()  # (B, L, D)
    if gate.embeds.device != rows.device:
        gate.embeds = gate.embeds.to(rows.device)  # the pipeline moved since load
    embeds = gate.embeds  # (Q, L', D)
    if rows.shape[-1] != embeds.shape[-1]:
        raise AdapterMismatchError(
            f"gate prompts encode to width {embeds.shape[-1]}, but the denoiser's context has width {rows.shape[-1]}")
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


def row_key(row: torch.Tensor) -> bytes:
    """A content key for one hidden-state row (used to match denoiser context rows to text-encoder calls)."""
    data = row.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16)
    digest.update(repr((tuple(data.shape), str(data.dtype))).encode())
    return digest.digest()


def inner_ids(tokenizer, ids: list[int]) -> tuple[int, ...]:
    """The prompt's own token ids in a padded sequence: after BOS, up to the first EOS."""
    start = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
    end = ids.index(tokenizer.eos_token_id, start) if tokenizer.eos_token_id in ids[start:] else len(ids)
    return tuple(ids[start:end])


class TokenMemory:
    """The token ids behind each hidden-state row a text encoder produced (its forward hook, :meth:`hook`), so that
    the denoiser's pre-hook knows the prompt of each ``encoder_hidden_states`` row: gates' ``tokenuni``, guards' masks.

    Rows are matched by a hash of their content: the whole row; for SDXL, the first encoder's slice of the context
    (whose penultimate hidden states are remembered too); for SD3, whose context is ``[CLIP 1 | CLIP 2 | zero pad]``
    over the 77 CLIP positions followed by the T5 rows, the first encoder's block (the first 77 positions of its
    slice). The last ``size`` rows are kept.
    """

    def __init__(self, tokenizer, width: int | None, size: int = 1024):
        self.tokenizer, self.width, self.size = tokenizer, width, size
        self.rows: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()
        self.length: int | None = None  # the token length of the rows remembered (77 for CLIP)
        self._paused = 0

    @contextmanager
    def paused(self):
        """Remember nothing inside (encodings a hook makes for itself)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def hook(self, module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or self._paused:
            return None
        states = [output[0]]
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is not None and len(hidden_states) > 1:
            states.append(hidden_states[-2])  # SDXL's penultimate-layer context
        self.length = input_ids.shape[-1]
        for rows in states:
            for ids, row in zip(input_ids.tolist(), rows):
                key = row_key(row)
                self.rows[key] = inner_ids(self.tokenizer, ids)
                self.rows.move_to_end(key)
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)
        return None

    def tokens(self, row: torch.Tensor) -> tuple[int, ...] | None:
        """The inner token ids of a context row (L, D), or None when it was not produced here."""
        tokens = self.rows.get(row_key(row))
        if tokens is None and self.width is not None and row.shape[-1] > self.width:
            tokens = self.rows.get(row_key(row[..., :self.width]))  # SDXL: [encoder 1 | encoder 2] context
        if tokens is None and self.width is not None and self.length is not None and row.shape[0] > self.length:
            tokens = self.rows.get(row_key(row[:self.length, :self.width]))  # SD3: CLIP rows, then T5 rows
        return tokens

    def clear(self) -> None:
        self.rows.clear()
