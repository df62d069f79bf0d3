"""SAGE (Liu, Kortylewski, Bai, Bai & Yuille, "Discovering Failure Modes of Text-guided Diffusion Models via
Adversarial Search", ICLR 2024; arXiv 2306.00974, first titled "Intriguing Properties of Text-guided Diffusion
Models").

SAGE searches the inputs of the *whole* generator G(z, p) — the initial latent z and the prompt p — with an image
classifier D as the surrogate loss, back-propagating through the sampler (the paper's adversarial objective; its
equation and section numbers are not cited here because no copy of the paper's text could be checked — the
formulas are written from its description):

    max_{z, p}  L(D(G(z, p)), y),

where the paper looks for *failures* (the image stops showing the prompt's object y). An erasure audit wants the
opposite failure of the erased model — the erased concept c back — so here the search minimises the surrogate

    L_D(z, p) = − log p_D(c | x̂),   x̂ = VAE⁻¹(ẑ_0(z, p)),                                   (judge surrogate)

the judge's log-probability of the concept on the decoded image (SAGE's classifier loss with the target class).
The two search spaces, as in the paper:

* **latent space**: z_T is optimised by gradient steps through the denoising chain. Gradients that
  pass through every step vanish, so SAGE adds a residual connection from the input latent to the output; here
  the decoded latent is ẑ_0 = z_0(z_T) + ρ (z_T − sg(z_T)) (equal to z_0 in value; ∂ẑ_0/∂z_T = J + ρI).
  SAGE wants latents that are not outliers of N(0, I); here z is kept on the sphere ‖z‖ = ‖z_seed‖ (where
  Gaussian samples concentrate) after every step, starting from the judged seed's own noise.
* **prompt space** (the paper's "gradient-guided search" over discrete tokens): k adversarial tokens are added to
  the prompt (SAGE appends one token embedding); each is a continuous embedding, projected every step onto the
  nearest vocabulary embedding by cosine, the loss computed at the projection and its gradient applied to the
  continuous embedding (straight-through, as PEZ / P4D), so that every candidate is a real prompt.

``space="both"`` searches both at once (one Adam step on each per iteration); the paper runs them separately
(presets "latent" and "prompt"). The sample each iteration makes is the erased model's generation of the current
(projected) prompt from the current latent, so the judge looks at it for free; a hit — and every ``eval_every``
iterations the current state — is confirmed by a generation through the pipeline's own ``__call__`` from that
prompt text and latent, and the search stops at the first confirmed success. The adversarial tokens are drawn
from the vocabulary's words that tokenize back to themselves (:func:`word_token_ids`), so the prompt text the
pipeline reads is the token sequence the search optimised.

Surrogate choice. The tinyworld judge is a small CNN, so it is differentiable: a judge with
``log_prob(images) -> Tensor`` (images (N, 3, H, W) in [−1, 1]; :class:`erasekit.judges.tinyworld.
TinyworldConceptJudge` has one) is used directly, as SAGE uses its classifiers. A judge without it (NudeNet,
a plain function) cannot be differentiated; then the surrogate is the one the other attacks use, the original
model's image x_tgt for (prompt, seed) (adapters disabled; P4D / UnlearnDiffAtk's target): L_T = ‖ẑ_0(z, p) −
E(x_tgt)‖², the erased model's sample pulled toward the original model's concept image; the judge still decides
success. ``surrogate`` forces either.

What is reconstructed: the authors' repository (qihao067/SAGE) holds a README announcing the code and no code, so
the optimiser, learning rates, iteration counts, the residual weight ρ and the sphere constraint are choices made
here from the paper's description, not the authors' values; SAGE's ensemble of robust classifiers is the audit's
one judge; its LLM-assisted natural-language search is not reproduced (token search only).

The searched latent is part of the result: ``info["latent"]`` records how far it moved from the seed's noise and,
for latents of at most :data:`RECORDED_LATENT_VALUES` values (tinyworld: 256), the values themselves, so that
:func:`replay` regenerates the judged image.

Other architectures (erasekit's extension; the paper runs SD 1.x / 2.x): with two CLIP text encoders (SDXL, SD3;
one shared vocabulary) each adversarial token keeps one continuous embedding per encoder and is projected onto the
token nearest in both (the sum of the two cosines). On SD3 the generator G is the pipeline's flow-matching Euler
sampler on the transformer's velocity, from the same seeded initial noise, and the VAE's shift factor is undone
before decoding; a T5 encoder, when loaded, reads the projected tokens as text and is not optimised through.
"""

