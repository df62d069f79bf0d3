"""RECE — Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024, https://arxiv.org/abs/2407.12383).

Iterated UCE on derived adversarial embeddings (Algorithm 1; CharlesGong12/RECE ``train.py``,
``utils/embedding_calculation/close_form_emb.py::close_form_emb_regzero``, ``erase_methods/uce.py``):

0. a UCE erasure of the concepts from the base model (the reference code loads a UCE checkpoint made by the
   paper-era UCE script; here it is solved in place, so no pre-made checkpoint is needed);
1. each epoch, the closed-form embedding that makes the *edited* layers W'_l reproduce the *original* layers'
   outputs for the concept, on all 77 token embeddings c of the concept prompt::

       c' = argmin Σ_l ||W'_l c' − W_l c||² + λ_reg ||c'||² = (λ_reg I + Σ_l W'_lᵀ W'_l)⁻¹ (Σ_l W'_lᵀ W_l) c

   (l over every target layer; W original, W' current);
2. erase c' with the UCE solve anchored at the current weights (λ-term and targets W' c_g, W' c_p).

Every step keeps the form ``W' = W T`` (:mod:`erasekit.methods.uce`): with ``G = Σ_l W_lᵀ W_l`` (d×d, original
weights) the embedding is ``c' = (λ_reg I + Tᵀ G T)⁻¹ Tᵀ G c`` and an epoch's solve multiplies ``T`` by
``I + P_k Q_kᵀ``. The final delta ``W (T − I)`` is given exactly as low-rank factors: the epochs' factors
``(T_{<k} P_k, Q_k)`` concatenated, then recompressed by thin QR + SVD of the small core, dropping only singular
values ≤ 1e-10·σ_max (:func:`erasekit.methods.uce.compress`); rank ≤ total number of erase keys.

Defaults (``train.py`` and README): 3 epochs (README's nudity setting; the script's argparse default is 10),
λ = 0.1, λ_reg = 0.1, preserve_scale = 0.1, erase_scale = 1, guide " " (unconditional), to_k and to_v;
when no preserve prompts are given the reference preserves " " once per concept, as done here. Epoch 0 uses the
UCE settings of the checkpoint the README points to (λ 0.5, scales 1, paper-era "tokens" keys).

Model selection (``train.py`` l.263-275): the reference generates a validation set after every epoch and keeps the
epoch whose images a classifier (NudeNet / Q16) flags least, saving only strict improvements. With
``validation_judge`` set, the same happens here, the initial UCE solve (epoch 0) included: every candidate edit is
applied to the pipeline (:mod:`erasekit.compose`), ``validation_prompts`` × ``validation_seeds`` are generated and
judged, and the earliest edit with the lowest rate is returned. Without it the last epoch is returned. Not
reproduced: the reference's random sampling of preserve prompts (all are used).
"""

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..adapter import Adapter
from ..core import sd
from . import text, uce

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
@uce.solve_options
class ReceConfig:
    """RECE (Algorithm 1), defaults of the reference code.

    Args:
        concepts: prompts to erase, e.g. ("nudity",).
        guides: what each concept is mapped to, one for all or one per concept; "" = unconditional.
        preserve: prompts whose 77 token embeddings keep their outputs in every adversarial step; empty = the
            empty prompt, once per concept (as the reference code).
        epochs: number of adversarial-embedding erasure rounds after the initial UCE solve.
        erase_scale: s_e of the adversarial steps.
        preserve_scale: s_p of the adversarial steps.
        lam: λ of the adversarial steps (anchors each step to the current weights).
        reg_scale: λ_reg, ridge term of the adversarial-embedding solve (0.1; README: 1e-3 for artists and
            hard objects).
        initial_uce: start with a UCE erasure of the concepts (epoch 0); false = adversarial steps only.
        uce_lam: λ of the initial UCE solve.
        uce_preserve_scale: s_p of the initial UCE solve (its preserve prompts are ``preserve``).
        uce_key_mode: keys of the initial UCE solve, "tokens" (paper-era code), "last_token" or "aligned"
            (:class:`erasekit.methods.uce.UceConfig`).
        expand_prompts: prompt templates for the concepts and preserve prompts of the initial UCE solve ("none",
            "object", "art", "tinyworld"; as UCE's); the adversarial steps use each concept's own prompt.
        negative_guidance: η of every solve (UCE's: targets c_g + η(c_g − c); 0 = the paper).
        preserve_related: preserve the erased concepts' related concepts in every step (UCE's; tinyworld).
        targets: module-path suffixes of the UNet Linear layers to edit.
        validation_judge: keep the epoch whose validation images this judge ("tinyworld", "nudenet", "clip") flags
            least, the initial UCE solve included (the reference's model selection); "" = return the last epoch.
        validation_prompts: prompts of the validation set (default: the concepts themselves; on tinyworld, 8 of
            each concept's canonical grid prompts).
        validation_seeds: validation images per prompt (seeds 0, 1, ...).
    """

    concepts: tuple[str, ...]
    guides: tuple[str, ...] = ("",)
    preserve: tuple[str, ...] = ()
    epochs: int = 3
    erase_scale: float = 1.0
    preserve_scale: float = 0.1
    lam: float = 0.1
    reg_scale: float = 0.1
    initial_uce: bool = True
    uce_lam: float = 0.5
    uce_preserve_scale: float = 1.0
    uce_key_mode: Literal["last_token", "tokens", "aligned"] = "tokens"
    validation_judge: str = ""
    validation_prompts: tuple[str, ...] = ()
    validation_seeds: int = 1

    def __post_init__(self):
        from ..errors import ConfigError
        from ..judges import JUDGES

        uce.validate_config(self)
        if self.validation_judge and self.validation_judge not in JUDGES:
            raise ConfigError(f"ReceConfig: validation_judge must be '' or one of {', '.join(JUDGES)}, "
                              f"got {self.validation_judge!r}")
        if self.validation_seeds < 1:
            raise ConfigError(f"ReceConfig: validation_seeds must be ≥ 1, got {self.validation_seeds}")
        uce.positive(self, "erase_scale", "lam", "uce_lam", "reg_scale")
        uce.positive(self, "preserve_scale", "uce_preserve_scale", "epochs", "negative_guidance", strict=False)
        if self.epochs == 0 and not self.initial_uce:
            raise ConfigError("ReceConfig: epochs=0 without initial_uce erases nothing")


