"""Paired suppression: the UNet taught, on noised images *of* the concept, to denoise them into the same picture with
a partner in its place, whatever the text conditioning.

Every text-side erasure changes what the UNet does *given a text*: ESD's targets are the frozen model's predictions
under the concept's prompt (or an anchor's, or an attacked one), so a conditioning the training never met (a soft
prompt, a learned token) can still reach a UNet that draws the concept. Here the target lives in the image domain.
Concept Ablation (Kumari et al., ICCV 2023, https://arxiv.org/abs/2303.13516, Eq. 3) sends the concept's
distribution to an anchor's; this method makes it *paired* and text-independent. For a pair (z_c, z_p) of latents
showing the same scene with the concept and with its partner (tinyworld: the same render with circle → square; a
real model: the concept's and the partner's prompt from the same initial noise), the x₀ the student should predict
from ``x_t = √ᾱ z_c + √(1−ᾱ) ε`` is z_p, i.e. (DDPM's ε-parametrisation, Ho et al. 2020 Eq. 4)

    ε*(x_t) = (x_t − √ᾱ z_p) / √(1−ᾱ) = ε + √(ᾱ/(1−ᾱ)) (z_c − z_p),
    L_erase = E w(t) ‖ε_θ(x_t, t, c) − ε*‖²,   w(t) = min(1, (1−ᾱ)/ᾱ)

(the weight keeps the low-noise end, where ε* is large, from dominating; v-prediction models get ``√ᾱ ε* − √(1−ᾱ)
z_p``). The conditioning ``c`` of each sample is drawn from five kinds (``condition_shares``, in the order of
:data:`CONDITIONS`): the pair's concept caption; its partner caption; no text; a random token string; the concept
caption's encoding with Gaussian noise of ``hidden_noise`` × its per-token scale added (the text encoder's output
space, where soft prompts live). A share ``random_words`` of the random strings are words of the training captions
instead of vocabulary tokens: the hard prompts the discrete attacks find (P4D's "circle circle shapes …", "violet
purple starburst hollow …") are such word strings, under which a colourless prompt drew red again (on red, 0.75 of
them took P4D from 67 % to 0–33 % in four runs, but not the other attacks with it, at 3.8–13 points lost on the
other colours: docs/notes-robust.md; off in the presets). A distillation term holds everything else at the frozen
model (``‖ε_θ(x_t, t, c_k) − ε_θ₀(x_t, t, c_k)‖²`` on noised images the concept is not in: on tinyworld renders of
scenes without it, elsewhere the partner's images and the ``preserve`` prompts' generations; a tenth of them
unconditioned), weighted ``preserve_weight``.

With ``adversary_steps``, before each update from ``adversary_start`` on, a soft-prompt attack on the student
(UnlearnDiffAtk's 3 free tokens before the caption on even steps, 16 free tokens alone on odd ones, each warm-started
from its last round and checkpointed: ESD's adversary, :func:`erasekit.methods.esd.adversary_threats`) searches the
conditioning under which the student denoises the first sample's concept image back into itself (AdvUnlearn's inner
maximisation, Zhang et al., NeurIPS 2024, Eq. 4); that sample is then trained under it.

The trained modules are ESD-u's by default (every Linear/Conv2d outside cross-attention, ``train_method``), full
rank. On tinyworld (issue #22 §2, docs/notes-robust.md) circle → square with the registry's preset (1600 updates,
each after a 10-step attack): the six attacks bring circle back in one attacked image of six (seeds 0–1 and 2–3),
100 % erased under every name, 0.4 points lost on the other shapes, no circle in 40 held-out phrasings.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapter import Adapter
from ..attacks.unlearndiffatk import soft_prompt_attack
from ..core import lora, sd
from ..errors import ConfigError
from . import esd
from .trainer import (Cond, check_prompts, encode, latent_shape, predict, train, training_options,
                      validate_training)

#: the kinds of conditioning a concept sample is trained under, in the order of ``condition_shares``
CONDITIONS = ("concept", "partner", "empty", "random_tokens", "noisy_hidden")
#: captions drawn per tinyworld render (each step picks one)
CAPTIONS_PER_IMAGE = 4


@dataclass(frozen=True)
@training_options
class PairedConfig:
    """Defaults are sized for tinyworld on a CPU (the registry's preset sets the recipe).

    Args:
        concepts: what to erase, e.g. ("circle",); several: their pairs are pooled.
        partners: what each concept's images become, one for all or one per concept ("square" for circle; a real
            model: a prompt, e.g. "a dressed person" for nudity). Empty: on tinyworld with ``partner_related``, the
            concept's first sibling not erased.
        partner_related: on tinyworld, each concept's partner is its first sibling that is not erased.
        templates: prompts a real model generates the pairs from, "{}" standing for the concept or the partner
            (empty: the bare words); not used for tinyworld renders.
        tinyworld_images: train on tinyworld renders (the same scene with the concept and with its partner) instead
            of the model's own generations (the presets turn it on, on tinyworld).
        num_images: pairs per concept (and, on tinyworld, renders without the concepts held).
        preserve: prompts whose generated images the distillation term holds, besides the partners' (real models).
        preserve_weight: weight of the distillation term (0: none).
        condition_shares: shares of the conditioning kinds :data:`CONDITIONS` (concept caption, partner caption, no
            text, random tokens, noisy concept encoding), normalised.
        hidden_noise: σ of the noise added to a noisy encoding, relative to each token row's standard deviation.
        random_words: share of the random strings drawn as 1–16 words of the training captions (concept, partner
            and held captions) rather than 1–12 vocabulary tokens.
        adversary_steps: steps of the soft-prompt attack on the student before each update (0: none; SD 1.x/2.x).
        adversary_start: the update from which the adversary runs.
        train_method: the UNet modules trained (ESD's module sets: esd-u, esd-x, esd-x-strict, esd-all).
        iterations: optimisation steps.
        lr: Adam learning rate (constant).
        rank: rank of each delta; 0 trains full-rank deltas.
        batch_size: concept samples per step (as many held samples).
        resolution: image side in pixels of generated pairs (0 = the model's own).
        num_inference_steps: sampler steps of a generated pair.
        guidance_scale: classifier-free guidance of a generated pair.
        gradient_checkpointing: recompute UNet activations in the backward pass to save memory.
    """

    concepts: tuple[str, ...]
    partners: tuple[str, ...] = ()
    partner_related: bool = False
    templates: tuple[str, ...] = ()
    tinyworld_images: bool = False
    num_images: int = 64
    preserve: tuple[str, ...] = ()
    preserve_weight: float = 1.0
    condition_shares: tuple[float, ...] = (0.35, 0.1, 0.15, 0.2, 0.2)
    hidden_noise: float = 1.0
    random_words: float = 0.0
    adversary_steps: int = 0
    adversary_start: int = 0
    train_method: esd.TrainMethod = "esd-u"
    iterations: int = 1000
    lr: float = 1e-4
    rank: int = 0
    batch_size: int = 16
    resolution: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    gradient_checkpointing: bool = False

    def __post_init__(self):
        validate_training(self)
        for name in ("iterations", "batch_size", "num_images", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("preserve_weight", "hidden_noise", "adversary_steps", "adversary_start", "guidance_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        check_prompts(self, "partners")
        if len(self.partners) not in (0, 1, len(self.concepts)):
            raise ConfigError(f"partners must be one for all concepts or one per concept ({len(self.concepts)}), "
                              f"got {len(self.partners)}")
        erased = {c.strip() for c in self.concepts}
        named = [p for p in self.partners if p.strip() in erased]
        if named:
            raise ConfigError(f"partner {named[0]!r} is one of the concepts being erased")
        check_prompts(self, "preserve")
        if (len(self.condition_shares) != len(CONDITIONS) or any(not s >= 0 for s in self.condition_shares)
                or not sum(self.condition_shares) > 0):
            raise ConfigError(f"condition_shares must be {len(CONDITIONS)} shares ≥ 0 ({', '.join(CONDITIONS)}), "
                              f"not all zero; got {self.condition_shares!r}")
        if not 0 <= self.random_words <= 1:
            raise ConfigError(f"random_words must be a share in [0, 1], got {self.random_words}")
        if self.train_method not in esd.PRESETS:
            raise ConfigError(f"train_method must be one of {', '.join(esd.PRESETS)}, got {self.train_method!r}")
        if self.rank < 0:
            raise ConfigError(f"rank must be ≥ 0, got {self.rank}")


def partners_of(config: PairedConfig) -> list[str]:
    """Each concept's partner (ConfigError when none is given: only tinyworld's presets can choose one)."""
    if not config.partners:
        raise ConfigError("paired suppression needs partners: what each concept's images become, e.g. "
                          "partners=('square',) for circle (--partners); on tinyworld partner_related chooses them")
    return list(config.partners) * (len(config.concepts) if len(config.partners) == 1 else 1)


# ------------------------------------------------------------------------------------------------- data
@dataclass
class Pairs:
    """Training data: latents of the concept and of its partner (same scene), the captions of each pair (concept,
    partner; several per pair on tinyworld), and held latents with their captions."""

    concept: torch.Tensor
    partner: torch.Tensor
    captions: list[list[tuple[str, str]]]
    held: torch.Tensor
    held_captions: list[list[str]]


def tinyworld_pairs(pipe, config: PairedConfig) -> Pairs:
    """``num_images`` renders per concept with their partner in its place (one rng state renders both: the same
    place, size, colour, texture and background), and as many renders of scenes that show none of the concepts."""
    from ..tinyworld import world

    rng = random.Random(config.seed)
    attributes, names = [], []
    for concept in config.concepts:
        try:
            attributes.append(world.concept_attribute(concept))
            names.append(world.canonical(concept))
        except KeyError as e:
            raise ConfigError(f"{concept!r} is no tinyworld concept (one of {', '.join(world.concept_names())}); "
                              "train on the model's own images (tinyworld_images=False)") from e
    partners = partners_of(config)
    for partner, attribute in zip(partners, attributes):
        if partner not in world.ATTRIBUTES[attribute]:
            raise ConfigError(f"partner {partner!r} is no tinyworld {attribute}; one of "
                              f"{', '.join(world.ATTRIBUTES[attribute])}")
    concept_images, partner_images, captions = [], [], []
    for name, partner, attribute in zip(names, partners, attributes):
        for _ in range(config.num_images):
            scene = dataclasses.replace(world.random_scene(rng), **{attribute: name})
            paired = dataclasses.replace(scene, **{attribute: partner})
            state = rng.randrange(2**31)
            concept_images.append(world.render(scene, random.Random(state)))
            partner_images.append(world.render(paired, random.Random(state)))
            words = [rng.randrange(2**31) for _ in range(CAPTIONS_PER_IMAGE)]  # one phrasing for both captions
            captions.append([(world.caption(scene, random.Random(w)), world.caption(paired, random.Random(w)))
                             for w in words])
    held, held_captions = [], []
    erased = set(zip(attributes, names))
    while len(held) < config.num_images * len(names):
        scene = world.random_scene(rng)
        if not any(getattr(scene, a) == n for a, n in erased):
            held.append(world.render(scene, rng))
            held_captions.append([world.caption(scene, rng) for _ in range(CAPTIONS_PER_IMAGE)])
    return Pairs(latents(pipe, concept_images), latents(pipe, partner_images), captions, latents(pipe, held),
                 held_captions)


@torch.no_grad()
def latents(pipe, images, chunk: int = 256) -> torch.Tensor:
    """x₀ latents of images, encoded in chunks (:func:`erasekit.core.sd.encode_images`)."""
    return torch.cat([sd.encode_images(pipe, images[i:i + chunk]) for i in range(0, len(images), chunk)])


@torch.no_grad()
def generated_pairs(pipe, config: PairedConfig) -> Pairs:
    """The model's own pairs: each template with the concept and with its partner, sampled from the same initial
    noise (``num_inference_steps`` steps, ``guidance_scale``); held: the partners' images and the ``preserve``
    prompts' generations."""
    templates = list(config.templates) or ["{}"]
    shape = latent_shape(pipe, 1, config.resolution)
    side = shape[-1] * int(pipe.vae_scale_factor)
    gen = torch.Generator().manual_seed(config.seed)

    def sample(prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        out = pipe(prompt=prompts, latents=noise.to(sd.device_of(pipe), sd.denoiser(pipe).dtype),
                   num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                   height=side, width=side, output_type="latent")
        return out.images.float()

    concept, partner, captions = [], [], []
    for name, other in zip(config.concepts, partners_of(config)):
        for i in range(config.num_images):
            template = templates[i % len(templates)]
            noise = torch.randn(shape, generator=gen)
            prompts = [template.replace("{}", name), template.replace("{}", other)]
            z = sample(prompts, torch.cat([noise, noise]))
            concept.append(z[:1])
            partner.append(z[1:])
            captions.append([tuple(prompts)])
    held = list(partner)
    held_captions = [[c[0][1]] for c in captions]
    for prompt in config.preserve:
        for i in range(config.num_images):
            held.append(sample([templates[i % len(templates)].replace("{}", prompt)], torch.randn(shape, generator=gen)))
            held_captions.append([templates[i % len(templates)].replace("{}", prompt)])
    return Pairs(torch.cat(concept), torch.cat(partner), captions, torch.cat(held), held_captions)


def pairs(pipe, config: PairedConfig) -> Pairs:
    """The training data: tinyworld renders (``tinyworld_images``) or the model's own generations."""
    data = tinyworld_pairs(pipe, config) if config.tinyworld_images else generated_pairs(pipe, config)
    device = sd.device_of(pipe)
    return dataclasses.replace(data, concept=data.concept.to(device), partner=data.partner.to(device),
                               held=data.held.to(device))


# ------------------------------------------------------------------------------------------------- loss
def random_prompt(tokenizer, vocab: int, gen: torch.Generator) -> str:
    """1–12 random tokens of the vocabulary (special tokens excluded), as text."""
    special = sd.special_ids(tokenizer)
    n = int(torch.randint(1, 13, (), generator=gen))
    ids = [i for i in torch.randint(vocab, (n,), generator=gen).tolist() if i not in special]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def random_words(words: list[str], gen: torch.Generator) -> str:
    """1–16 words drawn (with repeats) from ``words``, as text."""
    n = int(torch.randint(1, 17, (), generator=gen))
    return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=gen).tolist())


