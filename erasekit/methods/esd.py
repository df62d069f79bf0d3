"""Erasing Concepts from Diffusion Models (ESD; Gandikota et al., ICCV 2023, https://arxiv.org/abs/2303.07345).

The UNet is fine-tuned so that its conditional score on the erased concept ``c`` equals the frozen model's
*negatively guided* score (the paper's fine-tuning objective, §3):

    ε_θ(x_t, c, t) ← ε_θ₀(x_t, t) − η [ε_θ₀(x_t, c, t) − ε_θ₀(x_t, t)]          (L2 loss)

where ``x_t`` comes from a partial DDIM rollout of the frozen model, conditioned on ``c`` with classifier-free
guidance ``start_guidance``, stopped at a random step (the authors' diffusers code, ``esd_sd.py``). With
``erase_from`` = B, the rollout, the student and the first term use B instead: erase ``c`` only within B.
Optionally (``preserve_weight`` λ > 0, not in the paper) ANT's unconditional-score preservation term
``λ‖ε_θ(x_t, ∅) − ε_θ₀(x_t, ∅)‖²`` (Li et al. 2025) is added, which holds back changes that act on every
prompt. With ``preserve`` prompts P (or ``preserve_related`` on tinyworld: the erased concept's siblings) each
step also adds ``λ‖ε_θ(x_t, p) − ε_θ₀(x_t, p)‖²`` for one p drawn from P, in the concept's templates: a retain
loss like AdvUnlearn's utility term, for modules such as ``to_q``/``to_out`` whose deltas act on every prompt.

With ``unsaid`` (erasekit's addition, not in the paper) a share of each step's samples are prompts that leave the
concept unsaid, ``T("")`` for a template ``T`` ("a solid red  on a black background"), rolled out from the frozen
model and pushed away from the concept *in that context*:
``ε_θ(x_t, T(""), t) ← ε_θ₀(x_t, T("")) − η [ε_θ₀(x_t, T(c)) − ε_θ₀(x_t, T(""))]``. A model draws some concepts
when nothing names them (its prior: on tinyworld a prompt without a shape draws a circle a third of the time), and
attacks that find text the erasure does not recognise land there; the term erases the concept from that prior.

With ``anchors`` (erasekit's addition) the samples that name the concept are sent away from it *toward* an anchor
in the same template instead of toward ∅:
``ε_θ(x_t, T(c), t) ← ε_θ₀(x_t, T(a)) − η [ε_θ₀(x_t, T(c)) − ε_θ₀(x_t, T(a))]``; η = 0 is Concept Ablation's
model-based target (Kumari et al., ICCV 2023, Eq. 3). As UCE's guides, there is one anchor for every concept or one
per concept, and an anchor may list several prompts ("square | triangle"): each template keeps one of them (its index
mod their count). On tinyworld a concept's anchor may be its siblings (``anchor_related``: "square | triangle | star |
cross | diamond" for circle), so the concept's prompts draw one of them and the guidance points away from the concept
from every one of them.

With ``adversary_steps`` (erasekit's addition after RACE, Kim et al., ECCV 2024, which trains ESD against
adversarial text embeddings, and AdvUnlearn's bi-level loop, Zhang et al., NeurIPS 2024, Eq. 4–5, moved from the
text encoder to the denoiser) each step first runs the audit's soft-prompt attack
(:func:`erasekit.attacks.unlearndiffatk.soft_prompt_attack`) against the *student* on the batch's first sample:
free token embeddings that make the student reproduce the frozen model's ε_θ₀(x_t, T(c)) — on even steps 3 before
the prompt (UnlearnDiffAtk's threat), on odd steps 16 with no prompt (P4D-N's) — each warm-started from its last
round and checkpointed with the run; that sample's student input is then the attacked prompt, its target ESD's.

The trainable ``ΔW`` are low-rank (``rank``) or full (``rank=0``) deltas on the preset's modules, attached with
hooks (``erasekit.core.lora``): the frozen teacher is the same UNet with the hooks disabled, so one UNet is in
memory. Presets: ``esd-x`` (every Linear of the cross-attention ``attn2``), ``esd-x-strict`` (``attn2.to_k``/
``to_v``), ``esd-u`` (every Linear/Conv2d *not* in ``attn2``), ``esd-all``.

On an MMDiT transformer (SD3, flow matching) the same objective holds with the velocity in place of ε (both are
linear in the score, so negative guidance means the same), ``x_t`` from a flow-matching Euler rollout, and the
presets read the layers that read the text as the cross-attention: ``esd-x`` every Linear of the blocks' ``attn``
(image and text streams, which attend to each other there) and of the pooled-text embedder
``time_text_embed.text_embedder`` (the pooled prompt enters every block's adaLN modulation through it alone; on
tinyworld-mmdit, whose shapes come from the pooled text, attention alone leaves circle in 43 % of its prompts),
``esd-x-strict`` the text stream's ``add_k_proj``/``add_v_proj``, ``esd-u`` every other Linear/Conv2d
(:func:`select`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..adapter import Adapter
from ..attacks.unlearndiffatk import SoftPromptConfig, soft_prompt_attack
from ..core import lora, sd
from ..core.mmdit import POOLED_TEXT_EMBEDDER
from ..core.processes import WHOLE, Part
from ..errors import ConfigError
from .trainer import (Cond, PromptTable, check_prompts, ddim_scheduler, latent_shape, predict, rollout, train,
                      rollout_options, training_options, training_templates, validate_rollout_training)
from .uce import alternatives

logger = logging.getLogger(__name__)

TrainMethod = Literal["esd-x", "esd-x-strict", "esd-u", "esd-all"]

#: Module selection of each preset (the authors' ``esd_sd.py``: Linear in attn2 / attn2 k,v / the rest).
PRESETS: dict[str, Callable[[str, torch.nn.Module], bool]] = {
    "esd-x": lambda name, m: ".attn2." in name and isinstance(m, torch.nn.Linear),
    "esd-x-strict": lambda name, m: name.endswith(("attn2.to_k", "attn2.to_v")),
    "esd-u": lambda name, m: ".attn2." not in name,
    "esd-all": lambda name, m: True,
}

#: The authors' settings for SD 1.x/2.x (new diffusers code, ``esd_sd.py``): full deltas, 200 iterations.
PAPER_SD = dict(iterations=200, lr=5e-5, negative_guidance=2.0, start_guidance=3.0, num_inference_steps=50, rank=0)
#: The original CompVis code (``train-esd.py``): 1000 iterations, lr 1e-5, η = 1.
PAPER_SD_V1 = dict(iterations=1000, lr=1e-5, negative_guidance=1.0, start_guidance=3.0, num_inference_steps=50, rank=0)
#: The authors' SDXL settings (``esd_sdxl.py``; esd-x or esd-x-strict only).
PAPER_SDXL = dict(iterations=200, lr=2e-4, negative_guidance=1.0, start_guidance=2.0, num_inference_steps=50, rank=0)


@dataclass(frozen=True)
@training_options
@rollout_options
class EsdConfig:
    """Args:
        concepts: prompts to erase, e.g. ("circle",); with several, each step trains on one drawn at random.
        train_method: which UNet modules get a delta: esd-x (cross-attention), esd-x-strict (cross-attention
            k/v), esd-u (everything but cross-attention), esd-all.
        erase_from: erase the concepts only within this concept ("" = everywhere).
        templates: prompts the concepts are trained in, "{}" standing for the concept, e.g. ("{}", "a photo of
            {}"); each sample of a step draws one. Empty: the bare concept, as in the paper; on tinyworld,
            tinyworld's caption templates with random other attributes (see ``training_templates``).
        negative_guidance: η, the strength of the negative guidance in the target (paper code: 1; new code: 2).
        preserve_weight: λ of ANT's unconditional-score preservation term ``λ‖ε_θ(x_t, ∅) − ε_θ₀(x_t, ∅)‖²``
            added to the ESD loss (Li et al. 2025; All-but-One's second term); 0 = the paper's ESD.
        preserve: prompts whose predictions the preservation term also holds (needs preserve_weight > 0).
        preserve_related: on tinyworld, also preserve the erased concepts' siblings (the other shapes for a
            shape; needs preserve_weight > 0).
        rank: rank of each delta; 0 trains full-rank deltas, as the authors' code does.
        unsaid: share of each step's samples (rounded up; at least one names the concept) whose prompt leaves the
            concept unsaid (a template with "" in the concept's slot: what the model draws when no word asks for
            the concept, its prior), pushed away from the concept in that context (module docstring); 0 = the
            paper's ESD.
        anchors: what the erased samples are guided toward instead of ∅, ``ε_θ₀(T(a)) − η[ε_θ₀(T(c)) −
            ε_θ₀(T(a))]`` (module docstring): one for all concepts, or one per concept; an anchor may list several
            prompts separated by "|" ("square | triangle"), each template keeping one. Empty = the paper's ESD.
        anchor_related: on tinyworld, each concept's anchor is its siblings that are not erased (the other shapes
            for a shape).
        adversary_steps: steps of the soft-prompt attack run against the student before each update (module
            docstring; SD 1.x/2.x-style UNets with one text encoder); 0 = no adversary, the paper's ESD.
    """

    concepts: tuple[str, ...]
    train_method: TrainMethod = "esd-x"
    erase_from: str = ""
    templates: tuple[str, ...] = ()
    negative_guidance: float = 2.0
    preserve_weight: float = 0.0
    preserve: tuple[str, ...] = ()
    preserve_related: bool = False
    unsaid: float = 0.0
    anchors: tuple[str, ...] = ()
    anchor_related: bool = False
    adversary_steps: int = 0

    def __post_init__(self):
        validate_rollout_training(self)
        if not 0 <= self.unsaid < 1:
            raise ConfigError(f"unsaid must be in [0, 1), got {self.unsaid}")
        if self.unsaid and self.batch_size < 2:
            raise ConfigError("unsaid needs batch_size ≥ 2 (a step's samples: some leave the concept unsaid, "
                              "at least one names it)")
        if self.preserve_weight < 0:
            raise ConfigError(f"preserve_weight must be ≥ 0, got {self.preserve_weight}")
        check_prompts(self, "preserve")
        if (self.preserve or self.preserve_related) and not self.preserve_weight:
            raise ConfigError("preserve / preserve_related need preserve_weight > 0 (the preservation term's weight)")
        if isinstance(self.anchors, str) or not all(isinstance(a, str) and all(p.strip() for p in alternatives(a))
                                                    for a in self.anchors):
            raise ConfigError(f"anchors must be a tuple of non-empty prompts, got {self.anchors!r}")
        if len(self.anchors) not in (0, 1, len(self.concepts)):
            raise ConfigError(f"anchors must be one for all concepts or one per concept ({len(self.concepts)}), "
                              f"got {len(self.anchors)}")
        erased = {c.strip() for c in self.concepts}
        named = [p for a in self.anchors for p in alternatives(a) if p in erased]
        if named:
            raise ConfigError(f"anchor {named[0]!r} is one of the concepts being erased")
        if self.adversary_steps < 0:
            raise ConfigError(f"adversary_steps must be ≥ 0, got {self.adversary_steps}")
        if self.train_method not in PRESETS:
            raise ConfigError(f"train_method must be one of {', '.join(PRESETS)}, got {self.train_method!r}")


# ------------------------------------------------------------------------------------------ prompts
def preserved(config) -> list[str]:
    """``config.preserve`` without the erased concepts (with ``preserve_related`` on tinyworld the presets have added
    the erased concepts' siblings: :func:`erasekit.methods.presets.related_concepts`)."""
    return [p for p in dict.fromkeys(config.preserve) if p not in config.concepts]


def objective(pipe, config: EsdConfig, adversary_state: dict[str, torch.Tensor] | None = None) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator)``: the ESD loss of one step (module docstring).
    ``adversary_state`` (:func:`adversary_state`) holds the soft-prompt adversary's δ across rounds and checkpoints."""
    unet = sd.denoiser(pipe)
    n_concepts = len(config.concepts)
    sources = [config.erase_from or c for c in config.concepts]  # what x_t is drawn from and the student sees
    kept, templates = preserved(config), training_templates(config)
    names = list(config.concepts) + sources + kept + ([""] if config.unsaid else [])
    unsaid_row = len(names) - 1
    anchors = [alternatives(a) for a in config.anchors] * (n_concepts if len(config.anchors) == 1 else 1)
    anchor_row = {p: len(names) + i for i, p in enumerate(dict.fromkeys(p for a in anchors for p in a))}
    table = PromptTable(pipe, templates, names + list(anchor_row), config.resolution)
    uncond = table.uncond
    scheduler = ddim_scheduler(pipe, config.num_inference_steps)
    shape = latent_shape(pipe, config.batch_size, config.resolution)
    n, eta = shape[0], config.negative_guidance
    n_unsaid = min(math.ceil(config.unsaid * n), n - 1)  # the batch's last samples leave the concept unsaid
    threats = adversary_threats(pipe, config)

    def loss_for(deltas: lora.Deltas):
        def loss_fn(step: int, gen: torch.Generator, part: Part = WHOLE) -> torch.Tensor:
            k = int(torch.randint(n_concepts, (), generator=gen))
            rows = torch.randint(len(table.templates), (n,), generator=gen).tolist()
            steps = int(torch.randint(config.num_inference_steps, (), generator=gen))
            mine = part.rows(n)  # this process's samples of the batch (all of them on one process)
            unsaid = torch.arange(n)[mine] >= n - n_unsaid  # this process's samples that leave the concept unsaid
            rows, m = rows[mine], mine.stop - mine.start
            erased, source = table.batch(k, rows), table.batch(n_concepts + k, rows)
            if unsaid.any():
                source = Cond.cat([table.batch(unsaid_row if u else n_concepts + k, [r])
                                   for u, r in zip(unsaid.tolist(), rows)])
            with deltas.disabled(), torch.no_grad():  # the frozen teacher: the same UNet without deltas
                x, t = rollout(unet, scheduler, source, uncond, config.start_guidance, steps, shape, gen, mine)
                held = [uncond.repeat(m)]  # what the preservation term holds: ∅, and one preserved prompt
                if kept:  # drawn after the rollout: x_t is the same with or without preserve prompts
                    held.append(table.batch(2 * n_concepts + int(torch.randint(len(kept), (), generator=gen)), rows))
                anchor = [Cond.cat([table.batch(anchor_row[anchors[k][r % len(anchors[k])]], [r]) for r in rows])
                          ] if anchors else []  # each template keeps one of the concept's anchor prompts
                teacher = Cond.cat([erased, source] + held + anchor)
                e_erase, e_from, *e_held = predict(unet, torch.cat([x] * (2 + len(held) + len(anchor))), t,
                                                   teacher).float().chunk(2 + len(held) + len(anchor))
            base = e_held[0]  # ∅; for a sample that leaves the concept unsaid, its own prompt
            if unsaid.any():
                base = torch.where(unsaid.view(-1, *[1] * (base.ndim - 1)), e_from, base)
            target = e_from - eta * (e_erase - base)
            if anchors:  # the samples that name the concept: guided away from it from their anchor
                e_anchor = e_held.pop()
                target = torch.where(unsaid.view(-1, *[1] * (base.ndim - 1)), target,
                                     e_anchor - eta * (e_erase - e_anchor))
            seen = source  # what the student sees: the first sample's prompt attacked, with an adversary
            if threats and mine.start == 0:
                seen = Cond.cat([adversary(step, gen, x[:1], t, e_erase[:1], templates[rows[0]].replace(
                    "{}", config.concepts[k])), source[1:]])
            if not config.preserve_weight:
                return part.mean(F.mse_loss(predict(unet, x, t, seen).float(), target), n)
            student, *s_held = predict(unet, torch.cat([x] * (1 + len(held))), t,
                                       Cond.cat([seen] + held)).float().chunk(1 + len(held))
            forget = part.mean(F.mse_loss(student, target), n)  # (forgetting, retaining): fit adds them, or
            return forget, part.mean(config.preserve_weight * sum(  # deconflicts them (gradient_surgery)
                F.mse_loss(s, e) for s, e in zip(s_held, e_held)), n)

        return loss_fn

    def adversary(step: int, gen: torch.Generator, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                  prompt: str) -> Cond:
        """The soft-prompt attack on the student (the hooked UNet) for this step's threat (module docstring):
        free tokens before ``prompt`` on even steps, alone on odd ones, warm-started from that threat's last δ."""
        kind = ADVERSARY_THREATS[step % 2]
        previous = adversary_state[kind] if adversary_state is not None else None
        warm = previous is not None and bool(previous.abs().sum() > 0)  # zeros: not drawn yet
        soft = soft_prompt_attack(pipe, prompt if kind == "prefix" else "", config=threats[kind],
                                  init=previous if warm else None, generator=gen,
                                  target_fn=lambda _, __: (x, t, target))
        if adversary_state is not None:
            with torch.no_grad():
                adversary_state[kind].copy_(soft.delta)
        with torch.no_grad():
            return Cond(soft.cond(pipe).embeds.to(x.dtype))

    return loss_for


