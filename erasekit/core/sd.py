"""Stable Diffusion plumbing shared by methods, attacks, compose and audit: text conditioning from token ids or from optimised
token embeddings, noise predictions, target latents, and a small explicit sampler.

Everything works on a stock diffusers ``StableDiffusionPipeline`` (SD 1.x / 2.x), ``StableDiffusionXLPipeline`` or
``StableDiffusion3Pipeline`` (an MMDiT transformer trained with flow matching: :mod:`erasekit.core.mmdit`) without
modifying it. The denoiser is ``pipe.unet`` or ``pipe.transformer`` (:func:`denoiser`); its prediction is ε for the
UNet models and the velocity v = ε − x₀ for SD3 — the methods combine predictions linearly (guidance, ESD's
negative guidance), which means the same for both. Optimised token embeddings enter the text encoder through
a forward hook on its token-embedding layer, installed for one call and removed in ``finally`` (PyTorch's hook
API, not a patch of transformers), so the same code runs with transformers 4.x and 5.x.

The "original model" of an erased pipeline is the same pipeline inside ``erasekit.compose.disabled(pipe)``
(adapters off).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- model access

def model_id(pipe, default: str = "") -> str:
    """The hub id or folder a pipeline was loaded from (``pipe.name_or_path``, else its config's), or ``default``."""
    config = getattr(pipe, "config", None)
    return str(getattr(pipe, "name_or_path", "") or getattr(config, "_name_or_path", "") or default)


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoising network: ``pipe.unet`` (SD 1.x, 2.x, SDXL) or ``pipe.transformer`` (SD3)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def is_mmdit(pipe) -> bool:
    """Whether the pipeline's denoiser is an MMDiT transformer (SD3; joint attention, flow matching)."""
    from .mmdit import is_mmdit as _is_mmdit

    return getattr(pipe, "unet", None) is None and _is_mmdit(getattr(pipe, "transformer", None))


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None and not is_mmdit(pipe)


def encoders(pipe) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, text encoder) pairs, in the order the pipeline concatenates their outputs (SD3: its two CLIP
    encoders; a T5 encoder is not token-addressable here and is handled in :func:`encode_ids`)."""
    if is_sdxl(pipe) or is_mmdit(pipe):
        pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        return [(t, e) for t, e in pairs if e is not None]
    return [(pipe.tokenizer, pipe.text_encoder)]


def device_of(pipe) -> torch.device:
    """Where the pipeline computes (``pipe._execution_device``, which walks every module, only under offloading)."""
    unet = denoiser(pipe)
    if getattr(unet, "_hf_hook", None) is not None or unet.device.type == "meta":
        return pipe._execution_device
    return unet.device


def token_embeddings(pipe) -> list[torch.Tensor]:
    """Each text encoder's token-embedding matrix (V, D), detached."""
    return [enc.get_input_embeddings().weight.detach() for _, enc in encoders(pipe)]


def special_ids(tokenizer) -> set[int]:
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    return {i for i in ids if i is not None}


def allowed_token_ids(pipe, exclude_words: Sequence[str] = ()) -> torch.Tensor:
    """Token ids an attack may place: the whole vocabulary except special tokens (and optional banned words)."""
    tok = pipe.tokenizer
    vocab = min(len(tok), token_embeddings(pipe)[0].shape[0])
    banned = set(special_ids(tok))
    for t, _ in encoders(pipe)[1:]:
        banned |= {i for i in (t.bos_token_id, t.eos_token_id) if i is not None}
    for word in exclude_words:
        banned |= set(tok(word, add_special_tokens=False).input_ids)
    return torch.tensor([i for i in range(vocab) if i not in banned], dtype=torch.long)


# ----------------------------------------------------------------------------------------------- conditioning

