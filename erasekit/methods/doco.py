"""DoCo: concept domain correction with a concept-preserving gradient (Wu, Xu, Wang, Zhang, Wang, Wang, Zhu,
AAAI 2025, "Unlearning Concepts in Diffusion Model via Concept Domain Correction and Concept Preserving Gradient",
https://arxiv.org/abs/2405.15304). erasekit's reconstruction from the paper and a public re-implementation of the
authors' training loop.

**Domain correction (adversarial).** The output domain of the erased concept ``c`` is aligned with that of an anchor
``a`` by adversarial training. On a noisy latent ``x_t`` (a partial DDIM rollout of the frozen model on ``c``, as ESD
draws it; the authors noise generated images), both are read as the clean-latent prediction of the noise prediction
(``x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t``): the fine-tuned model's on the concept, ``x̂₀(ε_θ(x_t, c))``, and the frozen
model's on the anchor, ``x̂₀(ε₀(x_t, a))``. A PatchGAN discriminator ``D`` learns to tell them apart (the anchor's
"real", label 0; the concept's "fake", label 1; its own Adam), and the generator (the deltas) learns to fool it:

    L_D   = BCE(D(x̂₀(ε₀(x_t, a))), 0) + BCE(D(x̂₀(ε_θ(x_t, c))), 1)
    L_adv = BCE(D(x̂₀(ε_θ(x_t, c))), 0)                                      (after ``discriminator_warmup`` steps)

optionally with Concept Ablation's model-based alignment ``μ ‖ε_θ(x_t, c) − ε₀(x_t, a)‖²`` (``align_weight`` μ, which
DoCo builds on; 0 = the adversarial loss alone, as the authors').

**Concept-preserving gradient.** The retaining loss ``L_p = λ ‖ε_θ(x_t, p) − ε₀(x_t, p)‖²`` on prompts ``p`` that must
stay (``preserve``; on tinyworld with ``preserve_related``, the concept's siblings) guards the other concepts; where
the unlearning gradient ``g_u = ∇(L_adv + μ L_align)`` conflicts with ``g_p = ∇L_p`` (``g_u · g_p < 0``) its component
along ``g_p`` is removed before the two are added (the paper's §3.3; :func:`erasekit.methods.trainer.deconflict`,
the shared trainer's ``gradient_surgery``, on by default here).

The deltas are full (``rank=0``) or low-rank on an ESD module preset (the authors train cross-attention k/v,
``esd-x-strict``). The discriminator's weights and its Adam moments are part of the run's checkpoint (resumed runs
follow the same trajectory) and not of the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Adapter
from ..core import lora
from ..errors import ConfigError
from .esd import PRESETS, TrainMethod, preserved
from .trainer import (Cond, PromptTable, check_prompts, ddim_scheduler, fit_deltas, latent_shape, package, predict,
                      rollout, rollout_options, training_options, training_templates, validate_rollout_training)


@dataclass(frozen=True)
@training_options
@rollout_options
class DocoConfig:
    """Args:
        concepts: prompts to erase, e.g. ("circle",); with several, each step trains on one drawn at random.
        anchor: the concept whose output domain the erased concepts are corrected to (e.g. "square" for "circle",
            "a person, dressed" for nudity); "" = the empty prompt. On tinyworld, empty: the first sibling not erased.
        train_method: which UNet modules get a delta (ESD's presets; the authors train cross-attention k/v,
            esd-x-strict).
        templates: prompts the concepts (and the anchor, in the same template) are trained in; empty: the bare
            concept, or tinyworld's caption templates on tinyworld.
        preserve_weight: λ, weight of the retaining loss on ``preserve`` prompts.
        preserve: prompts whose predictions the retaining loss holds; none: the anchor's (the authors' prior
            preservation keeps the anchor class), or with no anchor the unconditional prediction.
        preserve_related: on tinyworld, also preserve the erased concepts' siblings.
        align_weight: μ, weight of Concept Ablation's alignment ``‖ε_θ(x_t, c) − ε₀(x_t, a)‖²`` (0 = adversarial only).
        discriminator_lr: Adam learning rate of the discriminator (the authors' betas 0.5, 0.999).
        discriminator_warmup: steps in which only the discriminator learns, before the adversarial loss starts.
        discriminator_width: channels of the discriminator's first convolution.
        gradient_surgery: the concept-preserving gradient (DoCo's; needs preserve prompts).
    """

    concepts: tuple[str, ...]
    anchor: str = ""
    train_method: TrainMethod = "esd-x-strict"
    templates: tuple[str, ...] = ()
    preserve_weight: float = 1.0
    preserve: tuple[str, ...] = ()
    preserve_related: bool = False
    align_weight: float = 0.0
    discriminator_lr: float = 1e-4
    discriminator_warmup: int = 10
    discriminator_width: int = 64
    gradient_surgery: bool = True
    rank: int = 0
    lr: float = 1e-5
    iterations: int = 200

    def __post_init__(self):
        validate_rollout_training(self)
        if self.train_method not in PRESETS:
            raise ConfigError(f"train_method must be one of {', '.join(PRESETS)}, got {self.train_method!r}")
        if self.anchor.strip() and self.anchor.strip() in {c.strip() for c in self.concepts}:
            raise ConfigError(f"anchor {self.anchor!r} is one of the concepts being erased")
        for name in ("preserve_weight", "align_weight", "discriminator_warmup"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not self.discriminator_lr > 0 or self.discriminator_width < 1:
            raise ConfigError(f"discriminator_lr must be > 0 and discriminator_width ≥ 1, got "
                              f"{self.discriminator_lr} and {self.discriminator_width}")
        check_prompts(self, "preserve")
        if self.gradient_surgery and not self.preserve_weight:
            raise ConfigError("DoCo's concept-preserving gradient needs a retaining loss: preserve_weight > 0 (or set "
                              "gradient_surgery to False)")


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator on latents (Isola et al. 2017, as the authors'): strided 4×4 convolutions with
    LeakyReLU, one logit per patch."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(1, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Discriminator:
    """The discriminator's tensors, its Adam moments and step count as plain tensors (no gradient: the shared
    trainer checkpoints them with the deltas and its own optimizer leaves them alone), and its update."""

    BETAS = (0.5, 0.999)

    def __init__(self, channels: int, width: int, lr: float, seed: int, device, dtype=torch.float32):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = PatchDiscriminator(channels, width)
        self.module.to(device=device, dtype=dtype).requires_grad_(False)
        self.lr = lr
        self.weights = dict(self.module.named_parameters())
        self.moments = {f"{k}.{m}": torch.zeros_like(v) for k, v in self.weights.items() for m in ("m", "v")}
        self.count = torch.zeros((), device=device)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint with the run, by name."""
        return {**{f"discriminator.{k}": v for k, v in self.weights.items()},
                **{f"discriminator.adam.{k}": v for k, v in self.moments.items()}, "discriminator.step": self.count}

    def logits(self, x: torch.Tensor, trainable: bool = False) -> torch.Tensor:
        params = {k: v.detach().requires_grad_() for k, v in self.weights.items()} if trainable else None
        out = torch.func.functional_call(self.module, params or self.weights, (x,))
        return (out, params) if trainable else out

    @torch.no_grad()
    def _adam(self, grads: dict[str, torch.Tensor]) -> None:
        self.count += 1
        b1, b2 = self.BETAS
        step = float(self.count)
        for k, g in grads.items():
            m, v = self.moments[f"{k}.m"], self.moments[f"{k}.v"]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2 ** step)).sqrt_().add_(1e-8)
            self.weights[k].addcdiv_(m, denom, value=-self.lr / (1 - b1 ** step))

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """One step on ``L_D`` (real → 0, fake → 1, the authors' labels); returns L_D."""
        with torch.enable_grad():
            out_real, params = self.logits(real.detach(), trainable=True)
            out_fake = torch.func.functional_call(self.module, params, (fake.detach(),))
            loss = (F.binary_cross_entropy_with_logits(out_real, torch.zeros_like(out_real))
                    + F.binary_cross_entropy_with_logits(out_fake, torch.ones_like(out_fake)))
            grads = torch.autograd.grad(loss, list(params.values()))
        self._adam(dict(zip(params, grads)))
        return float(loss.detach())


