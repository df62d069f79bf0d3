"""Concept Semi-Permeable Membranes (SPM; Lyu et al., "One-dimensional Adapter to Rule Them All: Concepts,
Diffusion Models and Erasing Applications", CVPR 2024, https://arxiv.org/abs/2312.16145).

A **membrane** is a rank-1 delta ``ΔW = U D`` (``U`` = up ``[out, 1]``, ``D`` = down ``[1, in]``) on every
``nn.Linear``/``nn.Conv2d`` inside the UNet's ``Transformer2DModel`` blocks (proj_in, attn1/attn2 q/k/v/out,
ff.net.0.proj, ff.net.2, proj_out: 192 modules, 423,936 parameters = 1.7 MB fp32 on SD 1.x). It is trained with
(the authors' ``train_spm.py``, ``src/configs/prompt.py``)::

    x_t     : DDIM rollout (num_inference_steps, CFG start_guidance) of the model *with* the membrane on the
              target prompt, stopped at k ~ U[1, num_inference_steps)
    L_erase = ‖ε_SPM(x_t, c_tgt) − [ε₀(x_t, c_neu) − η (ε₀(x_t, c_tgt) − ε₀(x_t, c_neu))]‖²
    L_LA    = ‖ε_SPM(x_t, a) − ε₀(x_t, a)‖²                                  (Latent Anchoring, Eq. 5)
    L       = L_erase + la_strength · L_LA

``c_neu`` is the neutral prompt: the target's template with ``neutral`` ("" by default) in the concept's slot,
which is the paper's unconditional ``c_neu`` for the bare concept; with templates (tinyworld's captions) only the
concept's own contribution is reversed, not the colour or background around it. η = ``negative_guidance``. The anchors ``a`` are drawn as the
paper's sampler does (``src/engine/sampling.py``): Gaussian noise of the target embedding's shape, accepted with
probability ``1 − cos(target, noise)``, rescaled to ``U[0.8, 1.2]·‖target‖``. The reference pairs every anchor
with the unconditional embedding in one batch whose first half its ``predict_noise`` discards, so half of the rows
it anchors are the unconditional embedding; here ``L_LA`` is the mean of the anchors' and the unconditional
embedding's terms, the same weighting, stated explicitly.

At generation, **Facilitated Transport** scales each membrane by a gate (the reference's ``infer_spm.py``)::

    γ_i(p) = facilitate_factor · max_{q ∈ P_i} max(clipcos(p, q), tokenuni(p, q))

computed once per prompt from the pipeline's own prompt encoding, ``P_i`` being the membrane's erased prompts.
On tinyworld the gate is ``tokencos`` instead (a soft ``tokenuni`` on the encoder's token embeddings, see
:mod:`erasekit.compose`): there the flattened clipcos is ≈ 0.84 for every prompt pair, so the reference's gate would
leave every membrane on for every prompt (measured: the red membrane costs the other colours 17 points with it,
0 with ``tokencos``, red erased in both).
The adapter carries its gating record (``{"rule": "prompt_similarity", "prompts": P_i, ...}``) and the erased
prompts' embeddings and token ids (``gate.embeds``, ``gate.token_ids``), so a membrane file alone is enough;
:mod:`erasekit.compose` applies the gates per sample. Several membranes compose as ``Σ_i γ_i U_i D_i`` (the
paper's intent, ``gate_combine="sum"``); ``gate_combine="factors"`` reproduces the reference code, which scales
and sums the *factors* (``(Σ_i γ_i U_i)(Σ_j γ_j D_j)``: ``γ²`` for one membrane, cross terms for several).

Training machinery (hooks on one UNet serving as student and, disabled, as frozen teacher; the shared loop
``erasekit.trainer.fit``) is ESD's. Deviations from the reference: Adam with a constant learning rate instead of
AdamW8bit with cosine restarts and 500 warm-up steps; a fixed resolution (no ``dynamic_resolution``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..core import lora, sd
from ..core.processes import WHOLE, Part
from ..adapter import Adapter
from ..errors import ConfigError
from . import uce
from .trainer import (Cond, PromptTable, ddim_scheduler, encode, latent_shape, predict, rollout, train,
                      training_options, training_templates, validate_rollout_training)

logger = logging.getLogger(__name__)

GateMetric = Literal["clipcos_tokenuni", "clipcos", "tokenuni", "tokencos"]
GateCombine = Literal["sum", "factors"]

#: The authors' settings for SD 1.x (``configs/*/config.yaml``, ``prompt.yaml``): 3000 iterations, lr 1e-4,
#: batch 1, η 1, la_strength 1000, 4 anchors, 30-step rollouts.
PAPER_SD = dict(iterations=3000, lr=1e-4, batch_size=1, la_strength=1000.0, num_inference_steps=30,
                gate_metric="clipcos_tokenuni")
#: tinyworld-sized settings (an 8×8-latent UNet, 10-step generation): a few minutes on a 2-core CPU.
#: la_strength 1000 there keeps the membrane from erasing at all (its 64-wide text space makes random anchors
#: overlap real prompts far more than in CLIP's 768); 100 erases and preserves (benchmarks/spm_tinyworld.py).
#: Its gate is ``tokencos``: the reference's flattened clipcos does not separate prompts in that encoder (0.83 on the
#: erased concept's prompts, 0.84 on every other), so with it each membrane acts at γ ≈ 0.84 on every prompt.
TINYWORLD = dict(iterations=200, lr=5e-3, batch_size=2, la_strength=100.0, num_inference_steps=10,
                 gate_metric="tokencos")
_AUTO = tuple(PAPER_SD)  # the fields left to the model: None = PAPER_SD, or TINYWORLD on tinyworld (presets.resolve)


@dataclass(frozen=True)
@training_options
class SpmConfig:
    """Args:
        concepts: prompts to erase, e.g. ("circle",); with several, each step trains on one drawn at random.
            They are also the membrane's gate prompts (Facilitated Transport).
        templates: prompts the concepts are trained in, "{}" standing for the concept; empty: the bare concept,
            as in the paper, or tinyworld's caption templates on tinyworld (as ESD's ``training_templates``).
        neutral: c_neu, what takes the concept's place in the prompt the erased concept is steered toward: the
            neutral prompt is the same template with ``neutral`` in the concept's slot ("" in "{}" = the
            unconditional prompt, the paper's c_neu; on tinyworld, the caption without the concept's word). Several
            prompts separated by "|" ("square | triangle"): c_neu is the mean of their encodings, each templated.
        neutral_related: on a model with a concept vocabulary (tinyworld), the neutral is the erased concept's
            related concepts that are not erased ("square | triangle | ..." for circle): for a model whose prompt
            without the concept still draws it (tinyworld-mmdit draws a circle for 42 % of its shapeless prompts).
        negative_guidance: η in the erase target (the reference's ``guidance_scale``, 1).
        la_strength: weight of the Latent Anchoring loss (None: 1000, the paper's; 100 on tinyworld).
        num_anchors: anchors drawn per sample and step (the reference's ``sampling_batch_size``, 4).
        start_guidance: classifier-free guidance of the rollout that produces x_t (3, the reference's).
        num_inference_steps: DDIM steps of that rollout; it stops at a uniformly drawn step (None: 30, the
            paper's; 10 on tinyworld).
        iterations: optimisation steps (None: 3000, the paper's; 200 on tinyworld).
        lr: Adam learning rate, constant (None: 1e-4, the paper's; 5e-3 on tinyworld).
        rank: rank of each delta (1: a one-dimensional membrane).
        batch_size: x_t samples per step (None: 1, the paper's; 2 on tinyworld).
        resolution: image side in pixels (0 = the model's own, sample_size × VAE factor).
        gate_metric: Facilitated Transport similarity: "clipcos_tokenuni" (the reference's, the larger of the
            two), "clipcos", "tokenuni" or "tokencos" (soft tokenuni on the encoder's token embeddings, see
            :mod:`erasekit.compose`); None: the reference's, or "tokencos" on tinyworld.
        facilitate_factor: multiplies the gate γ (the reference's evaluation scripts: 1).
        gate_combine: how several gated membranes on one module combine: "sum" = Σ γ_i U_i D_i (the paper's
            intent), "factors" = (Σ γ_i U_i)(Σ γ_j D_j) (the reference code's weight merge).
        gradient_checkpointing: recompute UNet activations in the backward pass to save memory.
        seed: seed of the initialisation and of every step's noise and anchors.
    """

    concepts: tuple[str, ...]
    templates: tuple[str, ...] = ()
    neutral: str = ""
    neutral_related: bool = False
    negative_guidance: float = 1.0
    la_strength: float | None = None
    num_anchors: int = 4
    start_guidance: float = 3.0
    num_inference_steps: int | None = None
    iterations: int | None = None
    lr: float | None = None
    rank: int = 1
    batch_size: int | None = None
    resolution: int = 0
    gate_metric: GateMetric | None = None
    facilitate_factor: float = 1.0
    gate_combine: GateCombine = "sum"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        validate_rollout_training(self.with_paper_defaults())
        if self.rank < 1:
            raise ConfigError(f"rank must be ≥ 1 (a membrane is low rank), got {self.rank}")
        if self.num_anchors < 0:
            raise ConfigError(f"num_anchors must be ≥ 0, got {self.num_anchors}")
        if self.la_strength is not None and self.la_strength < 0:
            raise ConfigError(f"la_strength must be ≥ 0, got {self.la_strength}")
        if self.gate_metric not in (None, "clipcos_tokenuni", "clipcos", "tokenuni", "tokencos"):
            raise ConfigError("gate_metric must be clipcos_tokenuni, clipcos, tokenuni or tokencos, "
                              f"got {self.gate_metric!r}")
        if self.gate_combine not in ("sum", "factors"):
            raise ConfigError(f"gate_combine must be 'sum' or 'factors', got {self.gate_combine!r}")
        if not self.facilitate_factor > 0:
            raise ConfigError(f"facilitate_factor must be > 0, got {self.facilitate_factor}")

    def resolved(self, pipe) -> SpmConfig:
        """This config with every ``None`` replaced: the paper's value, or the tinyworld-sized one on tinyworld
        (:func:`erasekit.methods.presets.for_model`, as :func:`erasekit.methods.presets.resolve` does)."""
        from .presets import for_model, on_tinyworld

        return for_model(self, on_tinyworld(pipe))

    def with_paper_defaults(self) -> SpmConfig:
        """This config with every ``None`` replaced by the paper's value (``PAPER_SD``)."""
        missing = {k: PAPER_SD[k] for k in _AUTO if getattr(self, k) is None}
        return dataclasses.replace(self, **missing) if missing else self


# -------------------------------------------------------------------------------------------- modules
def transformer_modules(unet) -> list[str]:
    """Paths of every ``nn.Linear``/``nn.Conv2d`` inside the UNet's ``Transformer2DModel`` blocks (an MMDiT
    transformer's: inside its joint blocks ``transformer_blocks``)."""
    from diffusers import Transformer2DModel

    from ..core.mmdit import is_mmdit

    if is_mmdit(unet):
        return lora.select(unet, lambda name, m: name.startswith("transformer_blocks."))
    blocks = [name for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    if not blocks:
        raise ConfigError(f"{type(unet).__name__} has no Transformer2DModel blocks for a membrane")
    return lora.select(unet, lambda name, m: any(name.startswith(b + ".") for b in blocks))


# -------------------------------------------------------------------------------------------- anchors
def sample_anchors(target: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` Latent Anchoring embeddings for ``target`` (one prompt's embedding, any shape) → ``(n, *shape)``.

    The paper's sampler: unit Gaussian noise accepted with probability ``1 − cos(target, noise)`` (a rejection
    step that avoids the target's direction), then rescaled to ``U[0.8, 1.2] · ‖target‖``.
    """
    flat = target.detach().float().flatten().cpu()
    norm = flat.norm()
    out = []
    while len(out) < n:
        noise = torch.randn(flat.shape, generator=generator)
        noise = noise / noise.norm()
        cos = torch.dot(noise, flat) / norm
        if torch.rand((), generator=generator) < 1 - cos:
            scale = 0.8 + 0.4 * torch.rand((), generator=generator)
            out.append(scale * norm * noise)
    return torch.stack(out).reshape(n, *target.shape).to(target.device, target.dtype)


def _anchor_conds(target: Cond, n: int, generator: torch.Generator) -> Cond:
    """``n`` anchors for one prompt's ``Cond`` (SDXL, SD3: the pooled embedding is sampled the same way; SD3 without
    T5: the zero row that stands for its rows stays zero)."""
    if target.padding:
        hidden = sample_anchors(target.hidden[0, :-1], n, generator)
        hidden = torch.cat([hidden, target.hidden[:1, -1:].expand(n, -1, -1)], 1)
    else:
        hidden = sample_anchors(target.hidden[0], n, generator)
    if target.added is None:
        return Cond(hidden)
    if "pooled_projections" in target.added:
        return Cond(hidden, {"pooled_projections": sample_anchors(target.added["pooled_projections"][0], n, generator)},
                    target.padding)
    added = {"text_embeds": sample_anchors(target.added["text_embeds"][0], n, generator),
             "time_ids": target.added["time_ids"][:1].repeat(n, 1)}
    return Cond(hidden, added)


# ------------------------------------------------------------------------------------------ objective
def objective(pipe, config: SpmConfig) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator)``: ``L_erase + la_strength · L_LA`` (module docstring).

    ``config`` must be resolved (:func:`erasekit.methods.presets.resolve`, or ``config.resolved(pipe)``).
    """
    unet = sd.denoiser(pipe)
    n_concepts = len(config.concepts)
    # the neutral prompt takes the concept's slot in the same template ("{}" alone: the paper's c_neu); several
    # neutral prompts ("square | triangle"): the mean of their encodings
    neutrals = uce.alternatives(config.neutral)
    table = PromptTable(pipe, training_templates(config), [*config.concepts, *neutrals], config.resolution)
    uncond = table.uncond
    scheduler = ddim_scheduler(pipe, config.num_inference_steps)
    shape = latent_shape(pipe, config.batch_size, config.resolution)
    n, eta, m = shape[0], config.negative_guidance, config.num_anchors

    def loss_for(deltas: lora.Deltas):
        def loss_fn(step: int, gen: torch.Generator, part: Part = WHOLE) -> torch.Tensor:
            k = int(torch.randint(n_concepts, (), generator=gen))
            rows = torch.randint(len(table.templates), (n,), generator=gen).tolist()
            steps = int(torch.randint(1, max(2, config.num_inference_steps), (), generator=gen))
            mine = part.rows(n)  # this process's samples of the batch (all of them on one process)
            everyone = table.batch(k, rows)  # the anchors of every sample are drawn, in order, on every process
            neutral = Cond.mean([table.batch(n_concepts + j, rows[mine]) for j in range(len(neutrals))])
            target, r = everyone[mine], mine.stop - mine.start
            # 1. x_t: a rollout of the model *with* the membrane (the reference's `with network:`)
            with torch.no_grad():
                x, t = rollout(unet, scheduler, target, uncond, config.start_guidance, steps, shape, gen, mine)
            anchors = None
            if m:  # m anchors per sample, sample after sample: this process keeps those of its samples
                anchors = Cond.cat([_anchor_conds(everyone[i:i + 1], m, gen) for i in range(n)])
                anchors = anchors[mine.start * m:mine.stop * m]
            # 2. the frozen model: erase target, and the anchors' original predictions
            with deltas.disabled(), torch.no_grad():
                e_pos0, e_neu0 = predict(unet, torch.cat([x, x]), t, Cond.cat([target, neutral])).float().chunk(2)
                if anchors is not None:
                    x_a = torch.cat([x.repeat_interleave(m, 0), x])
                    a0 = predict(unet, x_a, t, Cond.cat([anchors, uncond.repeat(r)])).float()
            goal = e_neu0 - eta * (e_pos0 - e_neu0)
            loss = F.mse_loss(predict(unet, x, t, target).float(), goal)
            if anchors is not None and config.la_strength:
                a = predict(unet, x_a, t, Cond.cat([anchors, uncond.repeat(r)])).float()
                la = 0.5 * (F.mse_loss(a[:r * m], a0[:r * m]) + F.mse_loss(a[r * m:], a0[r * m:]))
                loss = loss + config.la_strength * la
            return part.mean(loss, n)

        return loss_fn

    return loss_for


# -------------------------------------------------------------------------------------------- gating
def gating_record(config: SpmConfig) -> dict:
    """The adapter's Facilitated Transport record, as :mod:`erasekit.compose` reads it (an unresolved
    ``gate_metric=None`` records the reference's metric)."""
    metric = config.gate_metric or PAPER_SD["gate_metric"]
    return {"rule": "prompt_similarity", "prompts": list(config.concepts), "metric": metric,
            "facilitate_factor": float(config.facilitate_factor), "combine": config.gate_combine}


@torch.no_grad()
def gate_tensors(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``gate.embeds`` ``(Q, L, D)``: the pipeline's encoding of the gate prompts; ``gate.token_ids`` ``(Q, L)``:
    their token ids without special tokens, padded with -1."""
    if sd.is_mmdit(pipe):  # the context the transformer is called with, T5 rows included
        embeds = sd.encode(pipe, prompts).embeds.float().cpu()
    else:
        conds, _ = encode(pipe, prompts)
        embeds = torch.cat([c.hidden for c in conds]).float().cpu()
    tokenizer = pipe.tokenizer
    special = set(tokenizer.all_special_ids)
    ids = [[i for i in row if i not in special]
           for row in tokenizer(prompts, truncation=True, max_length=tokenizer.model_max_length).input_ids]
    token_ids = torch.full((len(prompts), max(1, max(map(len, ids)))), -1, dtype=torch.int64)
    for q, row in enumerate(ids):
        token_ids[q, :len(row)] = torch.tensor(row, dtype=torch.int64)
    return {"gate.embeds": embeds, "gate.token_ids": token_ids}


def with_gate(adapter: Adapter, *, static: bool = False, metric: GateMetric | None = None,
              facilitate_factor: float | None = None, combine: GateCombine | None = None) -> Adapter:
    """A copy of a membrane with another gating: ``static=True`` turns Facilitated Transport off (γ = 1);
    the other arguments change the record's fields."""
    if static:
        return dataclasses.replace(adapter, gating={"rule": "static"})
    gating = dict(adapter.gating)
    if gating.get("rule") != "prompt_similarity":
        raise ConfigError(f"adapter {adapter.method!r} has no prompt-similarity gate to change")
    for key, value in (("metric", metric), ("facilitate_factor", facilitate_factor), ("combine", combine)):
        if value is not None:
            gating[key] = float(value) if key == "facilitate_factor" else value
    return dataclasses.replace(adapter, gating=gating)


# ------------------------------------------------------------------------------------------------ erase
def erase(pipe, config: SpmConfig) -> Adapter:
    """Train a membrane for ``config.concepts``; ``pipe`` is left as it was (no hooks, same weights).

    The adapter holds rank-``config.rank`` deltas on every Linear/Conv2d of the transformer blocks, its gating
    record and the gate prompts' embeddings and token ids. Fields left ``None`` take the paper's values (the
    tinyworld-sized ones come from :func:`erasekit.methods.presets.resolve`, which the API, CLI and registry use).
    """
    config = config.with_paper_defaults()
    names = transformer_modules(sd.denoiser(pipe))
    adapter = train(pipe, config, names, objective(pipe, config), "spm")
    return dataclasses.replace(adapter, gating=gating_record(config),
                               stats={**adapter.stats, **gate_tensors(pipe, list(config.concepts))})


__all__ = ["PAPER_SD", "TINYWORLD", "SpmConfig", "erase", "gate_tensors", "gating_record", "objective",
           "sample_anchors", "transformer_modules", "with_gate"]
