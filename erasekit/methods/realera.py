"""RealEra: Semantic-level Concept Erasure via Neighbor-Concept Mining (Yufan Liu, Jinyang An, Wanqian Zhang, Ming
Li, Dayan Wu, Jingzi Gu, Zheng Lin, Weiping Wang; arXiv preprint 2024, https://arxiv.org/abs/2410.09140).

No code was released, and what could be read of the paper is its abstract, its summary and its project page
(https://realerasing.github.io/RealEra/): erase the concept's embedding e *and* random perturbations
e + η with ``d(e, e + η) ≤ D₁`` and ``cos(e, e + η) ∈ [S₁, S₂]`` ("neighbour-concept mining", so that associated
inputs no longer bring the concept back), keep irrelevant concepts' mapping and spatial layout ("beyond-concept
regularisation"), and optimise with a closed-form cross-attention alignment plus a LoRA noise-prediction alignment.
The equations below implement exactly that on erasekit's parts; where the paper's details were not available the
choice is erasekit's and is said so.

1. **Neighbour-concept mining.** The erased concept's token embeddings e (the text encoder's input: every token of
   the concept's words) are moved to random neighbours e + η under both constraints, the distance taken relative to
   ‖e‖ (one bound for every text encoder; erasekit's choice): a random unit u ⟂ e, a cosine
   s ~ U[max(S₁, √(1 − D₁²)), S₂] and a length ratio ρ uniform where the distance bound holds,

       e + η = ‖e‖ ρ (s ê + √(1 − s²) u),   ρ ∈ [s − h, s + h],  h = √(D₁² − 1 + s²)
       ⇒ cos(e, e + η) = s ∈ [S₁, S₂],   ‖η‖² = ‖e‖² (1 + ρ² − 2ρs) ≤ D₁² ‖e‖².

   The erase prompts, encoded with their concept tokens at such neighbours (hooks on the input embeddings), are
   mined *associated concepts* in context; K draws of all of them give K mined keys per erase key (UCE's keys,
   :func:`erasekit.methods.uce.collect_keys`), each mapped to the anchor as its exact prompt is, with weight s_e / K
   (a key's neighbourhood weighs as much as the key; erasekit's choice).
2. **Beyond-concept regularisation.** The irrelevant concepts (``preserve``; with ``preserve_related`` on tinyworld
   the erased concept's siblings) keep their keys *and values*, so their cross-attention maps (where they are drawn)
   do not move: their keys, and those of B draws of their own neighbourhoods (the same sampler), are preserved with
   weight λ_r (λ_r / B per draw).
3. **Cross-attention alignment (closed form):** UCE's Eq. 7 over the augmented sets, one d×d solve for every
   to_k/to_v layer (:func:`erasekit.methods.uce.solve`):

       min_W Σ_{e ∈ E ∪ N} w_e ‖W e − v*_e‖² + Σ_{p ∈ P ∪ B} w_p ‖W p − W₀ p‖² + λ ‖W − W₀‖²_F,
       v*_e = W₀ (c_a + η_g (c_a − e))         (c_a: the anchor's key; η_g = negative_guidance, 0 = the paper's).

4. **Noise-prediction alignment (LoRA):** low-rank deltas B A on the same layers, trained by the shared trainer
   (:func:`erasekit.methods.trainer.fit_deltas`) on top of the closed-form edit: the erase prompts, encoded with
   their concept tokens at freshly mined neighbours (step 1) every step, must predict the anchor's noise,

       L = ‖ε_θ(x_t, c̃) − [ε₀(x_t, c_a) − η_g (ε₀(x_t, c) − ε₀(x_t, c_a))]‖²     (c̃: c with mined tokens)
           + λ_r · mean_k Σ_l ‖B_l A_l k‖² / mean_k Σ_l ‖W_l k‖²,

   x_t from a partial DDIM rollout of the original model ε₀ on c (ESD's), k over the beyond-concept keys and the
   empty prompt's tokens: deltas on k/v only leave a prompt's attention maps and noise prediction unchanged when
   they leave its keys and values unchanged, so the second term is the regularisation of step 2 for the LoRA.
5. **One adapter:** per layer ΔW = ΔW_cf + B A (factors stacked; one dense delta where the closed-form part is
   dense). ``iterations=0`` gives the closed-form part alone; with no neighbours and no beyond samples that is UCE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..adapter import Adapter, ModuleDelta
from ..core import lora, sd
from ..errors import ConfigError
from . import text, trainer, uce

logger = logging.getLogger(__name__)

#: beyond-concept keys per step in the LoRA's key/value regularisation
REG_BATCH = 256


@dataclass(frozen=True)
@trainer.training_options
@trainer.rollout_options
@uce.solve_options
class RealEraConfig:
    """RealEra (module docstring). The paper's hyper-parameters are not in what could be read of it: the mining
    bounds are erasekit's, chosen so that among tinyworld's token embeddings a concept's synonyms lie inside the
    neighbourhood (relative distance 0.67–0.88, cosine 0.60–0.78) and its siblings outside (distance 1.3–1.5,
    cosine ≈ 0); the LoRA stage is sized as MACE's (the two-stage design RealEra shares: a rank-4 k/v LoRA on top of
    the closed-form edit).

    Args:
        concepts: prompts to erase, e.g. ("circle",); solved jointly.
        guides: the anchor each erased concept is mapped to (v* = W·key of the anchor); "" = unconditional. One
            for all concepts, or one per concept; with ``guide_choice="nearest"`` a guide of several prompts (or
            ``guide_related``'s siblings, the tinyworld preset) is first narrowed to the one nearest the concept
            under the text encoder (:func:`erasekit.methods.uce.choose_guides`), which the LoRA's anchor uses too.
        preserve: irrelevant concepts whose keys and values (hence attention maps) must not change.
        neighbors: K, draws of mined neighbour concepts in the closed form (K mined keys per erase key; 0: none).
        neighbor_radius: D₁, the bound on ‖η‖ relative to ‖e‖ (e: a concept token's embedding).
        neighbor_cos_min: S₁, the least cosine between a token embedding and its neighbour.
        neighbor_cos_max: S₂, the largest cosine between a token embedding and its neighbour.
        beyond_samples: B, draws of the preserved concepts' own neighbourhoods preserved with them (0: none).
        regularization_weight: λ_r, the weight of the preserved keys in the closed form (UCE's s_p) and of the
            LoRA's key/value preservation term.
        erase_scale: s_e, the weight of the erase keys in the closed form.
        lam: λ, keeps W close to the original (UCE's).
        key_mode: UCE's keys: "last_token", "tokens" or "aligned" (:class:`erasekit.methods.uce.UceConfig`).
        iterations: LoRA optimisation steps (0: the closed-form part alone).
        lr: Adam learning rate of the LoRA.
        rank: rank of the LoRA deltas (0 trains full-rank deltas).
        batch_size: x_t samples per LoRA step.
    """

    concepts: tuple[str, ...]
    guides: tuple[str, ...] = ("",)
    preserve: tuple[str, ...] = ()
    neighbors: int = 8
    neighbor_radius: float = 0.9
    neighbor_cos_min: float = 0.55
    neighbor_cos_max: float = 0.95
    beyond_samples: int = 4
    regularization_weight: float = 1.0
    erase_scale: float = 1.0
    lam: float = 0.5
    key_mode: Literal["last_token", "tokens", "aligned"] = "last_token"
    iterations: int = 100
    lr: float = 1e-4
    rank: int = 4
    batch_size: int = 1

    def __post_init__(self):
        uce.validate_config(self)
        trainer.validate_training(self)
        uce.single_guides(self)
        uce.positive(self, "erase_scale", "lam", "neighbor_radius")
        uce.positive(self, "regularization_weight", "negative_guidance", strict=False)
        for name in ("neighbors", "beyond_samples", "iterations"):
            if getattr(self, name) < 0:
                raise ConfigError(f"RealEraConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RealEraConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if not -1.0 <= self.neighbor_cos_min <= self.neighbor_cos_max <= 1.0:
            raise ConfigError(f"RealEraConfig: need -1 ≤ neighbor_cos_min ≤ neighbor_cos_max ≤ 1, got "
                              f"{self.neighbor_cos_min} and {self.neighbor_cos_max}")
        least = math.sqrt(max(0.0, 1.0 - self.neighbor_radius ** 2))
        if self.neighbor_cos_max < least:
            raise ConfigError(f"RealEraConfig: no neighbour meets both bounds: within neighbor_radius "
                              f"{self.neighbor_radius} the cosine is at least {least:.4f}, above neighbor_cos_max "
                              f"{self.neighbor_cos_max}")


# ------------------------------------------------------------------------------------------------ mining
def neighbours(vectors: torch.Tensor, count: int, radius: float, cos_min: float, cos_max: float,
               generator: torch.Generator) -> torch.Tensor:
    """``count`` random neighbours of every row of ``vectors`` (n, d) within the bounds (module docstring, step 1):
    (n·count, d), rows ``i·count … i·count + count − 1`` around ``vectors[i]``; drawn on CPU in float64, returned
    in the vectors' dtype and device. A zero row has no direction: its neighbours are zero."""
    n, dim = vectors.shape
    e = vectors.detach().to("cpu", torch.float64).repeat_interleave(count, 0)
    if not len(e):
        return vectors.new_zeros(0, dim)
    norm = e.norm(dim=1, keepdim=True)
    unit = e / norm.clamp_min(torch.finfo(torch.float64).tiny)
    u = torch.randn(e.shape, generator=generator, dtype=torch.float64)
    u = u - (u * unit).sum(1, keepdim=True) * unit  # ⟂ e
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
    lowest = max(cos_min, math.sqrt(max(0.0, 1.0 - radius ** 2)))
    s = lowest + (cos_max - lowest) * torch.rand(len(e), 1, generator=generator, dtype=torch.float64)
    sine = (1 - s * s).clamp_min(0).sqrt()
    half = (radius ** 2 - sine * sine).clamp_min(0).sqrt()
    low = (s - half).clamp_min(0)  # ρ > 0 keeps cos = s
    rho = low + (s + half - low) * torch.rand(len(e), 1, generator=generator, dtype=torch.float64)
    return (norm * rho * (s * unit + sine * u)).to(vectors.device, vectors.dtype)


def concept_token_ids(tokenizer, words) -> torch.Tensor:
    """The ids of every token of ``words`` (special tokens left out)."""
    special = sd.special_ids(tokenizer)
    return torch.tensor(sorted({i for w in words for i in sd.token_ids(tokenizer, w)} - special), dtype=torch.long)


@contextlib.contextmanager
def mined_tokens(pipe, words, config: RealEraConfig, generator: torch.Generator):
    """Within the block, the text encoder(s) see every token of ``words`` at a random neighbour of its embedding
    (step 1), drawn anew at every occurrence of every forward pass: prompts naming ``words`` encode to mined
    neighbour concepts. Forward hooks on the input embeddings, removed on exit."""
    bounds = (config.neighbor_radius, config.neighbor_cos_min, config.neighbor_cos_max)
    handles = []

    def hook_for(ids: torch.Tensor):
        def hook(module, args, output):
            mask = torch.isin(args[0], ids.to(args[0].device))
            if not bool(mask.any()):
                return None
            out = output.clone()
            out[mask] = neighbours(output[mask], 1, *bounds, generator).to(out.dtype)
            return out

        return hook

    try:
        for tokenizer, encoder in sd.encoders(pipe):
            ids = concept_token_ids(tokenizer, words)
            handles.append(encoder.get_input_embeddings().register_forward_hook(hook_for(ids)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class MinedKeys:
    """The closed-form solve's keys after mining (rows: exact keys first, then mined / beyond samples).

    Attributes:
        keys: erase (exact and mined), guide (their anchor keys), preserve (exact and beyond samples).
        erase_weights: (n,) per-key s_e (s_e / K for mined keys).
        preserve_weights: (m,) per-key λ_r (λ_r / B for beyond samples).
    """

    keys: uce.Keys
    erase_weights: torch.Tensor
    preserve_weights: torch.Tensor


def mine(pipe, config: RealEraConfig, generator: torch.Generator) -> MinedKeys:
    """Steps 1–2: UCE's keys (:func:`erasekit.methods.uce.collect_keys`) of the erase prompts with the concepts'
    tokens at K mined neighbours (each mapped to the anchor as the exact prompt is), and of the preserve prompts
    with the preserved concepts' tokens at B neighbours; and their weights."""
    keys = uce.collect_keys(pipe, config)
    alone = dataclasses.replace(config, preserve=(), preserve_related=False)  # the erase prompts only
    erase, guide, preserve = [keys.erase], [keys.guide], [keys.preserve]
    for _ in range(config.neighbors):
        with mined_tokens(pipe, config.concepts, config, generator):
            near = uce.collect_keys(pipe, alone)
        erase.append(near.erase)
        guide.append(near.guide)
    for _ in range(config.beyond_samples if len(keys.preserve) else 0):
        with mined_tokens(pipe, config.preserve, config, generator):
            preserve.append(uce.collect_keys(pipe, config).preserve)
    weight = lambda n, value: torch.full((n,), float(value), dtype=torch.float64)  # noqa: E731
    k, b = max(config.neighbors, 1), max(config.beyond_samples, 1)
    return MinedKeys(uce.Keys(torch.cat(erase), torch.cat(guide), torch.cat(preserve)),
                     torch.cat([weight(len(erase[0]), config.erase_scale)]
                               + [weight(len(e), config.erase_scale / k) for e in erase[1:]]),
                     torch.cat([weight(len(preserve[0]), config.regularization_weight)]
                               + [weight(len(p), config.regularization_weight / b) for p in preserve[1:]]))


def closed_form(pipe, config: RealEraConfig, modules: dict,
                generator: torch.Generator) -> tuple[dict[str, ModuleDelta], MinedKeys, int]:
    """Step 3: the closed-form deltas of ``modules`` (UCE's solve on the mined keys), the keys, the edit's rank."""
    mined = mine(pipe, config, generator)
    edit = uce.solve(mined.keys, mined.erase_weights, mined.preserve_weights, config.lam)
    return uce.module_deltas(modules, edit.P, edit.Q), mined, int(edit.P.shape[1])


# ------------------------------------------------------------------------------------------------ LoRA
def objective(pipe, config: RealEraConfig, edit: lora.Deltas, preserved: torch.Tensor):
    """``loss_for(deltas) -> loss_fn(step, generator)``: step 4's loss, the LoRA ``deltas`` on top of the frozen
    closed-form ``edit`` (both hooks off: the original model); the student sees the erase prompts with the
    concepts' tokens at mined neighbours (:func:`mined_tokens`)."""
    unet = pipe.unet
    pairs = uce.prompt_pairs(config.concepts, config.guides, config.expand_prompts,
                             templated_guides=config.key_mode == "aligned")
    conds, uncond = trainer.encode(pipe, [e for e, _ in pairs] + [g for _, g in pairs], config.resolution)
    scheduler = trainer.ddim_scheduler(pipe, config.num_inference_steps)
    shape = trainer.latent_shape(pipe, config.batch_size, config.resolution)
    kept = torch.cat([preserved.float(), text.encode_prompts(pipe, [""])[0]]).to(unet.device)  # + ""'s tokens
    eta, n = config.negative_guidance, len(pairs)

    def loss_for(deltas: lora.Deltas):
        with torch.no_grad():
            scale = sum(F.linear(kept, m.weight.float()).pow(2).sum(1) for m in deltas.modules.values()).mean()

        def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
            rows = torch.randint(n, (shape[0],), generator=gen).tolist()
            steps = int(torch.randint(config.num_inference_steps, (), generator=gen))
            erased = trainer.Cond.cat([conds[r] for r in rows])
            anchor = trainer.Cond.cat([conds[n + r] for r in rows])
            with edit.disabled(), deltas.disabled(), torch.no_grad():  # the original model
                x, t = trainer.rollout(unet, scheduler, erased, uncond, config.start_guidance, steps, shape, gen)
                e_c, e_a = trainer.predict(unet, torch.cat([x, x]), t,
                                           trainer.Cond.cat([erased, anchor])).float().chunk(2)
            target = e_a - eta * (e_c - e_a)
            with mined_tokens(pipe, config.concepts, config, gen):
                near = trainer.Cond.cat(trainer.encode(pipe, [pairs[r][0] for r in rows], config.resolution)[0])
            student = trainer.predict(unet, x, t, near)
            loss = F.mse_loss(student.float(), target)
            if not config.regularization_weight:
                return loss
            k = kept[torch.randint(len(kept), (min(REG_BATCH, len(kept)),), generator=gen).to(kept.device)]
            moved = sum(deltas.delta_output(name, m, k).float().pow(2).sum(1) for name, m in deltas.modules.items())
            return loss + config.regularization_weight * moved.mean() / scale

        return loss_fn

    return loss_for


def stacked(closed: ModuleDelta, trained: ModuleDelta) -> ModuleDelta:
    """Step 5: ``ΔW_cf + B A`` as one delta: stacked factors, or a dense sum where either part is dense or the
    factors would hold more numbers than the matrix (as :func:`erasekit.methods.uce.module_deltas` decides)."""
    out, dim = closed.weight_shape
    if closed.delta is None and trained.delta is None and (closed.rank + trained.rank) * (out + dim) < out * dim:
        return ModuleDelta(down=torch.cat([closed.down, trained.down]), up=torch.cat([closed.up, trained.up], 1))
    return ModuleDelta(delta=closed.dense() + trained.dense())


def erase(pipe, config: RealEraConfig) -> Adapter:
    """Return the RealEra adapter of ``pipe`` (closed-form k/v deltas plus the trained LoRA, one delta per layer);
    ``pipe`` is left as it was."""
    start = time.perf_counter()
    modules = uce.find_targets(pipe, config.targets)
    config = dataclasses.replace(config, guides=uce.choose_guides(pipe, config))  # guide_choice="nearest": one each
    deltas, mined, rank = closed_form(pipe, config, modules, torch.Generator().manual_seed(config.seed))
    info = {"rank": rank, "erase_keys": int(len(mined.keys.erase)), "preserve_keys": int(len(mined.keys.preserve)),
            "targets": list(config.targets), "closed_form_seconds": round(time.perf_counter() - start, 3)}
    if config.iterations:
        dense = {k: ModuleDelta(delta=d.dense()) for k, d in deltas.items()}
        with lora.applied(pipe.unet, dense, "unet") as edit:  # the closed-form part, frozen, under the LoRA
            loss_for = objective(pipe, config, edit, mined.keys.preserve)
            trained, training = trainer.fit_deltas(pipe, config, list(modules), loss_for, "realera")
        deltas = {k: stacked(d, trained[k]) for k, d in deltas.items()}
        info.update(training)
    info["seconds"] = round(time.perf_counter() - start, 3)
    logger.info("realera: %d concept(s), %d erase / %d preserve keys (mined included), rank %d + LoRA %d (%d steps) in "
                "%.1f s", len(config.concepts), info["erase_keys"], info["preserve_keys"], rank, config.rank,
                config.iterations, info["seconds"])
    return uce.make_adapter("realera", config, pipe, deltas, {}, info)