@dataclass
class Cond:
    """Text conditioning of a batch: ``embeds`` (B, 77, D) and, for SDXL, ``pooled`` (B, P)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, i) -> "Cond":
        return Cond(self.embeds[i], None if self.pooled is None else self.pooled[i])

    def expand(self, n: int) -> "Cond":
        return Cond(self.embeds.expand(n, -1, -1), None if self.pooled is None else self.pooled.expand(n, -1))

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return Cond(torch.cat([c.embeds for c in conds]), pooled)

    def __add__(self, other: "Cond") -> "Cond":
        pooled = None if self.pooled is None else self.pooled + other.pooled
        return Cond(self.embeds + other.embeds, pooled)

    def __sub__(self, other: "Cond") -> "Cond":
        pooled = None if self.pooled is None else self.pooled - other.pooled
        return Cond(self.embeds - other.embeds, pooled)

    def __mul__(self, s: float) -> "Cond":
        return Cond(self.embeds * s, None if self.pooled is None else self.pooled * s)

    __rmul__ = __mul__


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS (CLIP BPE works word by word, so fragments concatenate exactly)."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else []


def sequence(tokenizer, ids: Sequence[int], length: int = 77) -> list[int]:
    """[BOS] + ids + [EOS] + padding, truncated to ``length`` (the tokenizer's own pad id)."""
    ids = list(ids)[: length - 2]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    return out + [pad] * (length - len(out))


def ids_per_encoder(pipe, ids: Sequence[int] | Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Full (B, 77) id tensors for every text encoder from inner ids (shared vocabulary, per-tokenizer pad)."""
    batch = [list(ids)] if not ids or isinstance(ids[0], int) else [list(x) for x in ids]
    device = device_of(pipe)
    return [torch.tensor([sequence(tok, x, tok.model_max_length) for x in batch], device=device)
            for tok, _ in encoders(pipe)]


class _EmbeddingOverride:
    """Forward hook on a token-embedding layer: replace its (B, 77, D) output by ``fn(output)``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def __call__(self, module, args, output):
        return self.fn(output).to(output.dtype)


def prompt_ids(pipe, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Per-encoder token ids (B, 77) of ``prompts``, padded and truncated to ``model_max_length`` as the
    pipelines do."""
    return [tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok, _ in encoders(pipe)]


def encode_ids(pipe, ids: list[torch.Tensor],
               overrides: Sequence[Callable[[torch.Tensor], torch.Tensor] | None] | None = None,
               attention_mask: torch.Tensor | None = None, t5: bool = True) -> Cond:
    """Run the text encoders on per-encoder ids (B, L) exactly as the pipeline's ``encode_prompt`` does.

    ``overrides[i]`` (optional) maps encoder i's token embeddings (B, L, D) to the embeddings to use instead;
    gradients flow through it. ``attention_mask`` (B, L) reaches encoders whose config asks for one
    (``use_attention_mask``), as in ``encode_prompt``. SD 1.x/2.x: last hidden state. SDXL: penultimate hidden
    states of both encoders concatenated, pooled output of the second. SD3: penultimate hidden states of both CLIP
    encoders concatenated and zero-padded to the transformer's ``joint_attention_dim``, then the T5 rows (the T5
    encoding of the decoded first-encoder ids, or ``max_sequence_length`` rows of zeros without T5); pooled: both
    encoders' projections concatenated. ``t5=False`` (SD3): the CLIP rows alone, for readers of CLIP positions
    (the T5 rows come after them and change none of them), without running T5 or allocating its rows.
    """
    overrides = list(overrides or [None] * len(ids))
    if is_mmdit(pipe):
        return _encode_ids_sd3(pipe, ids, overrides, attention_mask, t5)
    sdxl = is_sdxl(pipe)
    hidden, pooled = [], None
    device = device_of(pipe)
    for (tok, enc), x, fn in zip(encoders(pipe), ids, overrides):
        kwargs = {}
        if attention_mask is not None and getattr(enc.config, "use_attention_mask", False):
            kwargs["attention_mask"] = attention_mask.to(device)
        handle = enc.get_input_embeddings().register_forward_hook(_EmbeddingOverride(fn)) if fn else None
        try:
            out = enc(x.to(device), output_hidden_states=sdxl, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        if sdxl:
            if out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        else:
            hidden.append(out[0])
    return Cond(torch.cat(hidden, dim=-1), pooled)


#: the T5 rows StableDiffusion3Pipeline uses by default (``max_sequence_length``)
SD3_T5_ROWS = 256


def _encode_ids_sd3(pipe, ids, overrides, attention_mask, t5: bool = True) -> Cond:
    device = device_of(pipe)
    hidden, pooled = [], []
    for (tok, enc), x, fn in zip(encoders(pipe), ids, overrides):
        handle = enc.get_input_embeddings().register_forward_hook(_EmbeddingOverride(fn)) if fn else None
        try:
            out = enc(x.to(device), output_hidden_states=True)
        finally:
            if handle is not None:
                handle.remove()
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2])
    clip = torch.cat(hidden, -1)
    width = int(pipe.transformer.config.joint_attention_dim)
    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
    if not t5:
        return Cond(clip, torch.cat(pooled, -1))
    if getattr(pipe, "text_encoder_3", None) is None:
        t5 = clip.new_zeros(clip.shape[0], SD3_T5_ROWS, width)
    else:
        texts = [decode(pipe.tokenizer, row.tolist()) for row in ids[0]]
        with torch.no_grad():
            t5 = pipe._get_t5_prompt_embeds(prompt=texts, max_sequence_length=SD3_T5_ROWS, device=device).to(clip.dtype)
    return Cond(torch.cat([clip, t5], -2), torch.cat(pooled, -1))


def encode(pipe, prompts: str | Sequence[str]) -> Cond:
    """Conditioning of plain prompts (no grad), identical to ``pipe.encode_prompt``'s positive embeddings."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    with torch.no_grad():
        return encode_ids(pipe, prompt_ids(pipe, prompts))


def uncond(pipe, n: int = 1) -> Cond:
    """The unconditional (negative) conditioning the pipeline uses for classifier-free guidance."""
    device = device_of(pipe)
    with torch.no_grad():
        if is_mmdit(pipe):
            _, neg, _, neg_pooled = pipe.encode_prompt("", "", "", device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True,
                                                       max_sequence_length=SD3_T5_ROWS)
            return Cond(neg, neg_pooled).expand(n)
        if is_sdxl(pipe):
            _, neg, _, neg_pooled = pipe.encode_prompt("", device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True)
            return Cond(neg, neg_pooled).expand(n)
        _, neg = pipe.encode_prompt("", device, 1, True)
        return Cond(neg).expand(n)


# ----------------------------------------------------------------------------------------------- UNet & VAE

def default_size(pipe) -> tuple[int, int]:
    size = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size
    return size * pipe.vae_scale_factor, size * pipe.vae_scale_factor


def _time_ids(pipe, cond: Cond, height: int, width: int) -> torch.Tensor:
    ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.embeds.dtype,
                                 text_encoder_projection_dim=int(cond.pooled.shape[-1]))
    return ids.to(cond.embeds.device).repeat(cond.embeds.shape[0], 1)


def unet_eps(pipe, latents: torch.Tensor, t, cond: Cond) -> torch.Tensor:
    """The denoiser's prediction for a batch (no CFG): ε_θ(x_t, t | c), or SD3's velocity v_θ(x_t, t | c).
    ``t``: int, 0-d or (B,) tensor (SD3: 1000 σ)."""
    unet = denoiser(pipe)
    dtype = unet.dtype
    if is_mmdit(pipe):
        t = torch.as_tensor(t, device=latents.device)
        t = t.expand(latents.shape[0]) if t.ndim == 0 else t
        return unet(hidden_states=latents.to(dtype), timestep=t, encoder_hidden_states=cond.embeds.to(dtype),
                    pooled_projections=cond.pooled.to(dtype), return_dict=False)[0].float()
    kwargs = {}
    if cond.pooled is not None:
        h, w = latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(dtype), "time_ids": _time_ids(pipe, cond, h, w)}
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    t = t.to(latents.device)
    if t.ndim == 0:
        t = t.expand(latents.shape[0])
    return unet(latents.to(dtype), t, encoder_hidden_states=cond.embeds.to(dtype), **kwargs).sample.float()


