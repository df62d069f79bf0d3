"""Erasing Concepts from Diffusion Models (ESD; Gandikota et al., ICCV 2023, https://arxiv.org/abs/2303.07345).

The UNet is fine-tuned so that its conditional score on the erased concept ``c`` equals the frozen model's
*negatively guided* score (the paper's fine-tuning objective, §3):

    ε_θ(x_t, c, t) ← ε_θ₀(x_t, t) − η [ε_θ₀(x_t, c, t) − ε_θ₀(x_t, t)]          (L2 loss)

where ``x_t`` comes from a partial DDIM rollout of the frozen model, conditioned on ``c`` with classifier-free
guidance ``start_guidance``, stopped at a random step (the authors' diffusers code, ``esd_sd.py``). With
``erase_from`` = B, the rollout, the student and the first term use B instead: erase ``c`` only within B.
Optionally (``preserve_weight`` λ > 0, not in the paper) ANT's unconditional-score preservation term
``λ‖ε_θ(x_t, ∅) − ε_θ₀(x_t, ∅)‖²`` (Li et al. 2025) is added, which holds back changes that act on every
prompt. With ``preserve`` prompts P (or ``preserve_related`` on tinyworld: the erased concept's siblings) each
step also adds ``λ‖ε_θ(x_t, p) − ε_θ₀(x_t, p)‖²`` for one p drawn from P, in the concept's templates: a retain
loss like AdvUnlearn's utility term, for modules such as ``to_q``/``to_out`` whose deltas act on every prompt.

The trainable ``ΔW`` are low-rank (``rank``) or full (``rank=0``) deltas on the preset's modules, attached with
hooks (``erasekit.core.lora``): the frozen teacher is the same UNet with the hooks disabled, so one UNet is in
memory. Presets: ``esd-x`` (every Linear of the cross-attention ``attn2``), ``esd-x-strict`` (``attn2.to_k``/
``to_v``), ``esd-u`` (every Linear/Conv2d *not* in ``attn2``), ``esd-all``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..core import lora, sd
from . import trainer
from ..adapter import Adapter
from ..errors import ConfigError
from ..tinyworld import is_tinyworld

logger = logging.getLogger(__name__)

TrainMethod = Literal["esd-x", "esd-x-strict", "esd-u", "esd-all"]

#: Module selection of each preset (the authors' ``esd_sd.py``: Linear in attn2 / attn2 k,v / the rest).
PRESETS: dict[str, Callable[[str, torch.nn.Module], bool]] = {
    "esd-x": lambda name, m: ".attn2." in name and isinstance(m, torch.nn.Linear),
    "esd-x-strict": lambda name, m: name.endswith(("attn2.to_k", "attn2.to_v")),
    "esd-u": lambda name, m: ".attn2." not in name,
    "esd-all": lambda name, m: True,
}

#: The authors' settings for SD 1.x/2.x (new diffusers code, ``esd_sd.py``): full deltas, 200 iterations.
PAPER_SD = dict(iterations=200, lr=5e-5, negative_guidance=2.0, start_guidance=3.0, num_inference_steps=50, rank=0)
#: The original CompVis code (``train-esd.py``): 1000 iterations, lr 1e-5, η = 1.
PAPER_SD_V1 = dict(iterations=1000, lr=1e-5, negative_guidance=1.0, start_guidance=3.0, num_inference_steps=50, rank=0)
#: The authors' SDXL settings (``esd_sdxl.py``; esd-x or esd-x-strict only).
PAPER_SDXL = dict(iterations=200, lr=2e-4, negative_guidance=1.0, start_guidance=2.0, num_inference_steps=50, rank=0)


@dataclass(frozen=True)
class EsdConfig:
    """Args:
        concepts: prompts to erase, e.g. ("circle",); with several, each step trains on one drawn at random.
        train_method: which UNet modules get a delta: esd-x (cross-attention), esd-x-strict (cross-attention
            k/v), esd-u (everything but cross-attention), esd-all.
        erase_from: erase the concepts only within this concept ("" = everywhere).
        templates: prompts the concepts are trained in, "{}" standing for the concept, e.g. ("{}", "a photo of
            {}"); each sample of a step draws one. Empty: the bare concept, as in the paper; on tinyworld,
            tinyworld's caption templates with random other attributes (see ``training_templates``).
        negative_guidance: η, the strength of the negative guidance in the target (paper code: 1; new code: 2).
        preserve_weight: λ of ANT's unconditional-score preservation term ``λ‖ε_θ(x_t, ∅) − ε_θ₀(x_t, ∅)‖²``
            added to the ESD loss (Li et al. 2025; All-but-One's second term); 0 = the paper's ESD.
        preserve: prompts whose predictions the preservation term also holds (needs preserve_weight > 0).
        preserve_related: on tinyworld, also preserve the erased concepts' siblings (the other shapes for a
            shape; needs preserve_weight > 0).
        start_guidance: classifier-free guidance of the frozen model's rollout that produces x_t.
        num_inference_steps: DDIM steps of that rollout; it stops at a uniformly drawn step.
        iterations: optimisation steps.
        lr: Adam learning rate (constant).
        rank: rank of each delta; 0 trains full-rank deltas, as the authors' code does.
        batch_size: x_t samples per step.
        resolution: image side in pixels (0 = the model's own, sample_size × VAE factor).
        seed: seed of the initialisation and of every step's noise.
        mixed_precision: "no", "bf16" or "fp16" (CUDA) autocast for the forward passes.
        gradient_checkpointing: recompute UNet activations in the backward pass to save memory.
        checkpoint_dir: folder for resumable training checkpoints ("" = none).
        checkpoint_every: steps between checkpoints (0 = only at the end).
        resume: continue from the checkpoint in checkpoint_dir, if there is one.
        progress: show a progress bar.
    """

    concepts: tuple[str, ...]
    train_method: TrainMethod = "esd-x"
    erase_from: str = ""
    templates: tuple[str, ...] = ()
    negative_guidance: float = 2.0
    preserve_weight: float = 0.0
    preserve: tuple[str, ...] = ()
    preserve_related: bool = False
    start_guidance: float = 3.0
    num_inference_steps: int = 20
    iterations: int = 150
    lr: float = 1e-3
    rank: int = 4
    batch_size: int = 4
    resolution: int = 0
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_dir: str = ""
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        _validate(self)
        if self.preserve_weight < 0:
            raise ConfigError(f"preserve_weight must be ≥ 0, got {self.preserve_weight}")
        if isinstance(self.preserve, str) or not all(isinstance(p, str) and p.strip() for p in self.preserve):
            raise ConfigError(f"preserve must be a tuple of non-empty prompts, got {self.preserve!r}")
        if (self.preserve or self.preserve_related) and not self.preserve_weight:
            raise ConfigError("preserve / preserve_related need preserve_weight > 0 (the preservation term's weight)")
        if self.train_method not in PRESETS:
            raise ConfigError(f"train_method must be one of {', '.join(PRESETS)}, got {self.train_method!r}")


def _validate(config) -> None:
    """Checks shared by the trained methods' configs (ESD, All-but-One): the rollout's step counts, then
    :func:`validate_training`."""
    for name in ("iterations", "num_inference_steps", "batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be ≥ 1, got {getattr(config, name)}")
    validate_training(config)


def validate_replace_with(config) -> None:
    """The anchor of a config with ``replace_with`` (All-but-One, AdvUnlearn) must not be a concept it erases."""
    if config.replace_with.strip() in {c.strip() for c in config.concepts}:
        raise ConfigError(f"replace_with {config.replace_with!r} is one of the concepts being erased")


def validate_training(config) -> None:
    """Checks shared by every trained method's config (concepts, rank, lr, precision, resume, templates)."""
    if isinstance(config.concepts, str) or not config.concepts or not all(c.strip() for c in config.concepts):
        raise ConfigError("concepts must be a non-empty tuple of non-empty prompts, e.g. ('circle',)")
    for name in ("rank", "resolution", "checkpoint_every"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be ≥ 0, got {getattr(config, name)}")
    if not config.lr > 0:
        raise ConfigError(f"lr must be > 0, got {config.lr}")
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {config.mixed_precision!r}")
    if config.resume and not config.checkpoint_dir:
        raise ConfigError("resume needs checkpoint_dir")
    if isinstance(config.templates, str) or any("{}" not in t for t in config.templates):
        raise ConfigError(f"templates must be a tuple of prompts that each contain '{{}}', got {config.templates!r}")


# ------------------------------------------------------------------------------------------ prompts
def preserved(pipe, config) -> list[str]:
    """``config.preserve`` plus, with ``preserve_related`` on tinyworld, the erased concepts' siblings (no erased
    concept among them)."""
    names = list(config.preserve)
    if config.preserve_related and is_tinyworld(pipe):
        from .. import tinyworld

        names += tinyworld.related_to(config.concepts)
    return [p for p in dict.fromkeys(names) if p not in config.concepts]


TINYWORLD_TEMPLATES = 64  # how many caption templates are drawn on tinyworld


def training_templates(pipe, config) -> list[str]:
    """The prompt templates ("{}" = the concept) a trained method draws its prompts from.

    ``config.templates`` if given; else, on tinyworld and for concepts of one tinyworld attribute, tinyworld's
    caption templates (:func:`erasekit.tinyworld.caption_templates`: the concept in context, never its
    synonyms, so that leaking through them stays measurable); else ["{}"].
    """
    if config.templates:
        return list(config.templates)
    if is_tinyworld(pipe):
        from .. import tinyworld

        try:
            attributes = {tinyworld.concept_attribute(c) for c in config.concepts}
        except KeyError:
            attributes = set()
        if len(attributes) == 1:
            return tinyworld.caption_templates(config.concepts[0], TINYWORLD_TEMPLATES, config.seed)
    return ["{}"]


class PromptTable:
    """Encoded prompts ``template × name`` for a few name lists (erased concepts, their replacements, ...)."""

    def __init__(self, pipe, templates: list[str], names: list[str], resolution: int = 0):
        self.templates, self.names = templates, names
        prompts = [t.replace("{}", name) for name in names for t in templates]
        self.conds, self.uncond = encode(pipe, prompts, resolution)

    def batch(self, name: int, rows: list[int]) -> Cond:
        """Conds of ``names[name]`` in the templates ``rows`` (one per sample)."""
        return Cond.cat([self.conds[name * len(self.templates) + j] for j in rows])


# ------------------------------------------------------------------------------------- conditioning
@dataclass
class Cond:
    """What the UNet is conditioned on besides (x_t, t), for a batch of prompts."""

    hidden: torch.Tensor  # encoder_hidden_states (B, 77, D)
    added: dict | None = None  # SDXL: text_embeds (B, P), time_ids (B, 6)

    def repeat(self, n: int) -> Cond:
        rep = lambda t: t.repeat_interleave(n, 0)  # noqa: E731
        return Cond(rep(self.hidden), None if self.added is None else {k: rep(v) for k, v in self.added.items()})

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        added = None if conds[0].added is None else {k: torch.cat([c.added[k] for c in conds]) for k in conds[0].added}
        return Cond(torch.cat([c.hidden for c in conds]), added)

    def kwargs(self) -> dict:
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": self.added}


def is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def image_size(pipe, resolution: int = 0) -> int:
    return resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


@torch.no_grad()
def encode(pipe, prompts: list[str], resolution: int = 0) -> tuple[list[Cond], Cond]:
    """One ``Cond`` per prompt, and the unconditional ``Cond`` the pipeline itself uses for CFG.

    Uses the pipeline's own ``encode_prompt`` (SDXL: both encoders, pooled embeddings, zeroed negative when the
    pipeline forces zeros for an empty prompt) and, for SDXL, its ``_get_add_time_ids`` with the image size.
    """
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(list(prompts), device, 1, True)
        return [Cond(h[None].to(dtype)) for h in cond], Cond(uncond[:1].to(dtype))
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)
    size = (image_size(pipe, resolution),) * 2
    projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                  else pipe.text_encoder_2.config.projection_dim)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection).to(device)
    conds = [Cond(h[None].to(dtype), {"text_embeds": p[None].to(dtype), "time_ids": time_ids})
             for h, p in zip(cond, pooled)]
    return conds, Cond(uncond[:1].to(dtype), {"text_embeds": uncond_pooled[:1].to(dtype), "time_ids": time_ids})