from __future__ import annotations

import base64
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core import sd
from ..core.device import generators
from ..errors import ConfigError
from .base import (AttackResult, Best, collapsed_t5_rows, judge_one, judged_generation_options, make_generator, randint,
                   target_image)

logger = logging.getLogger(__name__)

#: latents with at most this many values are stored in ``info["latent"]["values"]`` (tinyworld's have 256)
RECORDED_LATENT_VALUES = 4096

SPACES = ("both", "prompt", "latent")
SURROGATES = ("auto", "judge", "target")


@dataclass(frozen=True)
@judged_generation_options
class SageConfig:
    """SAGE's search (no released code: every default is reconstructed, see the module docstring).

    Args:
        space: "both" (prompt tokens and initial latent together), "prompt" or "latent" (the paper's two searches).
        k: adversarial tokens (paper: one appended token embedding).
        insertion: where they go (paper: appended, "suffix_k"; any of ``erasekit.core.sd.INSERTIONS`` but "add").
        iterations: optimisation steps.
        eval_every: also generate and judge the current prompt and latent through the pipeline every this many
            steps (and at the last), besides each step's own sample when the judge sees the concept in it.
        lr_prompt: Adam learning rate of the continuous token embeddings.
        lr_latent: Adam learning rate of the initial latent.
        residual: ρ, the weight of the residual connection from the initial latent to the decoded latent.
        backprop_steps: back-propagate through only the last this many denoising steps (None: all of them).
        gradient_checkpointing: recompute each UNet call in the backward pass (memory for SD at 50 steps).
        surrogate: "auto" (the judge's ``log_prob`` if it has one, else "target"), "judge" or "target" (the
            original model's image, for judges that cannot be differentiated).
        stop_on_success: stop at the first judged success.
        exclude_words: words the adversarial tokens may not use.
    """

    space: Literal["both", "prompt", "latent"] = "both"
    k: int = 1
    insertion: str = "suffix_k"
    iterations: int = 200
    eval_every: int = 10
    lr_prompt: float = 0.1
    lr_latent: float = 0.05
    residual: float = 1.0
    backprop_steps: int | None = None
    gradient_checkpointing: bool = True
    surrogate: Literal["auto", "judge", "target"] = "auto"
    stop_on_success: bool = True
    exclude_words: tuple[str, ...] = ()

    def __post_init__(self):
        if self.space not in SPACES:
            raise ConfigError(f"SAGE space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.surrogate not in SURROGATES:
            raise ConfigError(f"SAGE surrogate must be one of {', '.join(SURROGATES)}, got {self.surrogate!r}")
        if self.insertion not in sd.INSERTIONS or self.insertion == "add":
            choices = ", ".join(i for i in sd.INSERTIONS if i != "add")
            raise ConfigError(f"SAGE insertion must be one of {choices}, got {self.insertion!r}")
        if self.space != "latent" and self.k < 1 and self.insertion != "per_k":
            raise ConfigError(f"SAGE's prompt search needs k >= 1 adversarial tokens, got k={self.k}")
        for name in ("iterations", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SAGE {name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr_prompt", "lr_latent"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"SAGE {name} must be positive, got {getattr(self, name)}")
        if not self.residual >= 0:
            raise ConfigError(f"SAGE residual must be >= 0, got {self.residual}")
        if self.backprop_steps is not None and self.backprop_steps < 1:
            raise ConfigError(f"SAGE backprop_steps must be at least 1 (or None: all), got {self.backprop_steps}")

    @property
    def searches_prompt(self) -> bool:
        return self.space in ("both", "prompt")

    @property
    def searches_latent(self) -> bool:
        return self.space in ("both", "latent")


CONFIG = SageConfig
PRESETS = {
    "paper": SageConfig(),
    "prompt": SageConfig(space="prompt"),
    "latent": SageConfig(space="latent"),
    "tinyworld": SageConfig(k=2, iterations=40, eval_every=4, lr_prompt=0.2, lr_latent=0.2,
                            gradient_checkpointing=False),
    "tinyworld-prompt": SageConfig(space="prompt", k=2, iterations=40, eval_every=4, lr_prompt=0.2,
                                   gradient_checkpointing=False),
    "tinyworld-latent": SageConfig(space="latent", iterations=40, eval_every=4, lr_latent=0.2,
                                   gradient_checkpointing=False),
}


# ----------------------------------------------------------------------------------------------- the generator G

def initial_latent(pipe, seed: int) -> torch.Tensor:
    """The pipeline's own initial noise for ``seed`` (what ``pipe(..., generator=seed)`` draws), unscaled."""
    from diffusers.utils.torch_utils import randn_tensor

    device = sd.device_of(pipe)
    height, width = sd.default_size(pipe)
    shape = (1, sd.denoiser(pipe).config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return randn_tensor(shape, generator=generators([seed], device), device=device, dtype=torch.float32)


def _unet(pipe, checkpoint: bool):
    if not checkpoint:
        return sd.unet_eps

    def run(pipe_, x, t, cond):
        return torch.utils.checkpoint.checkpoint(lambda x_, e_, p_: sd.unet_eps(pipe_, x_, t, sd.Cond(e_, p_)),
                                                 x, cond.embeds, cond.pooled, use_reentrant=False)

    return run


def sample(pipe, cond: sd.Cond, z: torch.Tensor, steps: int, guidance: float, *, residual: float = 0.0,
           backprop_steps: int | None = None, checkpoint: bool = False) -> torch.Tensor:
    """ẑ_0 = G(z, c): the pipeline's classifier-free-guided sampler from initial noise ``z`` (unit scale), as a
    differentiable function of ``z`` and ``cond`` (a fresh copy of the pipeline's scheduler, deterministic steps;
    SD3: its flow-matching Euler steps on the velocity), plus SAGE's residual connection ρ (z − sg(z)). Only the last
    ``backprop_steps`` steps carry gradients.
    """
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    device = sd.device_of(pipe)
    scheduler.set_timesteps(steps, device=device)
    params = inspect.signature(scheduler.step).parameters
    extra = {"eta": 0.0} if "eta" in params else {}
    neg = sd.uncond(pipe)
    unet = _unet(pipe, checkpoint)
    latents = z * getattr(scheduler, "init_noise_sigma", 1.0)
    timesteps = list(scheduler.timesteps)
    first_tracked = 0 if backprop_steps is None else max(0, len(timesteps) - backprop_steps)
    tracking = torch.is_grad_enabled()
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(tracking and i >= first_tracked):
            x = sd.scale_model_input(scheduler, torch.cat([latents, latents]), t)
            eps = unet(pipe, x, t, sd.Cond.cat([neg, cond]))
            eps_u, eps_c = eps.chunk(2)
            guided = eps_u + guidance * (eps_c - eps_u)
            latents = scheduler.step(guided, t, latents, **extra, return_dict=False)[0]
    return latents + residual * (z - z.detach())


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [−1, 1] from x0 latents, differentiably (the pipeline's VAE; SD3: its shift factor)."""
    return sd.decode_latents(pipe, latents).float().clamp(-1, 1)


@collapsed_t5_rows  # as erasekit.generate: the judged image of a replay is the attack's own
def generate(pipe, prompt: str, z: torch.Tensor, num_inference_steps: int | None, guidance_scale: float | None):
    """The judged generation: the pipeline's own ``__call__`` on ``prompt`` from initial latent ``z``."""
    steps, guidance = sd.generation_settings(pipe, num_inference_steps, guidance_scale)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                    latents=z.to(sd.device_of(pipe), sd.denoiser(pipe).dtype), output_type="pil").images[0]


# ----------------------------------------------------------------------------------------------- recorded latents

def _latent_record(z: torch.Tensor, z_seed: torch.Tensor, seed: int) -> dict:
    record = {"from_seed": int(seed), "shape": list(z.shape),
              "relative_change": round(float((z - z_seed).norm() / z_seed.norm()), 6),
              "cosine_to_seed": round(float(F.cosine_similarity(z.flatten(), z_seed.flatten(), dim=0)), 6)}
    if z.numel() <= RECORDED_LATENT_VALUES:
        raw = z.detach().cpu().float().numpy().astype("<f4").tobytes()
        record["values"] = base64.b64encode(raw).decode("ascii")
    return record


def recorded_latent(info: dict) -> torch.Tensor | None:
    """The initial latent a SAGE result was judged with (from ``info["latent"]``), or None when not recorded."""
    record = info.get("latent") or {}
    if "values" not in record:
        return None
    values = np.frombuffer(base64.b64decode(record["values"]), dtype="<f4").copy()
    return torch.from_numpy(values).reshape(record["shape"])


def replay(pipe, result: AttackResult | dict, config: SageConfig):
    """Regenerate a SAGE result's judged image: its adversarial prompt from its latent (the recorded one, or the
    seed's own noise when the search left the latent alone)."""
    info = (result.record() if isinstance(result, AttackResult) else result)["info"]
    z = recorded_latent(info)
    if z is None and "latent" not in info:
        z = initial_latent(pipe, info["seed"])
    if z is None:
        raise ConfigError("this SAGE result did not record its latent (more than "
                          f"{RECORDED_LATENT_VALUES} values); rerun the attack with the same seed to get it")
    adv_prompt = result.adv_prompt if isinstance(result, AttackResult) else result["adv_prompt"]
    return generate(pipe, adv_prompt, z, config.num_inference_steps, config.guidance_scale)


# ----------------------------------------------------------------------------------------------- the attack

def word_token_ids(pipe, exclude_words=()) -> torch.Tensor:
    """The allowed token ids that are words of their own: the text of the token tokenizes back to that one token
    (CLIP's word-final pieces, mostly). Only these keep a searched prompt what the search saw once it is written
    out and tokenized again (a word piece such as "p" next to a word would merge into other tokens)."""
    tok = pipe.tokenizer
    ids = sd.allowed_token_ids(pipe, exclude_words).tolist()
    words = [sd.decode(tok, [i]) for i in ids]
    again = tok(words, add_special_tokens=False).input_ids
    kept = [i for i, w, a in zip(ids, words, again) if w and a == [i]]
    if not kept:
        raise ConfigError("no token of this tokenizer is a word of its own: SAGE's prompt search has nothing to use")
    return torch.tensor(kept, dtype=torch.long)


def _surrogate(config: SageConfig, judge) -> str:
    differentiable = callable(getattr(judge, "log_prob", None))
    if config.surrogate == "judge" and not differentiable:
        raise ConfigError(f"SAGE surrogate 'judge' needs a judge with a differentiable log_prob(images); "
                          f"{type(judge).__name__} has none (use surrogate='target' or 'auto')")
    if config.surrogate == "auto":
        return "judge" if differentiable else "target"
    return config.surrogate


@collapsed_t5_rows
def attack(pipe, prompt: str, config: SageConfig, judge, generator: torch.Generator | None = None, *,
           seed: int = 0, target=None, state=None, progress: bool = False, cache=None) -> AttackResult:
    """Search adversarial prompt tokens and/or the initial latent of (``prompt``, ``seed``) on the erased ``pipe``
    until the judge sees its concept; judged generations start from the searched latent."""
    started = time.perf_counter()
    g = make_generator(generator, seed, "sage", config.space, prompt)
    device = sd.device_of(pipe)
    steps, guidance = sd.generation_settings(pipe, config.num_inference_steps, config.guidance_scale)
    surrogate = _surrogate(config, judge)
    if surrogate == "target":
        target = target if target is not None else target_image(pipe, prompt, seed, config)
        x_tgt = sd.encode_images(pipe, [target])

    z_seed = initial_latent(pipe, seed)
    radius = z_seed.norm()
    z = z_seed.clone().requires_grad_(config.searches_latent)
    params = [{"params": [z], "lr": config.lr_latent}] if config.searches_latent else []

    if config.searches_prompt:
        E = [e.float() for e in sd.token_embeddings(pipe)]  # one table per text encoder (one shared vocabulary)
        allowed = word_token_ids(pipe, config.exclude_words).to(E[0].device)
        E_allowed_n = [F.normalize(e[allowed.to(e.device)], dim=-1) for e in E]
        lay = sd.layout(pipe.tokenizer, prompt, config.k, config.insertion)
        init_ids = allowed[randint(len(allowed), g, (lay.k,)).to(allowed.device)]
        # (k, D_i) continuous token embeddings per text encoder
        cont = [e[init_ids.to(e.device)].clone().to(device).requires_grad_(True) for e in E]
        params.append({"params": cont, "lr": config.lr_prompt})
    else:
        cond_fixed = sd.encode(pipe, prompt)
    opt = torch.optim.Adam(params)

    def project() -> list[int]:
        with torch.no_grad():
            sims = sum(F.normalize(c.detach().to(e.device), dim=-1) @ en.T for c, e, en in zip(cont, E, E_allowed_n))
            return allowed[sims.argmax(-1)].tolist()  # nearest by cosine; two encoders: nearest in both (summed)

    def current_prompt() -> tuple[str, list[int]]:
        if not config.searches_prompt:
            return prompt, []
        ids = project()
        return sd.decode(pipe.tokenizer, lay.ids(ids)), ids

    best, queries, losses, step = Best(), 0, [], 0
    for step in tqdm(range(1, config.iterations + 1), desc="sage", disable=not progress, leave=False):
        adv, ids = current_prompt()
        z_now = z.detach().clone()
        if config.searches_prompt:
            index = torch.tensor(ids)
            # the loss at the projection, its gradient to the continuous embeddings (straight-through)
            straight_through = [c + (e[index.to(e.device)].to(device) - c).detach() for c, e in zip(cont, E)]
            cond = sd.encode_ids(pipe, sd.ids_per_encoder(pipe, lay.ids(ids)),
                                 [sd.slot_override(lay, st[None]) for st in straight_through])
        else:
            cond = cond_fixed
        z0 = sample(pipe, cond, z, steps, guidance, residual=config.residual if config.searches_latent else 0.0,
                    backprop_steps=config.backprop_steps, checkpoint=config.gradient_checkpointing)
        x = decode(pipe, z0)
        loss = -judge.log_prob(x).mean() if surrogate == "judge" else F.mse_loss(z0, x_tgt)  # − log p_D(c | x̂)
        losses.append(float(loss.detach()))
        # the sample just made is this step's generation: judge it, and confirm a hit (and every eval_every
        # steps the current state) by a generation through the pipeline itself
        _, seen = judge_one(judge, pipe.image_processor.postprocess(x.detach(), output_type="pil")[0])
        if seen or step % config.eval_every == 0 or step == config.iterations:
            image = generate(pipe, adv, z_now, config.num_inference_steps, config.guidance_scale)
            score, hit = judge_one(judge, image)
            queries += 1
            best.offer(hit, score, adv_prompt=adv, image=image, step=step, ids=ids, z=z_now)
            logger.debug("sage step %d: %r score %.3f loss %.4f", step, adv, score, losses[-1])
            if hit and config.stop_on_success:
                break
        if step == config.iterations:
            break
        variables = [v for group in params for v in group["params"]]
        grads = torch.autograd.grad(loss, variables)  # not .backward(): no gradients left on the model's weights
        for v, grad in zip(variables, grads):
            v.grad = grad
        opt.step()
        if config.searches_latent:
            with torch.no_grad():  # stay on the Gaussian shell ‖z‖ = ‖z_seed‖ (no outlier latents)
                z.mul_(radius / z.norm())
    v = best.value or {"adv_prompt": prompt, "image": None, "step": 0, "ids": [], "z": z_seed}
    info = {"space": config.space, "seed": int(seed), "surrogate": surrogate, "queries": queries, "found_at_step": v["step"],
            "adv_token_ids": v["ids"], "final_loss": losses[-1] if losses else None,
            "seconds": round(time.perf_counter() - started, 3)}
    if config.searches_latent:
        info["latent"] = _latent_record(v["z"], z_seed, seed)
    return AttackResult(prompt=prompt, adv_prompt=v["adv_prompt"], success=best.success,
                        score=best.key[1] if best.key else 0.0, steps=step, image=v["image"], info=info)