def clean_latent(scheduler, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t``, the clean latent a noise prediction implies (DDPM, Ho et al. 2020, Eq. 15)."""
    alpha = scheduler.alphas_cumprod.to(x.device)[t].float()
    return (x.float() - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)


def objective(pipe, config: DocoConfig, discriminator: Discriminator) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator, part) -> (unlearning loss, retaining loss)`` (module docstring);
    each call also takes the discriminator's step."""
    unet = pipe.unet
    n_concepts = len(config.concepts)
    kept = preserved(config)
    anchor = config.anchor.strip()  # "" = the empty prompt
    table = PromptTable(pipe, training_templates(config), list(config.concepts) + ([anchor] if anchor else []) + kept,
                        config.resolution)
    uncond = table.uncond
    scheduler = ddim_scheduler(pipe, config.num_inference_steps)
    shape = latent_shape(pipe, config.batch_size, config.resolution)
    n, first_kept = shape[0], n_concepts + (1 if anchor else 0)

    def loss_for(deltas: lora.Deltas):
        def loss_fn(step: int, gen: torch.Generator):  # whole on every process: one discriminator, updated alike
            k = int(torch.randint(n_concepts, (), generator=gen))
            rows = torch.randint(len(table.templates), (n,), generator=gen).tolist()
            steps = int(torch.randint(config.num_inference_steps, (), generator=gen))
            held = int(torch.randint(len(kept), (), generator=gen)) if kept else None
            concept = table.batch(k, rows)
            conds = [table.batch(n_concepts, rows) if anchor else uncond.repeat(n)]
            conds += [table.batch(first_kept + held, rows) if kept else conds[0]]  # what the retaining loss holds
            with deltas.disabled(), torch.no_grad():
                x, t = rollout(unet, scheduler, concept, uncond, config.start_guidance, steps, shape, gen)
                e_anchor, *e_kept = predict(unet, torch.cat([x] * len(conds)), t, Cond.cat(conds)).float().chunk(
                    len(conds))
            student = predict(unet, torch.cat([x] * len(conds)), t,
                              Cond.cat([concept] + conds[1:])).float().chunk(len(conds))
            fake = clean_latent(scheduler, x, t, student[0])
            discriminator.update(clean_latent(scheduler, x, t, e_anchor), fake)
            unlearn = student[0].sum() * 0.0
            if step >= config.discriminator_warmup:
                out = discriminator.logits(fake)
                unlearn = unlearn + F.binary_cross_entropy_with_logits(out, torch.zeros_like(out))
            if config.align_weight:
                unlearn = unlearn + config.align_weight * F.mse_loss(student[0], e_anchor)
            return unlearn, config.preserve_weight * F.mse_loss(student[1], e_kept[0])

        return loss_fn

    return loss_for


def erase(pipe, config: DocoConfig) -> Adapter:
    """Train a DoCo adapter for ``config.concepts``; ``pipe`` is left as it was (no hooks, same weights)."""
    names = lora.select(pipe.unet, PRESETS[config.train_method])
    discriminator = Discriminator(int(pipe.unet.config.in_channels), config.discriminator_width,
                                  config.discriminator_lr, config.seed, pipe.unet.device)
    deltas, info = fit_deltas(pipe, config, names, objective(pipe, config, discriminator), "doco",
                              extra_params=discriminator.state())
    return package(pipe, config, "doco", deltas, ["unet"], info)
