"""UnlearnDiffAtk (Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to
Generate Unsafe Images ... For Now", ECCV 2024, https://arxiv.org/abs/2310.11868).

The erased model θ* is used as its own diffusion classifier: the attack looks for a prompt c′ that maximises
p_θ*(c′ | x_tgt), upper-bounded by the denoising loss (paper Eq. 3)

    min_{c′}  E_{t,ε} ‖ε − ε_θ*(√ᾱ_t x_tgt + √(1−ᾱ_t) ε, t | c′)‖²,

where x_tgt is an image of the concept made by the *original* model (adapters disabled) from the same prompt
and seed. c′ = k adversarial tokens prepended to the prompt; each token is a relaxed one-hot over the vocabulary,
kept on the probability simplex by projection after every Adam step; the forward pass samples one token per slot
from that distribution with a straight-through gradient (hardtanh). Timesteps are visited in order,
t ∈ {10, 30, …, 990}, 40 iterations each; after each timestep the tokens are rounded (argmax) to a real prompt,
the erased model generates an image and the judge decides; the attack stops at the first success.

:func:`soft_prompt_attack` is the reusable inner loop, shared with AdvUnlearn's training (its inner attack is
the same loop in word-embedding space with a teacher target, ``fast_at`` = sign-gradient steps).

Stable Diffusion 3 (flow matching, an MMDiT transformer): the same attack with SD3's own denoising loss, the
conditional flow-matching loss ‖(ε − x_tgt) − v_θ*(x_t, t | c′)‖² at x_t = (1 − σ) x_tgt + σ ε (Esser et al. 2024,
Eq. 3; the velocity v = ε − x0 is what the transformer predicts), σ the scheduler's training grid at the scheduled
index (:func:`erasekit.attacks.base.model_timesteps`; random timesteps: logit-normal σ as SD3 trains,
:func:`~erasekit.attacks.base.draw_timesteps`). The one-hot tokens feed both CLIP encoders (one shared
vocabulary); a T5 encoder, when loaded, reads token text and is not optimised through (during the search its rows
are those of the prompt with the starting tokens; the judged generations read the rounded prompt as text). This
adaptation is erasekit's (the paper and its code are SD 1.x only).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..core import sd
from .base import (AttackResult, Best, collapsed_t5_rows, denoising_target, draw_timesteps, evaluate_prompt,
                   judged_generation_options, make_generator, model_timesteps, randint, randn, target_image)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- the inner attack

@dataclass(frozen=True)
class SoftPromptConfig:
    """The soft-prompt attack loop (UnlearnDiffAtk's attacker; AdvUnlearn's inner maximisation).

    Args:
        k: number of adversarial tokens (ignored by ``add``: one per prompt token; ``per_k``: derived).
        insertion: where the tokens go: prefix_k | replace_k | add | suffix_k | mid_k | insert_k | per_k.
        space: "one_hot" (relaxed one-hot over the vocabulary on the simplex, UnlearnDiffAtk) or
            "word_embedding" (free vectors in token-embedding space, AdvUnlearn's ``word_embd``).
        steps: total optimiser steps (with a sequential schedule: n_timesteps × iterations_per_timestep).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        method: "pgd" (Adam on the gradient) or "fast_at" (Adam on the gradient's sign, AdvUnlearn's fast AT).
        timesteps: "sequential" (t = T/2n, 3T/2n, …, iterations_per_timestep steps each) or "random" (uniform).
        n_timesteps: size of the sequential schedule (UnlearnDiffAtk: 50).
        iterations_per_timestep: steps per scheduled timestep (UnlearnDiffAtk: 40).
        ste: one_hot space: sample a one-hot per slot in the forward pass with a straight-through (hardtanh)
            gradient, as UnlearnDiffAtk; False uses the relaxed distribution itself.
        exclude_words: words whose tokens the attack may not use.
    """

    k: int = 3
    insertion: str = "prefix_k"
    space: Literal["one_hot", "word_embedding"] = "one_hot"
    steps: int = 2000
    lr: float = 0.01
    weight_decay: float = 0.1
    method: Literal["pgd", "fast_at"] = "pgd"
    timesteps: Literal["sequential", "random"] = "sequential"
    n_timesteps: int = 50
    iterations_per_timestep: int = 40
    ste: bool = True
    exclude_words: tuple[str, ...] = ()

    def __post_init__(self):
        if self.space not in ("one_hot", "word_embedding"):
            raise ConfigError(f"space must be 'one_hot' or 'word_embedding', got {self.space!r}")
        if self.method not in ("pgd", "fast_at"):
            raise ConfigError(f"method must be 'pgd' or 'fast_at', got {self.method!r}")
        if self.timesteps not in ("sequential", "random"):
            raise ConfigError(f"timesteps must be 'sequential' or 'random', got {self.timesteps!r}")
        if self.insertion not in sd.INSERTIONS:
            raise ConfigError(f"unknown insertion {self.insertion!r}; choose one of {', '.join(sd.INSERTIONS)}")
        if self.space == "one_hot" and self.insertion == "add":
            raise ConfigError("insertion 'add' perturbs the prompt's embeddings: use space='word_embedding'")


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex {x ≥ 0, Σx = 1} (Duchi et al. 2008, Fig. 1).

    The same point UnlearnDiffAtk's bisection reaches (entries are then in [0, 1] automatically), exactly.
    """
    n = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, n + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / idx) > 0).sum(-1, keepdim=True).clamp_min(1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)


