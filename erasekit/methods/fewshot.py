"""Few-shot concept erasing in the text encoder (Fuchi & Takagi, BMVC 2024, https://arxiv.org/abs/2405.07288;
authors' code ``fmp453/few-shot-erasing`` ``train.py``).

Gradient *ascent* on the denoising loss of a handful of images x⁽ⁱ⁾ of the concept, captioned with
Textual-Inversion templates, with respect to the text encoder τ_φ only (UNet and VAE frozen):

    max_φ  E_{i, t, ε} ‖ε − ε_θ(√ᾱ_t z⁽ⁱ⁾ + √(1−ᾱ_t) ε, t, τ_φ(caption_i))‖²,     z⁽ⁱ⁾ = VAE(x⁽ⁱ⁾)

(the code's ``loss = −MSE``; no preservation term, no anchor). Trainable (the authors' ``mlp-final-attn``): the
MLPs (``fc1``/``fc2``) of every encoder layer and the self-attention of the last one. The paper's finding is that
the concept's knowledge sits mostly in the feed-forward layers, and that ~10 optimiser steps suffice.

Images: a folder given by the user, or on tinyworld ``num_images`` fresh renders of the concept captioned in
tinyworld's own templates (the image's other attributes named, the concept by the name the user gave).
``zero_shot`` replaces the images by uniform random latents (the code's ``--is_zero_shot``).

Differences from the authors' code: Adam runs with the shared loop's defaults (β₂ 0.999, ε 1e-8; the authors use
β₂ 0.98, ε 1e-6, weight decay 1e-8); latents are the VAE posterior mean; batches are drawn from a per-epoch seeded
permutation so that a resumed run is identical.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..adapter import Adapter
from ..core import sd
from ..errors import ConfigError
from . import te
from .trainer import latent_shape, step_generator, training_options, validate_training

#: The authors' settings for SD 1.4/1.5 (``train.py`` argparse defaults; the README example uses 4 epochs).
PAPER_SD = dict(epochs=5, batch_size=2, lr=1e-5, rank=0, num_images=4)

#: Textual Inversion's caption templates (a subset of ``imagenet_templates_small`` / ``_style_small``, which the
#: authors' ``data.py`` uses).
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}",
    "a close-up photo of a {}", "a bright photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a rendition of the {}", "a photo of a nice {}", "a photo of the small {}", "a photo of the large {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dark painting in the style of {}",
    "a picture in the style of {}", "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a good painting in the style of {}", "a rendition in the style of {}",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

TrainMethod = Literal["mlp-final-attn", "mlp", "all"]


@dataclass(frozen=True)
@training_options
class FewShotConfig:
    """Defaults are sized for tinyworld on a CPU; the authors' SD settings are ``PAPER_SD``.

    Args:
        concepts: the concept to erase, e.g. ("circle",) (several: their images are pooled, each captioned with its
            own name).
        images: folder of images of the concept (several concepts: one subfolder per concept, named as the
            concept). Empty: ``tinyworld_images`` (which the presets turn on, on tinyworld).
        tinyworld_images: train on ``num_images`` fresh tinyworld renders of each concept (needs tinyworld concepts).
        num_images: how many tinyworld renders per concept (with ``images``: at most this many files; 0 = all).
        concept_type: "object" or "style": which Textual-Inversion caption templates (not used for renders).
        templates: caption templates overriding those, "{}" standing for the concept.
        zero_shot: train on uniform random latents instead of images (the authors' zero-shot variant).
        train_method: trainable Linear layers: "mlp-final-attn" (every MLP + last layer's self-attention, the
            authors'), "mlp", or "all" (every Linear of every layer).
        epochs: passes over the images (authors 5).
        batch_size: images per step (authors 2).
        lr: Adam learning rate (authors 1e-5).
        rank: rank of each delta; 0 trains full deltas, as the authors (who save the whole encoder).
        resolution: image side in pixels (0 = the model's own).
        seed: seed of the renders, the initialisation and every step's noise.
    """

    concepts: tuple[str, ...]
    images: str = ""
    tinyworld_images: bool = False
    num_images: int = 8
    concept_type: Literal["object", "style"] = "object"
    templates: tuple[str, ...] = ()
    zero_shot: bool = False
    train_method: TrainMethod = "mlp-final-attn"
    epochs: int = 8
    batch_size: int = 4
    lr: float = 1e-3
    rank: int = 0
    resolution: int = 0

    def __post_init__(self):
        validate_training(self)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.num_images < 0:
            raise ConfigError(f"num_images must be ≥ 0, got {self.num_images}")
        if self.concept_type not in ("object", "style"):
            raise ConfigError(f"concept_type must be 'object' or 'style', got {self.concept_type!r}")
        if self.train_method not in ("mlp-final-attn", "mlp", "all"):
            raise ConfigError(f"train_method must be mlp-final-attn, mlp or all, got {self.train_method!r}")


def module_selection(train_method: str) -> Callable[[str, int, int], bool]:
    """``include(path, layer, num_layers)`` for :func:`erasekit.methods.te.select` (authors' ``utils.py``)."""
    if train_method == "all":
        return lambda path, layer, total: True
    if train_method == "mlp":
        return lambda path, layer, total: ".mlp." in path
    return lambda path, layer, total: ".mlp." in path or (".self_attn." in path and layer == total - 1)


# ------------------------------------------------------------------------------------------------- data
def tinyworld_examples(config) -> tuple[list, list[str]]:
    """``num_images`` renders per concept (random scenes showing it) and their captions."""
    from ..tinyworld import world

    rng = random.Random(config.seed)
    images, captions = [], []
    for concept in config.concepts:
        try:
            attribute, name = world.concept_attribute(concept), world.canonical(concept)
        except KeyError as e:
            raise ConfigError(f"{concept!r} is no tinyworld concept; give an image folder with images=") from e
        for _ in range(config.num_images or 8):
            scene = world.random_scene(rng)
            scene = dataclasses.replace(scene, **{attribute: name})
            words = {a: concept if a == attribute else
                     "" if a != "shape" and rng.random() < 0.15 else rng.choice(table[getattr(scene, a)])
                     for a, table in world.ATTRIBUTES.items()}
            templates = [t.replace("{}", "{%s}" % attribute) for t in config.templates] or world.TRAIN_TEMPLATES
            images.append(world.render(scene, rng))
            captions.append(world.fill_template(rng.choice(templates), words))
    return images, captions


def folder_examples(config) -> tuple[list, list[str]]:
    """Images from ``config.images`` (one subfolder per concept when there are several), captioned with templates."""
    from PIL import Image

    root = Path(config.images).expanduser()
    rng = random.Random(config.seed)
    templates = config.templates or (STYLE_TEMPLATES if config.concept_type == "style" else OBJECT_TEMPLATES)
    images, captions = [], []
    for concept in config.concepts:
        folder = root / concept if len(config.concepts) > 1 else root
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        for path in files[: config.num_images or None]:
            images.append(Image.open(path).convert("RGB"))
            captions.append(rng.choice(templates).replace("{}", concept))
    return images, captions


def examples(pipe, config) -> tuple[torch.Tensor, list[str]]:
    """(latents (N, C, h, w), captions) of the training images."""
    if config.images:
        images, captions = folder_examples(config)
    elif config.tinyworld_images:
        images, captions = tinyworld_examples(config)
    elif config.zero_shot:
        rng = random.Random(config.seed)
        templates = config.templates or (STYLE_TEMPLATES if config.concept_type == "style" else OBJECT_TEMPLATES)
        captions = [rng.choice(templates).replace("{}", c) for c in config.concepts for _ in range(config.num_images or 4)]
        images = None
    else:
        raise ConfigError("few-shot erasing needs images of the concept: set images= to a folder (or zero_shot=True)")
    shape = latent_shape(pipe, len(captions), config.resolution)
    if config.zero_shot:  # the authors' zero-shot variant: torch.rand latents
        return torch.rand(shape, generator=torch.Generator().manual_seed(config.seed)).to(sd.device_of(pipe)), captions
    if config.resolution:
        side = shape[-1] * int(pipe.vae_scale_factor)
        x = sd.image_tensor(pipe, images, side, side).to(sd.device_of(pipe), pipe.vae.dtype)
        with torch.no_grad():
            return (pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor).float(), captions
    return sd.encode_images(pipe, images), captions


# ------------------------------------------------------------------------------------------------- loss
def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def objective(pipe, config: FewShotConfig, latents: torch.Tensor, captions: list[str]) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator)``: −MSE of the denoising loss on one batch (module docstring)."""
    n = len(captions)
    per_epoch = steps_per_epoch(n, config.batch_size)
    T = sd.num_train_timesteps(pipe)

    def loss_for(deltas):
        def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
            epoch, i = divmod(step, per_epoch)  # shuffled once per epoch, from the epoch's own generator
            order = torch.randperm(n, generator=step_generator(config.seed + 1, epoch)).tolist()
            rows = order[i * config.batch_size:(i + 1) * config.batch_size]
            z0 = latents[rows]
            noise = torch.randn(z0.shape, generator=gen).to(z0.device)
            t = torch.randint(T, (len(rows),), generator=gen).to(z0.device)
            x_t = sd.add_noise(pipe, z0, noise, t)
            eps = sd.unet_eps(pipe, x_t, t, te.encode(pipe, [captions[r] for r in rows]))
            return -F.mse_loss(eps, sd.prediction_target(pipe, z0, noise))

        return loss_fn

    return loss_for


def erase(pipe, config: FewShotConfig) -> Adapter:
    """Train a few-shot text-encoder adapter; ``pipe`` is left as it was (no hooks, same weights)."""
    names = te.select(pipe, module_selection(config.train_method))
    latents, captions = examples(pipe, config)
    steps = config.epochs * steps_per_epoch(len(captions), config.batch_size)
    return te.train(pipe, config, names, objective(pipe, config, latents, captions), "fewshot", steps)


__all__ = ["FewShotConfig", "OBJECT_TEMPLATES", "PAPER_SD", "STYLE_TEMPLATES", "erase", "examples", "objective"]
