"""SAFREE — training-free and adaptive guard (Yoon, Yu, Patil, Yao, Bansal, "SAFREE: Training-Free and Adaptive
Guard for Safe Text-to-Image And Video Generation", ICLR 2025, https://arxiv.org/abs/2410.12761).

SAFREE changes no weight: ``erase`` only builds the concept subspace from the pipeline's text encoder(s) and
returns an adapter of kind ``"guard"`` (format 1.1) holding it (``guard.basis``) and the rule's parameters
(``Adapter.guard``). Loaded with ``erasekit.compose.load``, the guard acts at generation time
(:mod:`erasekit.compose.guards`, which states the equations): per prompt, the masked-token rule finds the tokens
close to the concept subspace (§3.1, ``d_i = ‖(I − P_C) m_i‖ ≥ (1 + α) mean_{j≠i} d_j``), projects them as
``(I − P_C) P_I e`` (orthogonal to the concept, within the prompt's own subspace, §3.2), the self-validating filter
sets for how many denoising steps the projected context is used (§3.3, ``t' = round(10 σ(5 (10 β − 5.333)))`` with
``β = 1 − cos``), and the re-attention scales the low frequencies of the UNet decoder's skip features while it is
(§3.4, FreeU's filter with s1 = 0.9, s2 = 0.2).

Defaults are the authors' (github.com/jaehong31/SAFREE: α = 0.01, masked token id 0, the pooled EOS embedding,
``up_t`` = 10, ``f_beta``'s sigmoid with k = 2.5 scaled by 2 around 5.333, FreeU 1.0-1.0-0.9-0.2). The concept
subspace is spanned by the pooled embeddings of ``concepts`` (the authors pass a list of keywords per category,
e.g. 17 for nudity).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch

from ..adapter import Adapter
from ..compose.guards import orthonormal_basis, pooled
from ..core import sd
from ..errors import ConfigError
from . import uce
from .trainer import package

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SafreeConfig:
    """SAFREE's guard (the authors' defaults; ``erasekit.compose.guards`` for the equations).

    Args:
        concepts: prompts whose embeddings span the concept subspace, e.g. ("nudity", "sexual acts", "pornography").
        alpha: α of the masked-token rule: a token is a trigger when masking it moves the prompt at least (1 + α)
            times as far from the concept subspace as masking the other tokens does on average.
        pooling: a prompt's embedding for the rule and the subspace: "eot" (the context row at the end-of-text
            token, CLIP's pooled output; the authors') or "mean" (the mean of the token and end-of-text rows, for
            text encoders whose end-of-text row is no summary of the prompt).
        mask_token_id: the token id that replaces a masked token (the authors' 0, CLIP's "!"); -1 deletes it.
        subspace: "pooled" (one vector per concept prompt, the authors') or "tokens" (every row after the start
            token of each concept prompt's encoding, reduced to ``subspace_rank`` directions).
        subspace_rank: at most this many directions per text encoder (largest singular values); 0 keeps all.
        project: the rows a trigger token's projection replaces: "flagged" (the trigger tokens, the authors') or
            "following" (the first trigger and every row after it, for causal text encoders that carry a
            token's meaning into the rows after it).
        svf: the self-validating filter: the projected context is used for ``t' + 1`` denoising steps,
            t' = round(svf_upper · σ(svf_steepness · (10 β − svf_midpoint))), β = 1 − cos(projected, original);
            off: at every step.
        svf_upper: the most steps t' can reach (the authors' ``up_t``).
        svf_midpoint: the sigmoid's midpoint in units of 10 β.
        svf_steepness: the sigmoid's slope (the authors' k = 2.5 times their scale 2).
        reattention: scale the low frequencies of the skip features entering the first two decoder blocks of the
            UNet for the rows (prompts) the guard filters, while it filters them (FreeU's Fourier filter).
        reattention_s1: the scale in the first decoder block (FreeU's s1).
        reattention_s2: the scale in the second decoder block (FreeU's s2).
    """

    concepts: tuple[str, ...]
    alpha: float = 0.01
    pooling: Literal["eot", "mean"] = "eot"
    mask_token_id: int = 0
    subspace: Literal["pooled", "tokens"] = "pooled"
    subspace_rank: int = 0
    project: Literal["flagged", "following"] = "flagged"
    svf: bool = True
    svf_upper: int = 10
    svf_midpoint: float = 5.333
    svf_steepness: float = 5.0
    reattention: bool = True
    reattention_s1: float = 0.9
    reattention_s2: float = 0.2

    def __post_init__(self):
        uce.validate_config(self)
        uce.positive(self, "svf_steepness")
        uce.positive(self, "svf_upper", "subspace_rank", "reattention_s1", "reattention_s2", strict=False)
        if self.mask_token_id < -1:
            raise ConfigError(f"SafreeConfig.mask_token_id must be a token id, or -1 to delete, got "
                              f"{self.mask_token_id}")
        if not -1 < self.alpha < 1e6:
            raise ConfigError(f"SafreeConfig.alpha must be > -1, got {self.alpha}")


def guard_record(config: SafreeConfig, segments: list[int]) -> dict:
    """The ``guard`` record (:data:`erasekit.adapter.GUARD_RULES`'s ``"safree"``) of ``config``."""
    svf = {"upper": config.svf_upper, "midpoint": config.svf_midpoint, "steepness": config.svf_steepness}
    reattention = {"scales": [config.reattention_s1, config.reattention_s2], "threshold": 1}
    return {"rule": "safree", "prompts": list(config.concepts), "alpha": config.alpha, "pooling": config.pooling,
            "mask_token_id": config.mask_token_id, "subspace": config.subspace, "project": config.project,
            "segments": segments, "svf": svf if config.svf else {}, "reattention": reattention if config.reattention
            else {}}


def concept_vectors(pipe, config: SafreeConfig) -> torch.Tensor:
    """The vectors spanning the concept subspace: one pooled embedding per concept prompt, or every row after the
    start token of each (``subspace="tokens"``), from the pipeline's own encoding."""
    ids = [sd.token_ids(pipe.tokenizer, c) for c in config.concepts]
    empty = [c for c, i in zip(config.concepts, ids) if not i]
    if empty:
        raise ConfigError(f"SafreeConfig.concepts: {empty} encode to no tokens")
    if config.subspace == "tokens":
        return sd.encode(pipe, list(config.concepts)).embeds[:, 1:].flatten(0, 1)
    ids = [i[:pipe.tokenizer.model_max_length - 2] for i in ids]
    length = max(len(i) for i in ids) + 2
    per_encoder = [torch.tensor([sd.sequence(tok, i, length) for i in ids]) for tok, _ in sd.encoders(pipe)]
    return pooled(sd.encode_ids(pipe, per_encoder).embeds, [len(i) for i in ids], config.pooling)


@torch.no_grad()
def erase(pipe, config: SafreeConfig) -> Adapter:
    """Return SAFREE's guard for ``config.concepts`` (no weight deltas); ``pipe`` is not modified."""
    start = time.perf_counter()
    vocabulary = pipe.tokenizer.vocab_size if hasattr(pipe.tokenizer, "vocab_size") else len(pipe.tokenizer)
    if config.mask_token_id >= vocabulary:
        raise ConfigError(f"SafreeConfig.mask_token_id {config.mask_token_id} is not in this tokenizer's vocabulary "
                          f"of {vocabulary} tokens")
    segments = [int(encoder.config.hidden_size) for _, encoder in sd.encoders(pipe)]
    basis = orthonormal_basis(concept_vectors(pipe, config), segments, config.subspace_rank)
    info = {"subspace_rank": int(basis.shape[0]), "seconds": round(time.perf_counter() - start, 3)}
    logger.info("safree: %d concept prompt(s), a %d-dimensional subspace", len(config.concepts), basis.shape[0])
    components = tuple(c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None)
    adapter = package(pipe, config, "safree", {}, components, info, {"guard.basis": basis.float().contiguous()})
    return dataclasses.replace(adapter, guard=guard_record(config, segments))