class _SampleOneHot(torch.autograd.Function):
    """Forward: one token per row sampled from the row's distribution, as a one-hot. Backward: hardtanh(grad)
    (UnlearnDiffAtk's ``STERandSelect``)."""

    @staticmethod
    def forward(ctx, probs, generator):
        idx = torch.multinomial(probs.detach().float().cpu(), 1, generator=generator).to(probs.device)
        return torch.zeros_like(probs).scatter_(-1, idx, 1.0)

    @staticmethod
    def backward(ctx, grad):
        return F.hardtanh(grad), None


@dataclass
class SoftPrompt:
    """The result of :func:`soft_prompt_attack`.

    Attributes:
        delta: the optimised variable: (k, V′) distributions over ``allowed`` token ids (one_hot) or (k, D)
            word-embedding vectors (word_embedding; for ``add``, perturbations of the prompt's embeddings).
        layout: where the k slots sit in the token sequence.
        space: "one_hot" or "word_embedding".
        allowed: the token ids the one-hot coordinates refer to (one_hot space).
        losses: the loss at every step.
        steps: steps run.
    """

    delta: torch.Tensor
    layout: sd.Layout
    space: str
    allowed: torch.Tensor | None = None
    losses: list[float] = field(default_factory=list)
    steps: int = 0

    def token_ids(self, pipe) -> list[int]:
        """Real tokens for the slots: argmax (one_hot) or nearest token embedding by cosine (word_embedding)."""
        if self.space == "one_hot":
            return self.allowed[self.delta.argmax(-1).cpu()].tolist()
        if self.layout.insertion == "add":
            return [it[2] for it in self.layout.items]
        E = sd.token_embeddings(pipe)[0].float()
        allowed = sd.allowed_token_ids(pipe).to(E.device)
        sims = F.normalize(self.delta.detach().to(E.device), dim=-1) @ F.normalize(E[allowed], dim=-1).T
        return allowed[sims.argmax(-1)].tolist()

    def prompt(self, pipe) -> str:
        """The rounded adversarial prompt as text (what a user would type)."""
        return sd.decode(pipe.tokenizer, self.layout.ids(self.token_ids(pipe)))

    def input_ids(self, pipe) -> list[torch.Tensor]:
        """Per text encoder (1, 77) ids with the rounded tokens in the slots."""
        return sd.ids_per_encoder(pipe, self.layout.ids(self.token_ids(pipe)))

    def slot_embeddings(self, pipe, relaxed: bool = True) -> list[torch.Tensor]:
        """Per text encoder (1, k, D_i) embeddings of the slots (the relaxed mixture, or the rounded tokens)."""
        E = [e.float() for e in sd.token_embeddings(pipe)]
        if self.space == "word_embedding":
            return [self.delta.detach()[None]]
        probs = self.delta.detach()
        if not relaxed:
            probs = torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)
        return [(probs @ e[self.allowed.to(e.device)])[None] for e in E]

    def word_embeddings(self, pipe) -> list[torch.Tensor]:
        """Per text encoder (1, 77, D_i) input word embeddings with the soft slots in place (AdvUnlearn's
        ``input_adv_word_embedding``); pair with :meth:`input_ids`."""
        out = []
        for (_, enc), ids, slots in zip(sd.encoders(pipe), self.input_ids(pipe), self.slot_embeddings(pipe)):
            base = enc.get_input_embeddings()(ids).detach().float()
            out.append(sd.slot_override(self.layout, slots)(base))
        return out

    def cond(self, pipe) -> sd.Cond:
        """Text conditioning with the soft slots, computed through the pipeline's (possibly trainable) encoders."""
        overrides = [sd.slot_override(self.layout, s) for s in self.slot_embeddings(pipe)]
        return sd.encode_ids(pipe, self.input_ids(pipe), overrides)


