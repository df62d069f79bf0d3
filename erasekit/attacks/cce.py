"""Concept Inversion, CCE (Pham et al., "Circumventing Concept Erasure Methods For Text-to-Image Generative
Models", ICLR 2024, https://arxiv.org/abs/2308.01508).

Textual inversion (Gal et al. 2023, Eq. 2) of one new token embedding v* **on the erased model**, from images of
the concept made by the original model (adapters disabled):

    v* = argmin_v  E_{x, y, t, ε} ‖ε − ε_θ*(z_t, t | c_θ*(y(v)))‖²,

where y(v) is a caption template ("a photo of a <concept>") whose placeholder token is embedded as v. The learned
token then goes into any prompt in place of the concept's name. Paper defaults (diffusers' textual-inversion
script as the authors ran it): 5000 steps, batch 4 × gradient accumulation 4, learning rate 5e-3 scaled by the
effective batch (16), constant schedule, AdamW (weight decay 1e-2), 25 training images.

The inversion is per concept, not per prompt: :func:`prepare` learns v* once and :func:`attack` reuses it
(the audit runs ``prepare`` once and stores v* beside the results). The placeholder never enters the pipeline's
tokenizer or embedding table: it is a slot whose input embedding is replaced (the pipeline is not modified).

Two CLIP encoders (SDXL, SD3) get one learned embedding each, as diffusers' SDXL textual-inversion script trains
both. On SD3 the loss is SD3's conditional flow-matching loss ‖(ε − x0) − v_θ*(x_t, t | c)‖², x_t = (1 − σ) x0 + σ ε
(Esser et al. 2024, Eq. 3), σ drawn as SD3 trains (logit-normal, :func:`erasekit.attacks.base.draw_timesteps`;
the DDPM script's t is uniform, as DDPM trains; uniform σ did no better on tinyworld-mmdit); a T5 encoder, when
loaded, is not optimised through (it reads the caption's text with a stand-in token in the slot).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from .. import compose
from ..core import sd
from ..tinyworld import is_tinyworld
from .base import (AttackResult, collapsed_t5_rows, concept_of, denoising_target, evaluate_cond,
                   draw_timesteps, judged_generation_options, make_generator, randint, randn)
from .concepts import find_name, tinyworld_names

logger = logging.getLogger(__name__)

# diffusers examples/textual_inversion: imagenet_templates_small / imagenet_style_templates_small (first eight)
OBJECT_TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
                    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}")
STYLE_TEMPLATES = ("a painting in the style of {}", "a rendering in the style of {}",
                   "a cropped painting in the style of {}", "the painting in the style of {}",
                   "a clean painting in the style of {}", "a dirty painting in the style of {}",
                   "a dark painting in the style of {}", "a picture in the style of {}")
PLACEHOLDER = "<concept>"


@dataclass(frozen=True)
@judged_generation_options
class CCEConfig:
    """Concept Inversion with the paper's defaults (NYU-DICE-Lab/circumventing-concept-erasure).

    Args:
        steps: optimiser steps (paper 5000).
        learning_rate: base learning rate (paper 5e-3).
        scale_lr: multiply it by batch_size × gradient_accumulation (paper: yes, diffusers' --scale_lr).
        batch_size: images per micro-batch (paper 4).
        gradient_accumulation: micro-batches per step (paper 4).
        weight_decay: AdamW weight decay (diffusers' default 1e-2).
        num_train_images: images of the concept made by the original model (paper 25).
        learnable_property: "object" or "style": which caption templates (diffusers' lists).
        initializer_token: word whose embedding starts v* (default: tinyworld: the concept's attribute word,
            e.g. "shape"; else the concept's first token).
        image_prompts: prompts for the training images (default: tinyworld: scenes showing the concept; else
            "a photo of {concept}" / "a painting in the style of {concept}").
        templates: caption templates with "{}" for the placeholder (default: by learnable_property; tinyworld:
            each training image's own prompt with the concept's name replaced).
        concept: the concept (default: the judge's).
        num_inference_steps: sampling steps of generations (training images and judged images; None: default).
        guidance_scale: CFG scale of generations (None: the model's default).
    """

    steps: int = 5000
    learning_rate: float = 5e-3
    scale_lr: bool = True
    batch_size: int = 4
    gradient_accumulation: int = 4
    weight_decay: float = 1e-2
    num_train_images: int = 25
    learnable_property: Literal["object", "style"] = "object"
    initializer_token: str = ""
    image_prompts: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    concept: str = ""

    def __post_init__(self):
        if self.learnable_property not in ("object", "style"):
            raise ConfigError(f"learnable_property must be 'object' or 'style', got {self.learnable_property!r}")


CONFIG = CCEConfig
PRESETS = {
    "paper": CCEConfig(),
    "style": CCEConfig(learnable_property="style"),
    "tinyworld": CCEConfig(steps=100, batch_size=8, gradient_accumulation=1, learning_rate=5e-3,
                           num_train_images=16),
}


def _token_layout(tokenizer, caption: str) -> sd.Layout:
    """Caption with one placeholder slot (split at the placeholder; BPE works word by word, so exact)."""
    if caption.count(PLACEHOLDER) != 1:
        raise ConfigError(f"caption {caption!r} must contain the placeholder {PLACEHOLDER} exactly once")
    before, after = caption.split(PLACEHOLDER)
    items = sd.token_ids(tokenizer, before) + [("adv", 0)] + sd.token_ids(tokenizer, after)
    return sd.Layout(items[:75], 1, "prefix_k")


def _training_set(pipe, concept: str, config: CCEConfig, g: torch.Generator) -> tuple[list[str], list[list[str]]]:
    """(image prompts, captions per image) for the inversion."""
    import random

    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=g)))
    names = tinyworld_names(concept)
    if config.image_prompts:
        prompts = [config.image_prompts[i % len(config.image_prompts)] for i in range(config.num_train_images)]
    elif names and is_tinyworld(pipe):
        from ..tinyworld import ATTRIBUTES, Scene, canonical, concept_attribute

        attribute = concept_attribute(concept)
        scenes = []
        for _ in range(config.num_train_images):
            words = {a: rng.choice(list(ATTRIBUTES[a])) for a in ATTRIBUTES}
            words[attribute] = canonical(concept)
            scenes.append(Scene(**words))
        prompts = [s.prompt() for s in scenes]
    else:
        what = f"a painting in the style of {concept}" if config.learnable_property == "style" else f"a photo of {concept}"
        prompts = [what] * config.num_train_images
    if config.templates:
        captions = [[t.format(PLACEHOLDER) for t in config.templates]] * len(prompts)
    elif names and is_tinyworld(pipe):
        from ..tinyworld import TRAIN_TEMPLATES
        from .concepts import replace_name, tinyworld_scene

        captions = []
        for p in prompts:
            scene = tinyworld_scene(p)
            own = replace_name(p, find_name(p, names) or concept, PLACEHOLDER)
            variants = [own]
            if scene is not None:
                attribute = next(a for a in ("shape", "colour", "texture", "background")
                                 if getattr(scene, a) == names[0])
                variants += [scene.prompt(t, names={attribute: PLACEHOLDER}) for t in TRAIN_TEMPLATES]
            captions.append([c for c in dict.fromkeys(variants) if c.count(PLACEHOLDER) == 1])
    else:
        templates = STYLE_TEMPLATES if config.learnable_property == "style" else OBJECT_TEMPLATES
        captions = [[t.format(PLACEHOLDER) for t in templates]] * len(prompts)
    return prompts, captions


def _initializer(pipe, concept: str, config: CCEConfig) -> int:
    word = config.initializer_token
    if not word:
        names = tinyworld_names(concept)
        if names:
            from ..tinyworld import concept_attribute

            word = concept_attribute(concept).replace("colour", "color")
        else:
            word = concept
    ids = sd.token_ids(pipe.tokenizer, word)
    if not ids:
        raise ConfigError(f"initializer token {word!r} is empty after tokenisation")
    if len(ids) > 1:
        logger.info("initializer %r is %d tokens; using the first", word, len(ids))
    return ids[0]


@collapsed_t5_rows
def prepare(pipe, concept: str, config: CCEConfig, generator: torch.Generator | None = None,
            progress: bool = False) -> dict:
    """Learn the concept token on the erased ``pipe``: returns {"embedding_<i>": (D_i,) per text encoder, ...}."""
    from ..generate import generate

    started = time.perf_counter()
    g = generator if generator is not None else make_generator(None, 0, "cce", concept)
    device = sd.device_of(pipe)
    prompts, captions = _training_set(pipe, concept, config, g)
    seeds = [int(torch.randint(0, 2**31, (1,), generator=g)) for _ in prompts]
    with compose.disabled(pipe):
        images = generate(pipe, prompts, seeds, num_inference_steps=config.num_inference_steps,
                          guidance_scale=config.guidance_scale, batch_size=16)
    x0 = torch.cat([sd.encode_images(pipe, images[i:i + 16]) for i in range(0, len(images), 16)])
    init = _initializer(pipe, concept, config)
    embs = [e[init].float().clone().to(device).requires_grad_(True) for e in sd.token_embeddings(pipe)]
    lr = config.learning_rate * (config.batch_size * config.gradient_accumulation if config.scale_lr else 1)
    opt = torch.optim.AdamW(embs, lr=lr, weight_decay=config.weight_decay)
    layouts = [[_token_layout(pipe.tokenizer, c) for c in caps] for caps in captions]
    losses = []
    for _ in tqdm(range(config.steps), desc="concept inversion", disable=not progress, leave=False):
        grads = [torch.zeros_like(e) for e in embs]
        step_loss = 0.0
        for _ in range(config.gradient_accumulation):
            idx = randint(len(x0), g, (config.batch_size,))
            lays = [layouts[i][int(randint(len(layouts[i]), g))] for i in idx.tolist()]
            t = draw_timesteps(pipe, config.batch_size, g)  # SD3: logit-normal σ, as the model was trained
            noise = randn((config.batch_size,) + tuple(x0.shape[1:]), g, device)
            x_batch = x0[idx.to(x0.device)]
            x_t = sd.add_noise(pipe, x_batch, noise, t.to(device))
            ids = [torch.cat(x) for x in zip(*[sd.ids_per_encoder(pipe, lay.ids([0])) for lay in lays])]
            pos = torch.tensor([lay.slot_positions()[0] for lay in lays], device=device)
            rows = torch.arange(len(lays), device=device)

            def override(e):
                def fn(tok):
                    tok = tok.clone()
                    tok[rows, pos] = e.to(tok.dtype)
                    return tok
                return fn

            cond = sd.encode_ids(pipe, ids, [override(e) for e in embs])
            target = denoising_target(pipe, x_batch, noise)  # ε, or SD3's velocity ε − x0
            loss = F.mse_loss(sd.unet_eps(pipe, x_t, t, cond), target) / config.gradient_accumulation
            for acc, gr in zip(grads, torch.autograd.grad(loss, embs)):
                acc += gr
            step_loss += float(loss.detach())
        for e, gr in zip(embs, grads):
            e.grad = gr
        opt.step()
        for e in embs:
            e.grad = None
        losses.append(step_loss)
    state = {f"embedding_{i}": e.detach().cpu() for i, e in enumerate(embs)}
    state.update(steps=config.steps, final_loss=losses[-1] if losses else None, images=len(images),
                 seconds=round(time.perf_counter() - started, 3))
    return state


def attacked_prompt(prompt: str, concept: str) -> str:
    """``prompt`` with the concept's name (or a known synonym) replaced by the placeholder; appended if absent."""
    from .concepts import replace_name

    names = tinyworld_names(concept) or (concept,)
    name = find_name(prompt, names)
    return replace_name(prompt, name, PLACEHOLDER) if name else f"{prompt}, {PLACEHOLDER}"


def attack(pipe, prompt: str, config: CCEConfig, judge, generator: torch.Generator | None = None, *,
           seed: int = 0, target=None, state: dict | None = None, progress: bool = False, cache=None) -> AttackResult:
    """Put the learned concept token into ``prompt`` and judge the erased model's image (seed ``seed``)."""
    started = time.perf_counter()
    concept = concept_of(config, judge)
    if state is None:
        state = prepare(pipe, concept, config, make_generator(generator, 0, "cce", concept), progress=progress)
    device = sd.device_of(pipe)
    embs = [state[f"embedding_{i}"].to(device) for i in range(len(sd.encoders(pipe)))]
    adv = attacked_prompt(prompt, concept)
    lay = _token_layout(pipe.tokenizer, adv)
    with torch.no_grad():
        cond = sd.encode_ids(pipe, sd.ids_per_encoder(pipe, lay.ids([0])),
                              [sd.slot_override(lay, e[None, None]) for e in embs])
    image, score, hit = evaluate_cond(pipe, cond, seed, config, judge)
    info = {"per_concept_steps": int(state.get("steps", config.steps)), "inversion_loss": state.get("final_loss"),
            "inversion_seconds": state.get("seconds"), "queries": 1,
            "seconds": round(time.perf_counter() - started, 3)}
    return AttackResult(prompt, adv, hit, score, int(state.get("steps", config.steps)), image, info)