def predict(unet, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return unet(x, t, **cond.kwargs(), return_dict=False)[0]


def ddim_scheduler(pipe, num_inference_steps: int):
    """A DDIM scheduler from the pipeline's noise schedule (a copy: the pipeline's scheduler is left alone)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=pipe.unet.device)
    return scheduler


@torch.no_grad()
def rollout(unet, scheduler, cond: Cond, uncond: Cond, guidance: float, steps: int, shape: tuple,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t after ``steps`` DDIM steps with CFG from pure noise, and t = the next timestep (ESD's partial rollout).

    ``cond`` holds one row per sample (``shape[0]`` rows); ``uncond`` one row.
    """
    device = scheduler.timesteps.device
    dtype = cond.hidden.dtype
    x = (torch.randn(shape, generator=generator) * scheduler.init_noise_sigma).to(device, dtype)
    both = Cond.cat([uncond.repeat(shape[0]), cond])
    for t in scheduler.timesteps[:steps]:
        e_uncond, e_cond = predict(unet, scheduler.scale_model_input(torch.cat([x, x]), t), t, both).chunk(2)
        x = scheduler.step(e_uncond + guidance * (e_cond - e_uncond), t, x).prev_sample
    return x, scheduler.timesteps[steps]


# ----------------------------------------------------------------------------------------- training
def train(pipe, config, names: list[str], loss_for: Callable, method: str) -> Adapter:
    """Shared body of the trained UNet methods: attach deltas on ``names``, fit ``loss_for``, package an Adapter.

    ``loss_for(deltas)`` returns the ``loss_fn(step, generator)`` handed to ``trainer.fit``.
    """
    unet = pipe.unet
    run = {k: v for k, v in dataclasses.asdict(config).items()
           if k not in ("iterations", "resume", "checkpoint_dir", "checkpoint_every", "progress")}
    was_training, was_checkpointing = unet.training, getattr(unet, "is_gradient_checkpointing", False)
    started = time.perf_counter()
    with lora.frozen(unet), lora.attach(unet, names, config.rank, torch.Generator().manual_seed(config.seed)) as deltas:
        try:
            unet.eval()  # no dropout: student and teacher see the same network
            if config.gradient_checkpointing:
                unet.enable_gradient_checkpointing()
            losses = trainer.fit(deltas.params, loss_for(deltas), steps=config.iterations, lr=config.lr,
                                seed=config.seed, checkpoint_dir=config.checkpoint_dir or None,
                                checkpoint_every=config.checkpoint_every, resume=config.resume, run=run,
                                mixed_precision=config.mixed_precision, progress=config.progress, desc=method,
                                ratios=deltas.ratios)
        finally:
            if config.gradient_checkpointing and not was_checkpointing:
                unet.disable_gradient_checkpointing()
            unet.train(was_training)
        module_deltas = deltas.export("unet")
    return package(pipe, config, module_deltas, method, {
        "iterations": config.iterations, "seconds": round(time.perf_counter() - started, 2),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None})


def package(pipe, config, module_deltas: dict, method: str, training: dict) -> Adapter:
    from .. import adapter as adapter_module

    fingerprint = getattr(adapter_module, "fingerprint", None)
    import diffusers

    return Adapter(
        method=method, concepts=tuple(config.concepts), config=dataclasses.asdict(config), deltas=module_deltas,
        base_model=sd.model_id(pipe),
        fingerprint=fingerprint(pipe, ["unet"]) if fingerprint else {},
        info={"training": training, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )


def latent_shape(pipe, config) -> tuple[int, ...]:
    factor = int(pipe.vae_scale_factor)
    if config.resolution % factor:
        raise ConfigError(f"resolution must be a multiple of the VAE factor {factor}, got {config.resolution}")
    side = image_size(pipe, config.resolution) // factor
    return (config.batch_size, int(pipe.unet.config.in_channels), side, side)


def objective(pipe, config: EsdConfig) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator)``: the ESD loss of one step (module docstring)."""
    unet = pipe.unet
    n_concepts = len(config.concepts)
    sources = [config.erase_from or c for c in config.concepts]  # what x_t is drawn from and the student sees
    kept = preserved(pipe, config)
    table = PromptTable(pipe, training_templates(pipe, config), list(config.concepts) + sources + kept,
                        config.resolution)
    uncond = table.uncond
    scheduler = ddim_scheduler(pipe, config.num_inference_steps)
    shape = latent_shape(pipe, config)
    n, eta = shape[0], config.negative_guidance

    def loss_for(deltas: lora.Deltas):
        def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
            k = int(torch.randint(n_concepts, (), generator=gen))
            rows = torch.randint(len(table.templates), (n,), generator=gen).tolist()
            steps = int(torch.randint(config.num_inference_steps, (), generator=gen))
            erased, source = table.batch(k, rows), table.batch(n_concepts + k, rows)
            with deltas.disabled(), torch.no_grad():  # the frozen teacher: the same UNet without deltas
                x, t = rollout(unet, scheduler, source, uncond, config.start_guidance, steps, shape, gen)
                held = [uncond.repeat(n)]  # what the preservation term holds: ∅, and one preserved prompt
                if kept:  # drawn after the rollout: x_t is the same with or without preserve prompts
                    held.append(table.batch(2 * n_concepts + int(torch.randint(len(kept), (), generator=gen)), rows))
                teacher = Cond.cat([erased, source] + held)
                e_erase, e_from, *e_held = predict(unet, torch.cat([x] * (2 + len(held))), t,
                                                   teacher).float().chunk(2 + len(held))
            target = e_from - eta * (e_erase - e_held[0])
            if not config.preserve_weight:
                return F.mse_loss(predict(unet, x, t, source).float(), target)
            student, *s_held = predict(unet, torch.cat([x] * (1 + len(held))), t,
                                       Cond.cat([source] + held)).float().chunk(1 + len(held))
            return F.mse_loss(student, target) + config.preserve_weight * sum(
                F.mse_loss(s, e) for s, e in zip(s_held, e_held))

        return loss_fn

    return loss_for


def erase(pipe, config: EsdConfig) -> Adapter:
    """Train an ESD adapter for ``config.concepts``; ``pipe`` is left as it was (no hooks, same weights)."""
    if is_sdxl(pipe) and config.train_method in ("esd-u", "esd-all"):
        logger.warning("%s on SDXL is experimental (the authors report artifacts); esd-x is recommended",
                       config.train_method)
    names = lora.select(pipe.unet, PRESETS[config.train_method])
    return train(pipe, config, names, objective(pipe, config), config.train_method)