def timestep_schedule(num_train_timesteps: int, n: int) -> list[int]:
    """UnlearnDiffAtk's sequential schedule: t_i = T/(2n) + i·T/n (T=1000, n=50 → 10, 30, …, 990)."""
    return [num_train_timesteps // n // 2 + i * num_train_timesteps // n for i in range(n)]


@collapsed_t5_rows
def soft_prompt_attack(pipe, prompt: str, target_latents: torch.Tensor | None = None,
                       config: SoftPromptConfig = SoftPromptConfig(), *,
                       target_fn: Callable[[int, torch.Generator], tuple] | None = None,
                       init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       callback: Callable[[int, SoftPrompt], bool] | None = None, callback_every: int | None = None,
                       progress: bool = False) -> SoftPrompt:
    """Optimise adversarial prompt tokens against ``pipe`` (its adapters, if any, stay on: the erased model).

    Args:
        pipe: a diffusers SD / SDXL / SD3 pipeline (word_embedding space: single text encoder only).
        prompt: the prompt the tokens are inserted into.
        target_latents: x0 latents (1, C, h, w) of the target image; the loss is the denoising loss
            ‖ε − ε_θ(x_t, t | c′)‖² at the scheduled t (UnlearnDiffAtk; SD3: the flow-matching loss
            ‖(ε − x0) − v_θ(x_t, t | c′)‖²).
        config: the loop's hyperparameters.
        target_fn: instead of ``target_latents``: ``target_fn(step, generator) -> (x_t, t, eps_target)`` giving the
            noisy latents, timestep(s) and the noise prediction to match (AdvUnlearn: the frozen original model's
            ε at a partially sampled x_t); the loss is ‖eps_target − ε_θ(x_t, t | c′)‖².
        init: warm start δ (a previous :attr:`SoftPrompt.delta` of the same shape).
        generator: CPU generator for every random draw (noise, timesteps, token sampling, initialisation).
        callback: ``callback(step, soft_prompt) -> stop`` called every ``callback_every`` steps.
        callback_every: default: ``iterations_per_timestep`` with the sequential schedule, else never.
        progress: show a tqdm bar.

    Returns:
        a :class:`SoftPrompt` (``delta`` detached).
    """
    if (target_latents is None) == (target_fn is None):
        raise ConfigError("give exactly one of target_latents and target_fn")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    device = sd.device_of(pipe)
    lay = sd.layout(pipe.tokenizer, prompt, config.k, config.insertion)
    k = lay.k
    E = [e.float() for e in sd.token_embeddings(pipe)]
    allowed = None
    if config.space == "one_hot":
        allowed = sd.allowed_token_ids(pipe, config.exclude_words)
        E_allowed = [e[allowed.to(e.device)] for e in E]
        delta = torch.full((k, len(allowed)), 1.0 / len(allowed)) if init is None else init.detach().clone()
    else:
        if len(E) > 1:
            raise ConfigError("space='word_embedding' optimises one text encoder's token embeddings: SD 1.x/2.x only "
                              "(SDXL and SD3 have two text encoders); use space='one_hot' there")
        if init is not None:
            delta = init.detach().clone()
        elif lay.insertion == "add":
            delta = torch.zeros(k, E[0].shape[1])
        else:  # AdvUnlearn's init_adv: embeddings of k random vocabulary tokens
            ids = sd.allowed_token_ids(pipe)
            delta = E[0][ids[randint(len(ids), g, (k,))].to(E[0].device)].detach().cpu().clone()
    delta = delta.float().to(device).requires_grad_(True)
    if tuple(delta.shape[:1]) != (k,):
        raise ConfigError(f"init has {delta.shape[0]} slots, the layout has {k}")
    opt = torch.optim.Adam([delta], lr=config.lr, weight_decay=config.weight_decay)
    soft = SoftPrompt(delta=delta, layout=lay, space=config.space, allowed=allowed)
    base_ids = sd.ids_per_encoder(pipe, lay.ids(soft.token_ids(pipe)))  # slot ids only matter for EOS pooling

    steps = config.steps
    schedule = None
    if target_fn is None:
        x0 = target_latents.to(device).float()
        T = sd.num_train_timesteps(pipe)
        if config.timesteps == "sequential":
            schedule = timestep_schedule(T, config.n_timesteps)
            steps = min(steps, config.n_timesteps * config.iterations_per_timestep)
    if callback_every is None and schedule is not None:
        callback_every = config.iterations_per_timestep

    bar = tqdm(range(steps), desc="soft prompt", disable=not progress, leave=False)
    for step in bar:
        if target_fn is not None:
            x_t, t, eps_target = target_fn(step, g)
        else:
            if schedule is not None:  # SD3: the flow-matching σ grid's timestep at the scheduled index
                t = model_timesteps(pipe, torch.tensor([schedule[min(step // config.iterations_per_timestep,
                                                                     len(schedule) - 1)]]))
            else:  # as the model was trained (SD3: logit-normal σ)
                t = draw_timesteps(pipe, 1, g)
            noise = randn(x0.shape, g, device)
            x_t = sd.add_noise(pipe, x0, noise, t.to(device))
            eps_target = denoising_target(pipe, x0, noise)  # ε, or SD3's velocity ε − x0
        if config.space == "one_hot":
            probs = _SampleOneHot.apply(delta, g) if config.ste else delta
            slots = [(probs @ e)[None] for e in E_allowed]
        else:
            slots = [delta[None]]
        cond = sd.encode_ids(pipe, base_ids, [sd.slot_override(lay, s) for s in slots])
        eps = sd.unet_eps(pipe, x_t, t, cond.expand(x_t.shape[0]) if x_t.shape[0] > 1 else cond)
        loss = F.mse_loss(eps, eps_target.float().to(eps.device))
        (grad,) = torch.autograd.grad(loss, delta)
        delta.grad = grad.sign() if config.method == "fast_at" else grad
        opt.step()
        delta.grad = None
        if config.space == "one_hot":
            with torch.no_grad():
                delta.copy_(project_simplex(delta))
        soft.losses.append(float(loss.detach()))
        soft.steps = step + 1
        bar.set_postfix(loss=f"{soft.losses[-1]:.4f}", refresh=False)
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            if callback(step + 1, SoftPrompt(delta.detach().clone(), lay, config.space, allowed, soft.losses, step + 1)):
                break
    soft.delta = delta.detach()
    return soft


# ----------------------------------------------------------------------------------------------- the audit attack

@dataclass(frozen=True)
@judged_generation_options
class UnlearnDiffAtkConfig:
    """UnlearnDiffAtk with the paper's defaults (Diffusion-MU-Attack configs).

    Args:
        k: prepended adversarial tokens (paper: 5 for nudity, 3 for styles and objects).
        insertion: where they go (paper: prefix_k).
        lr: Adam learning rate (paper 0.01).
        weight_decay: Adam weight decay (paper 0.1).
        n_timesteps: timesteps visited in order, t = 10, 30, …, 990 (paper 50).
        iterations: Adam steps per timestep (paper 40); the prompt is rounded and judged after each timestep.
        ste: straight-through multinomial sampling of the tokens (paper: on).
        exclude_words: words the adversarial tokens may not contain (paper: none).
        stop_on_success: stop at the first judged success (paper: yes).
    """

    k: int = 3
    insertion: str = "prefix_k"
    lr: float = 0.01
    weight_decay: float = 0.1
    n_timesteps: int = 50
    iterations: int = 40
    ste: bool = True
    exclude_words: tuple[str, ...] = ()
    stop_on_success: bool = True

    def soft_prompt_config(self) -> SoftPromptConfig:
        return SoftPromptConfig(k=self.k, insertion=self.insertion, space="one_hot",
                                steps=self.n_timesteps * self.iterations, lr=self.lr, weight_decay=self.weight_decay,
                                timesteps="sequential", n_timesteps=self.n_timesteps,
                                iterations_per_timestep=self.iterations, ste=self.ste,
                                exclude_words=self.exclude_words)


CONFIG = UnlearnDiffAtkConfig
PRESETS = {
    "paper": UnlearnDiffAtkConfig(),
    "nudity": UnlearnDiffAtkConfig(k=5),
    "tinyworld": UnlearnDiffAtkConfig(n_timesteps=10, iterations=10),
}


def attack(pipe, prompt: str, config: UnlearnDiffAtkConfig, judge, generator: torch.Generator | None = None, *,
           seed: int = 0, target=None, state=None, progress: bool = False, cache=None) -> AttackResult:
    """Attack ``prompt`` on the erased ``pipe``; judged generations use ``seed``.

    ``target``: the original model's image for (prompt, seed) if already made (else generated here with the
    adapters disabled).
    """
    started = time.perf_counter()
    g = make_generator(generator, seed, "unlearndiffatk", prompt)
    target = target if target is not None else target_image(pipe, prompt, seed, config)
    x0 = sd.encode_images(pipe, [target])
    best, queries = Best(), 0

    def on_round(step: int, soft: SoftPrompt) -> bool:
        nonlocal queries
        adv = soft.prompt(pipe)
        image, score, hit = evaluate_prompt(pipe, adv, seed, config, judge)
        queries += 1
        best.offer(hit, score, adv_prompt=adv, image=image, step=step, ids=soft.token_ids(pipe))
        logger.debug("unlearndiffatk step %d: %r score %.3f", step, adv, score)
        return hit and config.stop_on_success

    soft = soft_prompt_attack(pipe, prompt, x0, config.soft_prompt_config(), generator=g, callback=on_round,
                              progress=progress)
    v = best.value or {"adv_prompt": prompt, "image": None, "step": 0, "ids": []}
    return AttackResult(
        prompt=prompt, adv_prompt=v["adv_prompt"], success=best.success, score=best.key[1] if best.key else 0.0,
        steps=soft.steps, image=v["image"],
        info={"queries": queries, "found_at_step": v["step"], "adv_token_ids": v["ids"],
              "final_loss": soft.losses[-1] if soft.losses else None, "k": config.k,
              "seconds": round(time.perf_counter() - started, 3)})
