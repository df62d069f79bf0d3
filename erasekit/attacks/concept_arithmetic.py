"""Concept arithmetic (Petsiuk & Saenko, "Concept Arithmetics for Circumventing Concept Inhibition in Diffusion
Models", ECCV 2024, https://arxiv.org/abs/2404.13706).

No optimisation: several prompts are composed in one generation with compositional guidance
(Liu et al., "Compositional Visual Generation with Composable Diffusion Models", ECCV 2022, Eq. 11)

    ε̂ = ε(x_t | ∅) + Σ_i w_i [ε(x_t | c_i) − ε(x_t | ∅)],

so that concepts the erasure did not inhibit add up to the one it did — e.g. "a red disc" + "a red round shape"
− "a red square" for an erased "circle". A negative weight subtracts a concept. The sampler is a small explicit
denoising loop over the pipeline's own scheduler, UNet and VAE (``sd.sample_composed``; with one term it equals
the pipeline's own output, tested). On SD3 the same sum is taken over the transformer's velocities v̂: the noise
prediction a velocity implies, ε̂ = x_t + (1 − σ) v̂ (x_t = (1 − σ) x0 + σ ε), is affine in v̂, so composing velocities
composes the noise predictions (the scores) exactly as Eq. 11 does — no change to the recipe.

Default recipe (when ``terms`` is not given), for a prompt that names the concept: the prompt with each
paraphrase of the concept in its place (weights summing to the guidance scale), minus the prompt with each
``subtract`` concept in its place (tinyworld default: another value of the concept's attribute). Each of
``scales`` multiplies the weights in turn until the judge sees the concept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..core import sd
from .base import AttackResult, Best, collapsed_t5_rows, concept_of, judge_one, judged_generation_options
from .concepts import concept_names, find_name, replace_name, tinyworld_names

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
@judged_generation_options
class ConceptArithmeticConfig:
    """Concept arithmetic.

    Args:
        terms: explicit recipe: (prompt, weight) pairs, weights in units of the guidance scale; "{prompt}" in a
            term's prompt is replaced by the attacked prompt. Empty: the default recipe.
        synonyms: paraphrases of the concept for the default recipe (tinyworld: its synonyms).
        synonyms_file: a file with one paraphrase per line (real models).
        subtract: concepts subtracted in the default recipe (tinyworld default: one other value of the attribute).
        negative_weight: total weight of the subtracted terms, relative to the positive ones.
        scales: multipliers of the weights, tried in turn (stop at the first success).
        stop_on_success: stop at the first judged success.
        concept: the concept (default: the judge's).
        num_inference_steps: sampling steps (None: the model's default).
        guidance_scale: total positive weight (None: the model's default CFG scale).
    """

    terms: tuple[tuple[str, float], ...] = ()
    synonyms: tuple[str, ...] = ()
    synonyms_file: str = ""
    subtract: tuple[str, ...] = ()
    negative_weight: float = 0.5
    scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    stop_on_success: bool = True
    concept: str = ""


CONFIG = ConceptArithmeticConfig
#: tinyworld: smaller scales tried too (with the paper's 1–2 alone, 4 of 6 solid-circle prompts on the *base* model
#: come back as circles; with 0.75 and 0.5 as well, 10 of 10 circle prompts do)
PRESETS = {"paper": ConceptArithmeticConfig(),
           "tinyworld": ConceptArithmeticConfig(scales=(1.0, 0.75, 1.5, 0.5, 2.0))}


def recipe(prompt: str, concept: str, config: ConceptArithmeticConfig) -> list[tuple[str, float]]:
    """(prompt, relative weight) terms; positive weights sum to 1, negative ones to −negative_weight."""
    if config.terms:
        return [(p.replace("{prompt}", prompt), float(w)) for p, w in config.terms]
    names = concept_names(concept, config.synonyms, config.synonyms_file)
    paraphrases = [n for n in names[1:]]
    if not paraphrases:
        raise ConfigError(f"concept arithmetic needs paraphrases of {concept!r} (synonyms / synonyms_file) or "
                          "explicit terms")
    subtract = list(config.subtract)
    known = tinyworld_names(concept)
    if not subtract and known:
        from ..tinyworld import ATTRIBUTES, canonical, concept_attribute

        others = [c for c in ATTRIBUTES[concept_attribute(concept)] if c != canonical(concept)]
        subtract = others[:1]
    present = find_name(prompt, names)
    if present:
        positives = [replace_name(prompt, present, p) for p in paraphrases]
        negatives = [replace_name(prompt, present, s) for s in subtract]
    else:
        positives = [f"{prompt}, {p}" for p in paraphrases]
        negatives = [f"{prompt}, {s}" for s in subtract]
    terms = [(p, 1.0 / len(positives)) for p in positives]
    terms += [(n, -config.negative_weight / len(negatives)) for n in negatives]
    return terms


def describe(terms: list[tuple[str, float]]) -> str:
    out = ""
    for i, (p, w) in enumerate(terms):
        sign = "−" if w < 0 else ("+" if i else "")
        out += f" {sign} {abs(w):.2g}·[{p}]" if i or w < 0 else f"{abs(w):.2g}·[{p}]"
    return out.strip()


@collapsed_t5_rows
def attack(pipe, prompt: str, config: ConceptArithmeticConfig, judge, generator: torch.Generator | None = None, *,
           seed: int = 0, target=None, state=None, progress: bool = False, cache=None) -> AttackResult:
    """Compose the recipe's prompts on the erased ``pipe``; try each scale until the judge sees the concept."""
    started = time.perf_counter()
    concept = concept_of(config, judge)
    terms = recipe(prompt, concept, config)
    _, guidance = sd.generation_settings(pipe, config.num_inference_steps, config.guidance_scale)
    conds = sd.encode(pipe, [p for p, _ in terms])
    best, tried = Best(), 0
    for scale in config.scales:
        weighted = [(conds[i:i + 1], w * guidance * scale) for i, (_, w) in enumerate(terms)]
        image = sd.sample_composed(pipe, weighted, seed, config.num_inference_steps)
        score, hit = judge_one(judge, image)
        tried += 1
        best.offer(hit, score, image=image, scale=scale)
        if hit and config.stop_on_success:
            break
    v = best.value
    return AttackResult(
        prompt=prompt, adv_prompt=describe([(p, w * v["scale"]) for p, w in terms]), success=best.success,
        score=best.key[1], steps=tried, image=v["image"],
        info={"terms": [[p, w] for p, w in terms], "scale": v["scale"], "guidance_scale": guidance,
              "queries": tried, "seconds": round(time.perf_counter() - started, 3)})