#: the adversary's two threats, taken in turn (even steps, odd steps)
ADVERSARY_THREATS = ("prefix", "free")


def adversary_threats(pipe, config: EsdConfig) -> dict[str, SoftPromptConfig]:
    """The adversary's attack settings (module docstring), or {} without one: word-embedding δ, Adam lr 1e-2 (the
    audit's UnlearnDiffAtk), ``adversary_steps`` steps; 3 tokens before the prompt, or 16 tokens alone."""
    if not config.adversary_steps:
        return {}
    if sd.is_sdxl(pipe) or sd.is_mmdit(pipe):
        raise ConfigError("adversary_steps needs a UNet with one text encoder (SD 1.x/2.x); this model has "
                          f"{len(sd.encoders(pipe))}: use adversary_steps=0")
    threat = dict(insertion="prefix_k", space="word_embedding", steps=config.adversary_steps, lr=1e-2,
                  weight_decay=0.0, timesteps="random")
    return {"prefix": SoftPromptConfig(k=3, **threat), "free": SoftPromptConfig(k=16, **threat)}


def adversary_state(pipe, config: EsdConfig) -> dict[str, torch.Tensor]:
    """The adversary's δ per threat (zeros = not drawn yet), checkpointed with the run; {} without an adversary."""
    width = sd.token_embeddings(pipe)[0].shape[1]
    return {kind: torch.zeros(threat.k, width, device=sd.device_of(pipe))
            for kind, threat in adversary_threats(pipe, config).items()}


