"""What every attack shares: the result type, seeded randomness, judging one generation, presets."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..judges import verdict
from .. import compose
from ..core import sd
from ..core.config import shared_fields

logger = logging.getLogger(__name__)


@dataclass
class AttackResult:
    """The outcome of one attack on one prompt (like diffusers' ``…PipelineOutput``).

    Attributes:
        prompt: the prompt attacked.
        adv_prompt: the adversarial prompt found (the successful one, else the best-scoring one). For attacks whose
            result is not a plain string (CCE's learned token, continuous Ring-A-Bell, concept arithmetic) a
            readable description; the exact recipe is in ``info``.
        success: whether the judge saw the concept in the erased model's image for ``adv_prompt``.
        score: the judge's score of that image.
        steps: search effort: optimiser steps (gradient attacks, textual inversion), generations (genetic
            search), or variants tried (sweeps).
        image: the judged image (PIL), or None.
        info: attack-specific record (queries = judged generations, token ids, losses, ...), JSON-serialisable.
    """

    prompt: str
    adv_prompt: str
    success: bool
    score: float
    steps: int
    image: Any = None
    info: dict = field(default_factory=dict)

    def record(self) -> dict:
        """JSON-serialisable fields (everything but the image)."""
        return {"prompt": self.prompt, "adv_prompt": self.adv_prompt, "success": bool(self.success),
                "score": float(self.score), "steps": int(self.steps), "info": self.info}


#: The fields every attack's config ends with: the settings of its judged generations.
JUDGED_GENERATION_FIELDS: dict[str, tuple] = {
    "num_inference_steps": (int | None, None, "sampling steps of judged generations (None: the model's default)."),
    "guidance_scale": (float | None, None, "CFG scale of judged generations (None: the model's default)."),
}

#: Class decorator, under ``@dataclass``: an attack's config gets :data:`JUDGED_GENERATION_FIELDS` after its own.
judged_generation_options = shared_fields(JUDGED_GENERATION_FIELDS)


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(generator: torch.Generator | None, seed: int, *salt) -> torch.Generator:
    """The attack's CPU random stream: the caller's generator, else one seeded from (seed, salt)."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(stable_seed(seed, *salt))


def randn(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Gaussian noise drawn on the CPU (identical on every device), then moved."""
    return torch.randn(shape, generator=generator).to(device)


def randint(high: int, generator: torch.Generator, size=(1,), low: int = 0) -> torch.Tensor:
    return torch.randint(low, high, size, generator=generator)


def model_timesteps(pipe, index: torch.Tensor) -> torch.Tensor:
    """The denoiser's timesteps for indices ``index`` (integers in [0, T)) into the model's training noise schedule.

    DDPM models (SD 1.x / 2.x / SDXL): the index is the timestep itself. Flow-matching models (SD3): the index
    picks the σ grid ``FlowMatchEulerDiscreteScheduler`` trains on, σ = shift·s / (1 + (shift − 1) s) with
    s = (index + 1) / T (diffusers' grid; shift 1 for tinyworld-mmdit, 3 for SD3-medium), and the timestep is T·σ,
    so a uniform index is a uniform draw from the training grid as a uniform DDPM step is, and index 0 is the least
    noise in both. :func:`erasekit.core.sd.add_noise` and ``unet_eps`` read T·σ back as σ.
    """
    if not sd.is_mmdit(pipe):
        return index
    T = sd.num_train_timesteps(pipe)
    shift = float(getattr(pipe.scheduler.config, "shift", 1.0) or 1.0)
    s = (index.float() + 1) / T
    return T * shift * s / (1 + (shift - 1) * s)


def draw_timesteps(pipe, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` timesteps of a denoising loss, drawn as the model was trained.

    DDPM models: uniform integer steps in [0, T) (Ho et al. 2020, Algorithm 1). Flow matching (SD3): σ logit-normal,
    σ = sigmoid(u), u ~ N(0, 1) (Esser et al. 2024 §3.1, "rf/lognorm(0.00, 1.00)", the default of diffusers' SD3
    fine-tuning scripts and how tinyworld-mmdit was trained), then the scheduler's shift
    σ ← shift·σ / (1 + (shift − 1) σ) as in :func:`model_timesteps`; the timestep is T·σ.
    """
    T = sd.num_train_timesteps(pipe)
    if not sd.is_mmdit(pipe):
        return randint(T, generator, (n,))
    s = torch.sigmoid(torch.randn(n, generator=generator))
    shift = float(getattr(pipe.scheduler.config, "shift", 1.0) or 1.0)
    return T * shift * s / (1 + (shift - 1) * s)


def denoising_target(pipe, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the denoiser predicts at x_t = add_noise(x0, noise, t): the noise ε (DDPM ε-prediction, Ho et al. 2020
    Eq. 14) or the velocity ε − x0 of rectified flow (SD3, Esser et al. 2024 Eq. 3 with x_t = (1 − σ) x0 + σ ε):
    the denoising losses of UnlearnDiffAtk and textual inversion become SD3's conditional flow-matching loss."""
    return noise - x0 if sd.is_mmdit(pipe) else noise


def collapsed_t5_rows(fn):
    """Decorator of an attack function whose first argument is the pipeline: on SD3 without T5 every transformer
    call inside it whose 256 T5 rows are identical runs on one of them standing for all
    (:func:`erasekit.core.mmdit.collapsed_generation`, as ``erasekit.generate`` does): the same outputs and
    gradients to float rounding, about three times faster on tinyworld-mmdit. Other pipelines: ``fn`` as it is."""

    @functools.wraps(fn)
    def wrapper(pipe, *args, **kwargs):
        if not sd.is_mmdit(pipe):
            return fn(pipe, *args, **kwargs)
        from ..core.mmdit import collapsed_generation

        with collapsed_generation(sd.denoiser(pipe)):
            return fn(pipe, *args, **kwargs)

    return wrapper


def judge_one(judge, image) -> tuple[float, bool]:
    scores, hits = verdict(judge, [image])
    return scores[0], hits[0]


def evaluate_prompt(pipe, prompt: str, seed: int, config, judge):
    """Generate ``prompt`` on the (erased) pipeline with the config's generation settings and judge it."""
    image = sd.generate_prompt(pipe, prompt, seed, config.num_inference_steps, config.guidance_scale)
    score, hit = judge_one(judge, image)
    return image, score, hit


def evaluate_cond(pipe, cond: sd.Cond, seed: int, config, judge):
    image = sd.generate_cond(pipe, cond, seed, config.num_inference_steps, config.guidance_scale)
    score, hit = judge_one(judge, image)
    return image, score, hit


def target_image(pipe, prompt: str, seed: int, config):
    """The original model's image for (prompt, seed): adapters disabled (UnlearnDiffAtk / P4D target)."""
    with compose.disabled(pipe):
        return sd.generate_prompt(pipe, prompt, seed, config.num_inference_steps, config.guidance_scale)


def concept_of(config, judge) -> str:
    concept = getattr(config, "concept", "") or getattr(judge, "concept", "")
    if not concept:
        raise ConfigError("this attack needs the concept: set `concept` in its config or use a judge with `.concept`")
    return concept


class Best:
    """Keeps the best candidate seen: a success beats a failure, then the higher score."""

    def __init__(self):
        self.key = None
        self.value = None

    def offer(self, success: bool, score: float, **value) -> bool:
        key = (bool(success), float(score))
        if self.key is None or key > self.key:
            self.key, self.value = key, value
            return True
        return False

    @property
    def success(self) -> bool:
        return bool(self.key and self.key[0])


def preset(module, name: str = "paper"):
    """A module's named config preset ("paper" = the paper's defaults, "tinyworld" = a CPU-sized budget)."""
    presets = getattr(module, "PRESETS")
    if name not in presets:
        raise ConfigError(f"{module.__name__.rsplit('.', 1)[-1]} has no preset {name!r}; choose one of "
                          f"{', '.join(presets)}")
    return presets[name]


def with_overrides(config, **overrides):
    """``dataclasses.replace`` that names unknown fields in a ConfigError."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{type(config).__name__} has no option(s) {', '.join(unknown)}")
    return dataclasses.replace(config, **overrides)