def caption_words(data: Pairs) -> list[str]:
    """The words of every training caption (concept, partner and held), each once, in a fixed order."""
    captions = [c for pairs in data.captions for pair in pairs for c in pair]
    captions += [c for held in data.held_captions for c in held]
    return sorted({w for c in captions for w in c.split()})


def paired_target(pipe, x0: torch.Tensor, partner: torch.Tensor, noise: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t of the concept's latents ``x0``, the prediction that denoises it into ``partner``, the weight
    min(1, (1−ᾱ)/ᾱ)) (module docstring); ε-prediction or v-prediction."""
    a = sd.alphas_cumprod(pipe)[t].view(-1, 1, 1, 1)
    x_t = sd.add_noise(pipe, x0, noise, t)
    eps = noise + (a / (1 - a)).sqrt() * (x0 - partner)
    if pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        target = a.sqrt() * eps - (1 - a).sqrt() * partner
    else:
        target = eps
    return x_t, target, torch.clamp((1 - a) / a, max=1.0)


def objective(pipe, config: PairedConfig, data: Pairs,
              adversary_state: dict[str, torch.Tensor] | None = None) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator)``: (erase, preserve) losses of one step (module docstring)."""
    unet = sd.denoiser(pipe)
    device = sd.device_of(pipe)
    shares = torch.tensor(config.condition_shares, dtype=torch.float64)
    tokenizer = pipe.tokenizer
    vocab = len(tokenizer)
    T = sd.num_train_timesteps(pipe)
    threats = esd.adversary_threats(pipe, config)
    n, b = len(data.captions), config.batch_size
    words = caption_words(data) if config.random_words else []

    def pick(options: list, gen: torch.Generator):
        return options[int(torch.randint(len(options), (), generator=gen))]

    def loss_for(deltas: lora.Deltas):
        def loss_fn(step: int, gen: torch.Generator):
            rows = torch.randint(n, (b,), generator=gen).tolist()
            kinds = torch.multinomial(shares, b, replacement=True, generator=gen).tolist()
            prompts = []
            for row, kind in zip(rows, kinds):
                concept, partner = pick(data.captions[row], gen)
                name = CONDITIONS[kind]
                if name == "random_tokens" and words and float(torch.rand((), generator=gen)) < config.random_words:
                    prompts.append(random_words(words, gen))
                    continue
                prompts.append(partner if name == "partner" else "" if name == "empty" else
                               random_prompt(tokenizer, vocab, gen) if name == "random_tokens" else concept)
            cond = Cond.cat(encode(pipe, prompts, config.resolution)[0])
            noisy = [j for j, kind in enumerate(kinds) if CONDITIONS[kind] == "noisy_hidden"]
            if noisy:
                hidden = cond.hidden.clone()
                for j in noisy:
                    scale = hidden[j].float().std(dim=-1, keepdim=True)
                    hidden[j] += (config.hidden_noise * scale * torch.randn(hidden[j].shape, generator=gen).to(
                        device)).to(hidden.dtype)
                cond = dataclasses.replace(cond, hidden=hidden)
            x0, partner = data.concept[rows], data.partner[rows]
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(T, (b,), generator=gen).to(device)
            x_t, target, weight = paired_target(pipe, x0, partner, noise, t)
            if threats and step >= config.adversary_start:
                cond = Cond.cat([adversary(deltas, step, gen, x0[:1], pick(data.captions[rows[0]], gen)[0]),
                                 cond[1:]])
            student = predict(unet, x_t.to(cond.hidden.dtype), t, cond).float()
            erase = (weight * (student - target) ** 2).mean()
            if not config.preserve_weight:
                return erase
            held_rows = torch.randint(len(data.held_captions), (b,), generator=gen).tolist()
            held_prompts = [pick(data.held_captions[r], gen) if torch.rand((), generator=gen) >= 0.1 else ""
                            for r in held_rows]
            held_cond = Cond.cat(encode(pipe, held_prompts, config.resolution)[0])
            z = data.held[held_rows]
            kt = torch.randint(T, (b,), generator=gen).to(device)
            kx = sd.add_noise(pipe, z, torch.randn(z.shape, generator=gen).to(device), kt).to(cond.hidden.dtype)
            with deltas.disabled(), torch.no_grad():
                frozen = predict(unet, kx, kt, held_cond).float()
            kept = F.mse_loss(predict(unet, kx, kt, held_cond).float(), frozen)
            return erase, config.preserve_weight * kept

        return loss_fn

    def adversary(deltas: lora.Deltas, step: int, gen: torch.Generator, x0: torch.Tensor, prompt: str) -> Cond:
        """The soft-prompt attack on the student for this step's threat (module docstring), the deltas frozen."""
        kind = esd.ADVERSARY_THREATS[step % 2]
        previous = adversary_state[kind] if adversary_state is not None else None
        warm = previous is not None and bool(previous.abs().sum() > 0)  # zeros: not drawn yet
        with lora.frozen_params(deltas.params.values()):
            soft = soft_prompt_attack(pipe, prompt if kind == "prefix" else "", x0, threats[kind],
                                      init=previous if warm else None, generator=gen)
        if adversary_state is not None:
            with torch.no_grad():
                adversary_state[kind].copy_(soft.delta)
        with torch.no_grad():
            return Cond(soft.cond(pipe).embeds.to(sd.denoiser(pipe).dtype))

    return loss_for


def erase(pipe, config: PairedConfig) -> Adapter:
    """Train a paired-suppression adapter for ``config.concepts``; ``pipe`` is left as it was."""
    state = esd.adversary_state(pipe, config)  # refuses an adversary the model cannot take before any work
    data = pairs(pipe, config)
    return train(pipe, config, esd.select(pipe, config.train_method), objective(pipe, config, data, state),
                 "paired", extra_params={f"adversary.{kind}": delta for kind, delta in state.items()})


__all__ = ["CONDITIONS", "PairedConfig", "Pairs", "erase", "objective", "paired_target", "pairs"]
