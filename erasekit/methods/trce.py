"""TRCE: Towards Reliable Malicious Concept Erasure in Text-to-Image Diffusion Models (Chen, Guo, Wang, Zhang,
Nie, Liu; ICCV 2025, https://arxiv.org/abs/2503.07389); defaults and details from the authors' code
(github.com/ddgoodgood/TRCE: ``run_trce_stage1.py``, ``run_trce_stage2.py``, ``src/cfr_utils.py``, ``config/``).

Two stages, both in ONE adapter; ``stages`` selects them ("cross_attention", "early_steps", or both).

**Stage 1, cross-attention (closed form).** Every concept and every *implied* term (words that carry the concept
without naming it) is put in each template, beside the same template with the safe concept: pairs (e_i, s_i). The
key is the prompt's first [EoT] embedding, which aggregates the whole prompt (the reference's token weights
``[0, 1, 0, 0]``: SoT, first EoT, padding, keyword); it is mapped to the safe prompt's value, the preserve prompts'
keys (every token) to their own values, for each edited projection W (``attn2.to_k``/``to_v``):

    min_W  Σ_i (1/n) ||W c_e,i − W_old c_s,i||² + Σ_p (s_p/m) Σ_tok ||W c_p − W_old c_p||² + λ ||W − W_old||²_F

(n pairs, m preserve prompts, s_p = ``preserve_scale``) — UCE's Eq. 7 with per-key weights, solved by
:func:`erasekit.methods.uce.solve` (W' = W_old (I + P Qᵀ), one d×d solve for all layers). The preserve prompts
enter only through Σ c_p c_pᵀ, accumulated batch by batch into d×d (as the reference caches them). The reference
sets λ = 0 and gets an invertible system from cached MS-COCO statistics it ships separately; erasekit has no such
cache, so λ > 0 by default (λ = 0 works when the preserve prompts span the context space).

**Stage 2, early steps (trained).** The sampling trajectory is nearly fixed after the early steps, so only those
are steered. x_t is drawn from the *original* model's DDIM rollout (CFG ``start_guidance``) on an unsafe prompt e,
stopped after k ~ U{0..``max_early_step``} of ``num_inference_steps`` steps. With the original model's predictions
ε₀ and g = ``target_guidance``, the preferred and rejected targets are

    ε⁺ = ε₀(x_t, s) + g (ε₀(x_t, s) − ε₀(x_t, ∅)),    ε⁻ = ε₀(x_t, e) + g (ε₀(x_t, e) − ε₀(x_t, ∅))

and the student's conditional *and* unconditional predictions on x_t are pulled toward ε⁺ and pushed from ε⁻
by a triplet hinge (per sample, d = mean squared error; m = ``margin``, β = ``beta``):

    L_c(ε) = max(0, β (d(ε, ε⁺) − d(ε, ε⁻) + m)),    L_target = ½ (L_c(ε_θ(x_t, e)) + L_c(ε_θ(x_t, ∅)))

plus the regularisation ``regularization_weight`` · ||ε_θ(x_r, ∅) − ε₁(x_r, ∅)||² on the original model's
unconditional trajectories x_r at any step, ε₁ being the stage-1 model (the reference's ``unet_reg``); with
``preserve_weight`` (not in the paper) also ``preserve_weight`` · ||ε_θ(x_r, p) − ε₁(x_r, p)||² for one preserve
prompt p per sample (the tinyworld preset's, as ESD-x's there: the deltas act on every prompt). The student is
the original UNet + stage-1 deltas + trainable low-rank deltas on ``train_modules`` (the reference fine-tunes every
``attn1`` weight and ``attn2.to_q`` in full), trained on the shared loop (:func:`erasekit.methods.trainer.train`);
one UNet serves as student, stage-1 model and original (hooks switched off).

Deviations from the reference: rollouts on the fly from the step's seed (the reference pre-computes 100 unsafe and
2000 unconditional trajectories and redraws t within the stored step's 20-timestep bin); low-rank deltas with Adam at
a constant ``lr`` instead of full AdamW at 1e-6 whose gradients are never zeroed (``run_trce_stage2.py`` has no
``zero_grad``); no constant 0.01 added to the regularisation sum. On tinyworld the presets fill ``templates`` with
its caption templates, ``preserve`` with the concept's siblings, and ``implied`` with its synonyms but the last one,
which is held out (with tinyworld's held-out phrasings) so that leakage stays measurable.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ..adapter import Adapter
from ..core import lora
from ..errors import ConfigError
from . import text, uce
from .trainer import (Cond, ddim_scheduler, encode, guided_steps, latent_shape, package, predict, rollout,
                      rollout_options, train, training_options, validate_rollout_training)

logger = logging.getLogger(__name__)

STAGES = ("cross_attention", "early_steps")
#: The reference's prompt augmentation for objects (``prompt_augmentation``, the first ``augment_num`` = 15).
PAPER_TEMPLATES: tuple[str, ...] = (
    "{} in a photo", "A snapshot of {}", "A photograph showcasing {}", "An illustration of {}",
    "A digital rendering of {}", "A visual representation of {}", "A black and white image of {}",
    "A scene depicting {} during a public gathering", "A depiction created with oil paints capturing {}",
    "An official photograph featuring {}", "A detailed sketch of {}", "{} during sunset/sunrise",
    "Magazine cover capturing {}", "An oil portrait of {}", "{} in a sketch painting",
)


@dataclass(frozen=True)
@training_options
@rollout_options
class TrceConfig:
    """TRCE's two stages; defaults of the authors' code (``config/stage*/*_sexual_default.yaml``) unless said.

    Args:
        concepts: concepts to erase, e.g. ("nudity",); several are erased jointly.
        stages: what the adapter holds: "cross_attention" (stage 1, closed form), "early_steps" (stage 2,
            trained), or both (the paper's TRCE).
        implied: terms that carry the concept without naming it (the reference's concept lists: "Naked",
            "Erotic", ...); erased like the concepts, each mapped to the first concept's safe concept.
        implied_synonyms: also treat the concepts' synonyms in the model's own vocabulary as implied terms,
            all but the last, which is held out (tinyworld: "disc" for circle, "round shape" held out); no effect on
            models without one.
        safe: the safe concept each concept's prompts are mapped to, in the same template (the reference's concept
            lists: "a person wearing clothes" for nudity); one for all concepts or one per concept. Empty: ""
            (the template without the concept), or on tinyworld each concept's first sibling that is not erased
            (square for circle: stage 2's contrast needs a safe prompt that guides as strongly as the unsafe one).
        templates: prompts the terms are put in, "{}" standing for the term; empty: the reference's 15 object
            templates (``PAPER_TEMPLATES``), or tinyworld's caption templates on tinyworld.
        preserve: prompts whose cross-attention keys and values stage 1 holds (every token), each alone and in
            every template (the reference holds cached MS-COCO captions).
        preserve_related: also preserve the concepts' siblings in the model's own vocabulary (tinyworld: the
            other shapes for a shape).
        preserve_scale: s_p, the weight of the preserve prompts, per prompt (the reference's 0.01).
        lam: λ, keeps W close to the original where no key constrains it (the reference: 0 with its COCO
            statistics; erasekit: 0.1).
        key_tokens: stage 1's keys: "eot" (the first [EoT] token of each prompt, the paper's) or "aligned"
            (every token, each mapped to its aligned token of the safe prompt, as UCE's "aligned" keys).
        targets: module-path suffixes of the UNet Linear layers stage 1 edits (they must read the text context).
        train_modules: module-path patterns of the UNet layers stage 2 trains deltas on: "attn1" matches every
            layer inside a self-attention, "attn2.to_q" the cross-attention queries (the reference's choice).
        target_guidance: g in the preferred and rejected targets ε(c) + g (ε(c) − ε(∅)) (the reference's 15).
        margin: m of the triplet hinge, in mean-squared-error units (the reference's 0.01).
        beta: β, scales the hinge (the reference's 1).
        max_early_step: x_t is drawn after k ~ U{0..max_early_step} DDIM steps (the reference: 25 of 50).
        regularization_weight: weight of the unconditional regularisation on unconditional trajectories (100).
        regularization_batch_size: unconditional x_r samples per step (4).
        preserve_weight: weight of a term the paper does not have: on the same x_r, the conditional prediction of
            one preserve prompt per sample is held to the stage-1 model's (0 = the paper's loss). Stage 2's deltas
            act on every prompt at every step; on tinyworld, without it, erasing red costs the other colours 34
            points (benchmarks/trce_tinyworld.json).
        start_guidance: classifier-free guidance of the rollout that produces x_t (the reference's 3).
        num_inference_steps: DDIM steps of the rollouts (the reference's 50).
        iterations: optimisation steps (the reference: 3 epochs × 100 trajectories = 300).
        lr: Adam learning rate, constant (the reference trains full weights at 1e-6; low-rank deltas: 1e-4).
        rank: rank of each stage-2 delta; 0 trains full-rank deltas, as the reference does.
        batch_size: unsafe x_t samples per step (the reference's 1).
    """

    concepts: tuple[str, ...]
    stages: tuple[str, ...] = STAGES
    implied: tuple[str, ...] = ()
    implied_synonyms: bool = False
    safe: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    preserve: tuple[str, ...] = ()
    preserve_related: bool = False
    preserve_scale: float = 0.01
    lam: float = 0.1
    key_tokens: Literal["eot", "aligned"] = "eot"
    targets: tuple[str, ...] = uce.DEFAULT_TARGETS
    train_modules: tuple[str, ...] = ("attn1", "attn2.to_q")
    target_guidance: float = 15.0
    margin: float = 0.01
    beta: float = 1.0
    max_early_step: int = 25
    regularization_weight: float = 100.0
    regularization_batch_size: int = 4
    preserve_weight: float = 0.0
    start_guidance: float = 3.0
    num_inference_steps: int = 50
    iterations: int = 300
    lr: float = 1e-4
    rank: int = 4
    batch_size: int = 1

    def __post_init__(self):
        uce.validate_config(self)
        validate_rollout_training(self)
        if not self.stages or any(s not in STAGES for s in self.stages) or len(set(self.stages)) < len(self.stages):
            raise ConfigError(f"stages must be one or both of {', '.join(STAGES)}, got {self.stages!r}")
        if any(not p.strip() for p in (*self.implied, *self.preserve)):
            raise ConfigError("implied and preserve prompts must be non-empty")
        if len(self.safe) not in (0, 1, len(self.concepts)):
            raise ConfigError(f"give one safe concept for all concepts or one per concept; got {len(self.safe)} "
                              f"for {len(self.concepts)} concepts")
        if not self.train_modules:
            raise ConfigError("train_modules is empty")
        uce.positive(self, "beta")
        uce.positive(self, "preserve_scale", "lam", "target_guidance", "margin", "regularization_weight",
                     "preserve_weight", strict=False)
        if self.regularization_batch_size < 1:
            raise ConfigError(f"regularization_batch_size must be ≥ 1, got {self.regularization_batch_size}")
        if not 0 <= self.max_early_step < self.num_inference_steps:
            raise ConfigError(f"max_early_step must be in [0, num_inference_steps) = [0, {self.num_inference_steps}),"
                              f" got {self.max_early_step}")


# ------------------------------------------------------------------------------------------------ prompts
def fill(template: str, word: str) -> str:
    return " ".join(template.replace("{}", word).split())


def prompt_pairs(config: TrceConfig) -> list[tuple[str, str]]:
    """(unsafe prompt, safe prompt) pairs: every concept and implied term in every template, beside the same
    template with its safe concept (the reference augments both columns of its concept list alike)."""
    templates = config.templates or PAPER_TEMPLATES
    safe = config.safe or ("",)
    safe = safe * len(config.concepts) if len(safe) == 1 else safe
    terms = list(zip(config.concepts, safe)) + [(term, safe[0]) for term in config.implied]
    return list(dict.fromkeys((fill(t, term), fill(t, s)) for term, s in terms for t in templates))


def preserve_prompts(config: TrceConfig) -> list[str]:
    """``config.preserve`` (with ``preserve_related``, plus the presets' siblings), each alone and in every template."""
    templates = config.templates or PAPER_TEMPLATES
    return list(dict.fromkeys(q for p in config.preserve for q in (p, *(fill(t, p) for t in templates))))


# ------------------------------------------------------------------------------------------------ stage 1
def stage1_keys(pipe, config: TrceConfig, pairs) -> tuple[uce.Keys, torch.Tensor, torch.Tensor]:
    """The keys of stage 1's solve and their weights: (Keys, erase weights (n,), preserve weights (m,))."""
    unsafe, safe = [e for e, _ in pairs], [s for _, s in pairs]
    unique = list(dict.fromkeys(unsafe + safe))
    row = {p: i for i, p in enumerate(unique)}
    if config.key_tokens == "eot":  # one key per prompt: its first [EoT] token
        emb = text.last_token_embeddings(pipe, unique, offset=1)
        pick = lambda prompts: emb[torch.tensor([row[p] for p in prompts], device=emb.device)]  # noqa: E731
        erase, guide = pick(unsafe), pick(safe)
    else:  # every token, to its aligned token of the safe prompt
        emb = text.encode_prompts(pipe, unique)
        erase = torch.cat([emb[row[e]] for e in unsafe])
        guide = torch.cat([emb[row[s]][torch.tensor(text.align_tokens(pipe, e, s), device=emb.device)]
                           for e, s in pairs])
    kept = preserve_prompts(config)
    preserve = preserve_basis(pipe, kept) if kept else erase.new_zeros(0, erase.shape[1])
    w_erase = torch.full((len(erase),), 1.0 / len(pairs), dtype=torch.float64)
    w_preserve = torch.full((len(preserve),), config.preserve_scale / max(1, len(kept)), dtype=torch.float64)
    return uce.Keys(erase, guide, preserve), w_erase, w_preserve


def preserve_basis(pipe, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """(d, d) fp64 rows K with KᵀK = Σ c cᵀ over every token c of every prompt: all the solve needs of them, in
    d² numbers however many prompts (the reference caches these sums), accumulated batch by batch."""
    gram = None
    for i in range(0, len(prompts), batch_size):
        tokens = text.encode_prompts(pipe, prompts[i:i + batch_size], batch_size).flatten(0, 1).double()
        gram = tokens.T @ tokens if gram is None else gram + tokens.T @ tokens
    values, vectors = torch.linalg.eigh(gram)
    return (vectors * values.clamp(min=0).sqrt()).T


def cross_attention(pipe, config: TrceConfig, pairs) -> tuple[dict, dict]:
    """Stage 1: the closed-form deltas of ``targets`` and their record."""
    started = time.perf_counter()
    modules = uce.find_targets(pipe, config.targets)
    keys, w_erase, w_preserve = stage1_keys(pipe, config, pairs)
    try:
        edit = uce.solve(keys, w_erase, w_preserve, config.lam)
    except torch.linalg.LinAlgError:
        raise ConfigError("stage 1's system is singular: with lam = 0 the preserve prompts' keys must span the "
                          "text-context space; set lam > 0 or give more preserve prompts") from None
    deltas = uce.module_deltas(modules, edit.P, edit.Q)
    info = {"rank": int(edit.P.shape[1]), "erase_keys": len(keys.erase),
            "preserve_prompts": len(preserve_prompts(config)),
            "targets": list(config.targets), "seconds": round(time.perf_counter() - started, 3)}
    return deltas, info


# ------------------------------------------------------------------------------------------------ stage 2
def stage2_modules(unet, config: TrceConfig, edited=()) -> list[str]:
    """Paths of the layers stage 2 trains deltas on (``train_modules``); none may be one stage 1 edited."""
    patterns = config.train_modules
    names = lora.select(unet, lambda n, m: any(n.endswith("." + p) or f".{p}." in n or n == p for p in patterns))
    if not names:
        raise ConfigError(f"train_modules {list(patterns)} match no Linear/Conv2d layer of the UNet")
    clash = sorted(set(names) & {k.split(".", 1)[1] for k in edited})
    if clash:
        raise ConfigError(f"train_modules and targets share {clash[0]}: stage 2 cannot train a layer stage 1 edits")
    return names


@contextlib.contextmanager
def applied(unet, deltas: dict):
    """Stored deltas on ``unet`` with hooks for the block (grouped by rank); yields their ``lora.Deltas``."""
    groups: dict[int, dict] = {}
    for key, delta in deltas.items():
        groups.setdefault(delta.rank or 0, {})[key] = delta
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(lora.applied(unet, group)) for group in groups.values()]


def disabled(*deltas: lora.Deltas) -> contextlib.ExitStack:
    """Every one of ``deltas`` switched off for the block."""
    stack = contextlib.ExitStack()
    for d in deltas:
        stack.enter_context(d.disabled())
    return stack


def triplet(anchor: torch.Tensor, preferred: torch.Tensor, rejected: torch.Tensor, margin: float,
            beta: float) -> torch.Tensor:
    """Per sample: max(0, β (d(a, ε⁺) − d(a, ε⁻) + m)), d = mean squared error over the sample."""
    d_pos = (anchor - preferred).pow(2).flatten(1).mean(1)
    d_neg = (anchor - rejected).pow(2).flatten(1).mean(1)
    return (beta * (d_pos - d_neg + margin)).clamp(min=0)


def objective(pipe, config: TrceConfig, pairs, stage1: list[lora.Deltas]) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator)``: stage 2's loss of one step (module docstring)."""
    unet = pipe.unet
    kept = preserve_prompts(config) if config.preserve_weight else []
    conds, uncond = encode(pipe, [e for e, _ in pairs] + [s for _, s in pairs] + kept, config.resolution)
    scheduler = ddim_scheduler(pipe, config.num_inference_steps)
    shape = latent_shape(pipe, config.batch_size, config.resolution)
    reg_shape = latent_shape(pipe, config.regularization_batch_size, config.resolution)
    n, g, count = shape[0], config.target_guidance, len(pairs)

    def loss_for(deltas: lora.Deltas):
        def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
            rows = torch.randint(count, (n,), generator=gen).tolist()
            early = int(torch.randint(config.max_early_step + 1, (), generator=gen))
            unsafe, safe = Cond.cat([conds[r] for r in rows]), Cond.cat([conds[count + r] for r in rows])
            null = uncond.repeat(n)
            with torch.no_grad(), disabled(deltas, *stage1):  # the original model
                x, t = rollout(unet, scheduler, unsafe, uncond, config.start_guidance, early, shape, gen)
                e_unsafe, e_safe, e_null = predict(unet, torch.cat([x] * 3), t,
                                                   Cond.cat([unsafe, safe, null])).float().chunk(3)
            preferred = (e_safe + g * (e_safe - e_null)).repeat(2, 1, 1, 1)
            rejected = (e_unsafe + g * (e_unsafe - e_null)).repeat(2, 1, 1, 1)
            student = predict(unet, torch.cat([x, x]), t, Cond.cat([unsafe, null])).float()
            loss = triplet(student, preferred, rejected, config.margin, config.beta).mean()
            if not (config.regularization_weight or kept):
                return loss
            m = reg_shape[0]
            nulls = uncond.repeat(m)
            k = int(torch.randint(config.num_inference_steps, (), generator=gen))
            with torch.no_grad(), disabled(deltas, *stage1):  # the original model's unconditional trajectory
                x_r = torch.randn(reg_shape, generator=gen).to(scheduler.timesteps.device, nulls.hidden.dtype)
                x_r, t_r = guided_steps(lambda x2, t: predict(unet, x2[:m], t, nulls).repeat(2, 1, 1, 1),
                                        scheduler, x_r * scheduler.init_noise_sigma, 1.0, k)  # one pass per step
            held = [nulls]  # the unconditional prediction, and with preserve_weight one preserve prompt per sample
            if kept:
                drawn = torch.randint(len(kept), (m,), generator=gen).tolist()
                held.append(Cond.cat([conds[2 * count + r] for r in drawn]))
            parts = len(held)
            x_r, held = torch.cat([x_r] * parts), Cond.cat(held)
            with torch.no_grad(), deltas.disabled():  # the stage-1 model
                target = predict(unet, x_r, t_r, held).float().chunk(parts)
            student = predict(unet, x_r, t_r, held).float().chunk(parts)
            loss = loss + config.regularization_weight * (student[0] - target[0]).pow(2).mean()
            return loss + config.preserve_weight * (student[-1] - target[-1]).pow(2).mean() if kept else loss

        return loss_fn

    return loss_for


# ------------------------------------------------------------------------------------------------ erase
def erase(pipe, config: TrceConfig) -> Adapter:
    """TRCE's adapter for ``config.stages``; ``pipe`` is left as it was (no hooks, same weights)."""
    started = time.perf_counter()
    pairs = prompt_pairs(config)
    deltas: dict = {}
    info: dict = {"stages": list(config.stages), "pairs": len(pairs)}
    if "cross_attention" in config.stages:
        deltas, info["cross_attention"] = cross_attention(pipe, config, pairs)
        logger.info("trce stage 1: %d pairs, %d preserve prompts, rank %d", len(pairs),
                    info["cross_attention"]["preserve_prompts"], info["cross_attention"]["rank"])
    if "early_steps" in config.stages:
        names = stage2_modules(pipe.unet, config, deltas)
        with applied(pipe.unet, deltas) as stage1:
            trained = train(pipe, config, names, objective(pipe, config, pairs, stage1), "trce")
        deltas = {**deltas, **trained.deltas}
        info.update(trained.info)
    info["seconds"] = round(time.perf_counter() - started, 2)
    components = uce.text_components(pipe) if "cross_attention" in config.stages else ("unet",)
    return package(pipe, config, "trce", deltas, components, info)


__all__ = ["PAPER_TEMPLATES", "STAGES", "TrceConfig", "cross_attention", "erase", "objective", "prompt_pairs",
           "stage1_keys", "triplet"]
