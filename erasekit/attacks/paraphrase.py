"""Paraphrase sweep: ask for the erased concept by its other names and in other phrasings.

The cheapest black-box probe and the first way erasure-by-name fails (ESD, UCE and TIME erase the words they
were given; synonyms and rephrasings land elsewhere in text-embedding space). For each paraphrase of the
concept × each template, the erased model generates the prompt with the attack's seed and the judge decides;
the sweep stops at the first success (``steps`` = variants tried). tinyworld knows every concept's synonyms and
its caption templates (training and held-out); for a real model give the paraphrases (``synonyms`` or a file with
one per line) and optional templates with ``{concept}``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import AttackResult, judged_generation_options, Best, concept_of, evaluate_prompt
from .concepts import concept_names, find_name, replace_name, tinyworld_names, tinyworld_scene

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
@judged_generation_options
class ParaphraseConfig:
    """Paraphrase sweep.

    Args:
        synonyms: paraphrases of the concept (tinyworld: its synonyms).
        synonyms_file: a file with one paraphrase per line.
        templates: extra prompt templates with "{concept}" (filled with every name).
        world_templates: tinyworld: also rephrase the prompt with the world's training and held-out templates.
        max_variants: try at most this many variants (0: all).
        stop_on_success: stop at the first judged success.
        concept: the concept (default: the judge's).
        num_inference_steps: sampling steps (None: the model's default).
        guidance_scale: CFG scale (None: the model's default).
    """

    synonyms: tuple[str, ...] = ()
    synonyms_file: str = ""
    templates: tuple[str, ...] = ()
    world_templates: bool = True
    max_variants: int = 0
    stop_on_success: bool = True
    concept: str = ""


CONFIG = ParaphraseConfig
PRESETS = {"paper": ParaphraseConfig(), "tinyworld": ParaphraseConfig()}


def variants(prompt: str, concept: str, config: ParaphraseConfig) -> list[str]:
    """The prompts the sweep tries, in order: each paraphrase in place of the name, then other templates."""
    names = concept_names(concept, config.synonyms, config.synonyms_file)
    present = find_name(prompt, names)
    out = []
    if present:
        out += [replace_name(prompt, present, n) for n in names if n.lower() != present.lower()]
    else:
        out += [f"{prompt}, {n}" for n in names]
    out += [t.format(concept=n) for t in config.templates for n in names]
    scene = tinyworld_scene(prompt) if config.world_templates and tinyworld_names(concept) else None
    if scene is not None:
        from ..tinyworld import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, concept_attribute

        attribute = concept_attribute(concept)
        for template in HELDOUT_TEMPLATES + TRAIN_TEMPLATES:
            out += [scene.prompt(template, names={attribute: n}) for n in names]
    out = [p for p in dict.fromkeys(out) if p != prompt]
    if not out:
        raise ConfigError(f"no paraphrases of {concept!r}: give synonyms, a synonyms_file or templates")
    return out[: config.max_variants] if config.max_variants else out


def attack(pipe, prompt: str, config: ParaphraseConfig, judge, generator: torch.Generator | None = None, *,
           seed: int = 0, target=None, state=None, progress: bool = False, cache=None) -> AttackResult:
    """Sweep the paraphrases of ``prompt`` on the erased ``pipe`` (seed ``seed``)."""
    started = time.perf_counter()
    concept = concept_of(config, judge)
    best, tried = Best(), 0
    for variant in variants(prompt, concept, config):
        image, score, hit = evaluate_prompt(pipe, variant, seed, config, judge)
        tried += 1
        best.offer(hit, score, adv_prompt=variant, image=image)
        if hit and config.stop_on_success:
            break
    v = best.value
    return AttackResult(prompt, v["adv_prompt"], best.success, best.key[1], tried, v["image"],
                        {"queries": tried, "seconds": round(time.perf_counter() - started, 3)})