MMDIT_POOLED_TEXT = POOLED_TEXT_EMBEDDER + "."  # the pooled prompt's only way into the blocks
#: the presets on an MMDiT transformer (module docstring)
MMDIT_PRESETS: dict[str, Callable[[str, torch.nn.Module], bool]] = {
    "esd-x": lambda name, m: isinstance(m, torch.nn.Linear) and (
        (name.startswith("transformer_blocks.") and ".attn." in name) or name.startswith(MMDIT_POOLED_TEXT)),
    "esd-x-strict": lambda name, m: name.endswith(("attn.add_k_proj", "attn.add_v_proj")),
    "esd-u": lambda name, m: ".attn." not in name and not name.startswith(MMDIT_POOLED_TEXT),
    "esd-all": lambda name, m: True,
}


def select(pipe, train_method: str) -> list[str]:
    """The denoiser modules a preset trains (``PRESETS`` on a UNet, ``MMDIT_PRESETS`` on a transformer)."""
    presets = MMDIT_PRESETS if sd.is_mmdit(pipe) else PRESETS
    return lora.select(sd.denoiser(pipe), presets[train_method])


def erase(pipe, config: EsdConfig) -> Adapter:
    """Train an ESD adapter for ``config.concepts``; ``pipe`` is left as it was (no hooks, same weights)."""
    if sd.is_sdxl(pipe) and config.train_method in ("esd-u", "esd-all"):
        logger.warning("%s on SDXL is experimental (the authors report artifacts); esd-x is recommended",
                       config.train_method)
    state = adversary_state(pipe, config)
    return train(pipe, config, select(pipe, config.train_method), objective(pipe, config, state), config.train_method,
                 extra_params={f"adversary.{kind}": delta for kind, delta in state.items()})