def gram(modules: dict[str, torch.nn.Module], device, dtype) -> torch.Tensor:
    """G = Σ_l W_lᵀ W_l over the target layers (d×d)."""
    G = None
    for module in modules.values():
        W = uce.weight64(module, device, dtype)
        G = W.T @ W if G is None else G + W.T @ W
    return G


def adversarial_map(G: torch.Tensor, T: torch.Tensor, reg_scale: float) -> torch.Tensor:
    """R with ``c' = R c``: ``R = (λ_reg I + Tᵀ G T)⁻¹ Tᵀ G`` for edited layers ``W'_l = W_l T``."""
    dim = G.shape[0]
    TG = T.T @ G
    return torch.linalg.solve(reg_scale * torch.eye(dim, dtype=G.dtype, device=G.device) + TG @ T, TG)


def combine(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(P, Q)`` for the edit ``T = Π_k (I + P_k Q_kᵀ)`` given as ``(T_{<k} P_k, Q_k)`` factors: concatenated,
    then recompressed (:func:`erasekit.methods.uce.compress`)."""
    return uce.compress(torch.cat([f[0] for f in factors], 1), torch.cat([f[1] for f in factors], 1))


def is_tinyworld_concept(concept: str) -> bool:
    """Whether ``concept`` names a tinyworld concept (a canonical name or a synonym)."""
    from ..tinyworld import concept_attribute

    try:
        concept_attribute(concept)
    except KeyError:
        return False
    return True


class _Validation:
    """The reference's model selection: the share of validation images in which a judge sees the concept(s)."""

    def __init__(self, pipe, config: ReceConfig, modules: dict, pooled: dict):
        from ..audit import tinyworld_prompts
        from ..judges import load

        self.pipe, self.config, self.modules, self.pooled = pipe, config, modules, pooled
        self.sets = []  # (judge, prompts) per concept
        for concept in config.concepts:
            options = {"pipe": pipe} if config.validation_judge == "tinyworld" else {}
            prompts = list(config.validation_prompts)
            if not prompts and config.validation_judge == "tinyworld" and is_tinyworld_concept(concept):
                grid = tinyworld_prompts(concept)
                prompts = grid[:: max(1, len(grid) // 8)][:8]
            self.sets.append((load(config.validation_judge, concept, **options), prompts or [concept]))

    def rate(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
        from .. import compose
        from ..generate import generate
        from ..judges import verdict

        deltas = {**uce.module_deltas(self.modules, *combine(factors), uce.denoiser_component(self.pipe)), **self.pooled}
        candidate = uce.make_adapter("rece", self.config, self.pipe, deltas, {}, {})
        name = compose.load(self.pipe, candidate, name="rece-validation")
        try:
            hits = []
            for judge, prompts in self.sets:
                seeds = list(range(self.config.validation_seeds))
                images = generate(self.pipe, [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds])
                hits += verdict(judge, images)[1]
        finally:
            compose.unload(self.pipe, name)
        return sum(hits) / len(hits)


@torch.no_grad()
def erase(pipe, config: ReceConfig) -> Adapter:
    """Return the RECE edit of ``pipe``'s UNet (base → final) as exact low-rank deltas; ``pipe`` is not modified."""
    start = time.perf_counter()
    modules = uce.find_targets(pipe, config.targets)
    device = text.device_of(pipe)
    dtype = uce.solve_dtype(device)
    dim = text.context_dim(pipe)
    eye = torch.eye(dim, dtype=dtype, device=device)
    T = eye.clone()
    factors: list[tuple[torch.Tensor, torch.Tensor]] = []
    keys_total = 0

    config = dataclasses.replace(config, guides=uce.choose_guides(pipe, config))  # guide_choice="nearest"
    first = uce.UceConfig(concepts=config.concepts, guides=config.guides, preserve=config.preserve,
                          erase_scale=config.erase_scale, preserve_scale=config.uce_preserve_scale,
                          lam=config.uce_lam, key_mode=config.uce_key_mode, targets=config.targets,
                          expand_prompts=config.expand_prompts, negative_guidance=config.negative_guidance,
                          preserve_related=config.preserve_related, save_stats=False)
    # MMDiT: UCE's pooled-text edit (uce module docstring, "MMDiT"); RECE's epochs act on the context
    keys, pooled_keys = uce.text_keys(pipe, first) if config.initial_uce else (None, None)
    if pooled_keys is None and sd.is_mmdit(pipe):
        pooled_keys = uce.pooled_keys(pipe, first)
    pooled = {} if pooled_keys is None else uce.pooled_edit(pipe, pooled_keys, first.erase_scale,
                                                             first.preserve_scale, first.lam)
    if config.initial_uce:  # 0. UCE from the base model
        edit = uce.solve(keys, first.erase_scale, first.preserve_scale, first.lam, dtype)
        factors.append((edit.P, edit.Q))
        T = T + edit.P @ edit.Q.T
        keys_total += keys.erase.shape[0]

    # the adversarial steps work on each concept's own prompt (77 tokens), as the paper; templates and the
    # related concepts shape the initial UCE solve and the preserve set
    pairs = uce.prompt_pairs(config.concepts, config.guides)
    preserve = uce.preserve_prompts(dataclasses.replace(config, expand_prompts="none")) or [""] * len(config.concepts)
    unique = list(dict.fromkeys([c for c, _ in pairs] + [a for _, g in pairs for a in uce.alternatives(g)]
                                + preserve))
    sequences = uce._gather(text.encode_prompts(pipe, unique).to(dtype), unique, pairs, preserve)  # each (·, 77, d)
    c = sequences.erase  # (n, 77, d) concept tokens
    c_g, c_p = sequences.guide.reshape(-1, dim), sequences.preserve.reshape(-1, dim)  # (n·77, d), (m·77, d)
    G = gram(modules, device, dtype) if config.epochs else None

    validation = _Validation(pipe, config, modules, pooled) if config.validation_judge else None
    rates: list[float] = []  # rates[i]: the edit of factors[:i + 1]
    if validation and factors:
        rates.append(validation.rate(factors))

    for epoch in range(config.epochs):
        R = adversarial_map(G, T, config.reg_scale)  # 1. c' = R c for all 77 tokens
        c_adv = (c @ R.T).reshape(-1, dim)
        target = c_g + config.negative_guidance * (c_g - c_adv) if config.negative_guidance else c_g
        keys = uce.Keys(c_adv, target, c_p)  # 2. UCE on c', anchored at W' = W T
        edit = uce.solve(keys, config.erase_scale, config.preserve_scale, config.lam, dtype)
        TP = T @ edit.P  # W' P = W (T P)
        factors.append((TP, edit.Q))
        T = T + TP @ edit.Q.T
        keys_total += keys.erase.shape[0]
        logger.debug("rece epoch %d: |T - I| = %.4g", epoch, float(torch.linalg.norm(T - eye)))
        if validation:
            rates.append(validation.rate(factors))

    if validation:  # the earliest lowest rate: the reference saves strict improvements only
        kept = rates.index(min(rates))
        factors = factors[:kept + 1]
    P, Q = combine(factors)
    deltas = {**uce.module_deltas(modules, P, Q, uce.denoiser_component(pipe)), **pooled}
    info = {"rank": int(P.shape[1]), "erase_keys": int(keys_total), "epochs": config.epochs,
            "targets": list(uce.resolve_targets(pipe, config.targets)), "seconds": round(time.perf_counter() - start, 3),
            "factorisation": "concatenated epoch factors, QR+SVD recompressed (rtol 1e-10)"}
    if validation:
        info.update(validation_rates=[round(r, 4) for r in rates],
                    kept_epoch=kept if config.initial_uce else kept + 1)  # 0 = the initial UCE solve
    logger.info("rece: %d concept(s), %d epoch(s), rank %d, %d modules", len(config.concepts), config.epochs,
                info["rank"], len(deltas))
    return uce.make_adapter("rece", config, pipe, deltas, {}, info)