def image_tensor(pipe, images, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """PIL images / uint8 (N,H,W,3) arrays → float (N,3,H,W) in [-1, 1] at the pipeline's resolution."""
    import numpy as np

    if height is None:
        height, width = default_size(pipe)
    if not isinstance(images, (list, tuple)):
        images = list(images)
    arrays = []
    for im in images:
        if hasattr(im, "convert"):
            im = im.convert("RGB")
            if im.size != (width, height):  # resize the short side, centre-crop (UnlearnDiffAtk's preprocessing)
                from PIL import Image

                scale = max(width / im.width, height / im.height)
                im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))),
                               Image.BICUBIC)
                left, top = (im.width - width) // 2, (im.height - height) // 2
                im = im.crop((left, top, left + width, top + height))
            im = np.asarray(im)
        arrays.append(np.asarray(im, dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1
    return x


@torch.no_grad()
def encode_images(pipe, images) -> torch.Tensor:
    """x0 latents of images: VAE posterior mean × scaling factor (UnlearnDiffAtk / textual inversion), less the
    VAE's shift factor where it has one (SD3; the inverse of :func:`decode_latents`)."""
    x = image_tensor(pipe, images).to(device_of(pipe), pipe.vae.dtype)
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return ((pipe.vae.encode(x).latent_dist.mean - shift) * pipe.vae.config.scaling_factor).float()


def alphas_cumprod(pipe) -> torch.Tensor:
    return pipe.scheduler.alphas_cumprod.float().to(device_of(pipe))


def add_noise(pipe, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (DDPM forward process, Ho et al. Eq. 4); for flow-matching models
    x_t = (1 − σ) x0 + σ ε with σ = t / num_train_timesteps (rectified flow, Esser et al. 2024 Eq. 3)."""
    if is_mmdit(pipe):
        sigma = (torch.as_tensor(t, device=x0.device).float() / num_train_timesteps(pipe)).view(-1, 1, 1, 1)
        return (1 - sigma) * x0 + sigma * noise
    a = alphas_cumprod(pipe)[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def prediction_target(pipe, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to predict for ``add_noise(pipe, x0, noise, t)``: ε, or the velocity ε − x0 for
    flow matching."""
    return noise - x0 if is_mmdit(pipe) else noise


def denoised(pipe, latents: torch.Tensor, prediction: torch.Tensor, t) -> torch.Tensor:
    """x̂₀ from x_t and the denoiser's prediction: (x_t − √(1−ᾱ) ε) / √ᾱ, or x_t − σ v for flow matching."""
    if is_mmdit(pipe):
        sigma = (torch.as_tensor(t, device=latents.device).float() / num_train_timesteps(pipe)).view(-1, 1, 1, 1)
        return latents - sigma * prediction
    a = alphas_cumprod(pipe)[t].view(-1, 1, 1, 1)
    return (latents - (1 - a).sqrt() * prediction) / a.sqrt()


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents (the VAE's scaling and, where it has one, shift factor undone)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]


def num_train_timesteps(pipe) -> int:
    return int(pipe.scheduler.config.num_train_timesteps)


# ----------------------------------------------------------------------------------------------- sampling

#: used when a model does not say otherwise (diffusers' StableDiffusionPipeline defaults)
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5


def model_defaults(pipe) -> dict:
    """Generation defaults a model folder declares (tinyworld's ``tinyworld.json``), else diffusers'."""
    manifest = Path(model_id(pipe, ".")) / "tinyworld.json"
    if manifest.is_file():
        gen = json.loads(manifest.read_text()).get("generation", {})
        return {"num_inference_steps": gen.get("num_inference_steps", DEFAULT_STEPS),
                "guidance_scale": gen.get("guidance_scale", DEFAULT_GUIDANCE)}
    return {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}


def generation_settings(pipe, num_inference_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
    """The sampling steps and CFG scale of a generation: the given ones, else the model's defaults; ConfigError for
    fewer than 1 step or a non-finite scale (every generation path checks here)."""
    defaults = model_defaults(pipe)
    steps = defaults["num_inference_steps"] if num_inference_steps is None else int(num_inference_steps)
    guidance = defaults["guidance_scale"] if guidance_scale is None else float(guidance_scale)
    if steps < 1:
        raise ConfigError(f"num_inference_steps must be at least 1, got {steps}")
    if not math.isfinite(guidance):
        raise ConfigError(f"guidance_scale must be a finite number, got {guidance}")
    return steps, guidance


def generate_prompt(pipe, prompt: str, seed: int, num_inference_steps: int | None = None,
                    guidance_scale: float | None = None):
    """One image for ``prompt`` with its own seeded generator: exactly :func:`erasekit.generate.generate`."""
    from ..generate import generate

    return generate(pipe, [prompt], [seed], num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale)[0]


@torch.no_grad()
def generate_cond(pipe, cond: Cond, seed: int, num_inference_steps: int | None = None,
                  guidance_scale: float | None = None):
    """One image from ready-made conditioning (B=1), through the pipeline's own ``__call__``."""
    from .device import generators

    steps, guidance = generation_settings(pipe, num_inference_steps, guidance_scale)
    neg = uncond(pipe)
    kwargs = dict(prompt_embeds=cond.embeds.to(denoiser(pipe).dtype), negative_prompt_embeds=neg.embeds)
    if cond.pooled is not None:
        kwargs.update(pooled_prompt_embeds=cond.pooled.to(denoiser(pipe).dtype), negative_pooled_prompt_embeds=neg.pooled)
    out = pipe(num_inference_steps=steps, guidance_scale=guidance,
               generator=generators([seed], device_of(pipe)), output_type="pil", **kwargs)
    return out.images[0]


@torch.no_grad()
def sample_composed(pipe, terms: Sequence[tuple[Cond, float]], seed: int, num_inference_steps: int | None = None,
                    height: int | None = None, width: int | None = None, negative: Cond | None = None):
    """Sample one image with composed guidance ε = ε∅ + Σ_i w_i (ε(c_i) − ε∅) (Liu et al. 2022, Eq. 11).

    A plain denoising loop over the pipeline's own components (a fresh copy of its scheduler, its UNet and VAE);
    with a single term of weight w it equals ``pipe(prompt, guidance_scale=w)`` (tested).
    """
    from diffusers.utils.torch_utils import randn_tensor

    from .device import generators

    steps, _ = generation_settings(pipe, num_inference_steps, None)
    if height is None:
        height, width = default_size(pipe)
    device = device_of(pipe)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    generator = generators([seed], device)
    shape = (1, denoiser(pipe).config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=terms[0][0].embeds.dtype)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    neg = negative if negative is not None else uncond(pipe)
    conds = Cond.cat([neg] + [c for c, _ in terms])
    weights = torch.tensor([w for _, w in terms], device=device).view(-1, 1, 1, 1)
    extra = {"generator": generator[0]} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        x = scale_model_input(scheduler, latents, t).expand(len(terms) + 1, -1, -1, -1)
        eps = unet_eps(pipe, x, t, conds)
        eps_u, eps_c = eps[:1], eps[1:]
        guided = eps_u + (weights * (eps_c - eps_u)).sum(0, keepdim=True)
        latents = scheduler.step(guided.to(latents.dtype), t, latents, **extra, return_dict=False)[0]
    return pipe.image_processor.postprocess(decode_latents(pipe, latents), output_type="pil")[0]


def scale_model_input(scheduler, latents: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's input scaling (flow-matching schedulers have none)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latents if scale is None else scale(latents, t)


# ----------------------------------------------------------------------------------------------- soft prompts

INSERTIONS = ("prefix_k", "replace_k", "add", "suffix_k", "mid_k", "insert_k", "per_k")


@dataclass
class Layout:
    """Where adversarial token slots sit in a prompt's token sequence.

    ``items`` lists the inner sequence (no BOS/EOS): an ``int`` is a fixed token id, ``("adv", j)`` is adversarial
    slot j, ``("add", j, id)`` is prompt token ``id`` plus slot j's perturbation (insertion ``add``).
    """

    items: list
    k: int
    insertion: str

    def slot_positions(self) -> list[int]:
        """Positions in the full 77-sequence (BOS at 0) of each slot j (j = 0..k-1)."""
        pos = [0] * self.k
        for p, it in enumerate(self.items):
            if isinstance(it, tuple):
                pos[it[1]] = p + 1
        return pos

    def ids(self, adv_ids: Sequence[int]) -> list[int]:
        """Inner ids with slot j filled by ``adv_ids[j]`` (for ``add``: the prompt token itself)."""
        out = []
        for it in self.items:
            if isinstance(it, int):
                out.append(it)
            elif it[0] == "adv":
                out.append(int(adv_ids[it[1]]))
            else:
                out.append(int(it[2]))
        return out


def layout(tokenizer, prompt: str, k: int, insertion: str, every: int = 3, max_length: int = 77) -> Layout:
    """Token layout of ``prompt`` with k adversarial slots (AdvUnlearn / Diffusion-MU-Attack insertion modes).

    prefix_k: [adv×k, prompt]; suffix_k: [prompt, adv×k]; replace_k: [adv×k] (the prompt is dropped);
    mid_k: [prompt[:n/2], adv×k, prompt[n/2:]]; insert_k: k slots at equal intervals inside the prompt;
    per_k: one slot before every ``every`` prompt tokens (P4D-K; k is derived); add: one slot per prompt token,
    added to that token's embedding (k = prompt length).
    """
    if insertion not in INSERTIONS:
        raise ConfigError(f"unknown insertion {insertion!r}; choose one of {', '.join(INSERTIONS)}")
    p = token_ids(tokenizer, prompt)
    budget = max_length - 2
    if insertion == "add":
        p = p[:budget]
        return Layout([("add", j, t) for j, t in enumerate(p)], len(p), insertion)
    if insertion == "per_k":
        k = len(p[: budget - (budget // (every + 1)) - 1]) // every + 1
    if k > budget:
        raise ConfigError(f"k={k} adversarial tokens do not fit in {max_length} tokens")
    if len(p) + k > budget and insertion != "replace_k":
        logger.warning("prompt truncated to %d tokens to fit %d adversarial tokens", budget - k, k)
        p = p[: budget - k]
    adv = [("adv", j) for j in range(k)]
    if insertion == "prefix_k":
        items = adv + p
    elif insertion == "suffix_k":
        items = p + adv
    elif insertion == "replace_k":
        items = adv
    elif insertion == "mid_k":
        items = p[: len(p) // 2] + adv + p[len(p) // 2:]
    elif insertion == "insert_k":
        step = len(p) // (k + 1)
        items = []
        for j in range(k):
            items += p[step * j: step * (j + 1)] + [adv[j]]
        items += p[step * k:]
    else:  # per_k
        items = []
        for j in range(k):
            items += [adv[j]] + p[every * j: every * (j + 1)]
        items += p[every * k:]
    return Layout(items, k, insertion)


def slot_override(lay: Layout, slot_embeds: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An override for :func:`encode_ids`: put ``slot_embeds`` (B, k, D) at the layout's slot positions
    (or add them to the prompt tokens, insertion ``add``)."""
    positions = torch.tensor(lay.slot_positions(), dtype=torch.long)
    additive = lay.insertion == "add"

    def fn(token_embeds: torch.Tensor) -> torch.Tensor:
        x = token_embeds.clone()
        pos = positions.to(x.device)
        e = slot_embeds.to(x.dtype).expand(x.shape[0], -1, -1)
        x[:, pos] = x[:, pos] + e if additive else e
        return x

    return fn


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()
