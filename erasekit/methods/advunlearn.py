"""AdvUnlearn: defensive unlearning with adversarial training (Zhang et al., NeurIPS 2024,
https://arxiv.org/abs/2405.15234; authors' code ``OPTML-Group/AdvUnlearn`` ``train-scripts/AdvUnlearn.py``).

Bi-level training of the text encoder τ_φ (UNet frozen). Every outer step, after ``warmup`` steps, first the
inner attack (paper Eq. 4) finds k soft tokens δ that make the *unlearned* model reproduce the original model's
prediction for the concept c:

    δ* = argmin_δ ‖ε_θ(x_t, τ_φ([δ; c])) − ε_θ₀(x_t, τ₀(c))‖²        (``attack_steps`` Adam steps, lr ``attack_lr``;
                                                                     ``fast_at``: Adam on sign(∇δ))

then the defender (paper Eq. 5, ``utils/get_loss.py``) updates φ on the ESD target for the attacked prompt plus the
utility-retaining loss on retain prompts c_r:

    L(φ) = ‖ε_θ(x_t, τ_φ([δ*; c])) − [ε₀(x_t, ∅) − η (ε₀(x_t, c) − ε₀(x_t, ∅))]‖²
           + w_retain · ‖ε_θ(x_t^r, τ_φ(c_r)) − ε₀(x_t^r, c_r)‖²

x_t (and x_t^r) come from a partial DDIM rollout of the frozen model conditioned on c (c_r) with guidance
``start_guidance``, stopped at a uniformly drawn step, as in ESD. ε₀ is the original model: the same UNet with the
original text encoder (the deltas disabled). The inner attack is the audit's soft-prompt loop,
:func:`erasekit.attacks.unlearndiffatk.soft_prompt_attack`, in word-embedding space (the authors' ``word_embd``)
with this teacher target; δ is warm-started from the previous round (``attack_init="latest"``) and is checkpointed
with the run.

Differences from the authors' code, each deliberate: the retain loss is the README's ``reg`` form (added to the
same step; the code's default ``iter`` takes a second optimiser step, which the shared one-loss-per-step loop does
not do); the LayerNorms (incl. ``final_layer_norm``) stay frozen (the adapter format holds Linear deltas); the SD
retain list is "a photo of a {COCO category}" for the 80 COCO categories (the authors' ``coco_object`` is 243
prompts of the same form); on SDXL the attack runs in one-hot space over both encoders' vocabularies (word-embedding
δ needs a single encoder).

An erasekit addition, off by default: ``replace_with=r`` swaps the ESD target for the original model's prediction
on the anchor, ε₀(x_t, r) with r in the same template (Concept Ablation's target, Kumari et al. 2023, Eq. 3;
All-but-One's ``replace_with`` in :mod:`erasekit.methods.abo`). Erased prompts then draw r instead of the shapeless
image the ESD target leaves, which an attack has less room to turn back into the concept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..adapter import Adapter
from ..core import sd
from ..core.processes import WHOLE, Part
from ..attacks.unlearndiffatk import SoftPrompt, SoftPromptConfig, soft_prompt_attack
from ..errors import ConfigError
from . import te
from .trainer import (ddim_scheduler, latent_shape, training_options, training_templates, validate_replace_with,
                      validate_training)

logger = logging.getLogger(__name__)

#: The authors' settings for SD 1.x (``AdvUnlearn.py`` argparse defaults; retain weight and mode from the README
#: command). ``lr`` is 1e-5 there (declared ``type=int``, so only the default is usable).
PAPER_SD = dict(iterations=1000, warmup=200, lr=1e-5, negative_guidance=1.0, start_guidance=3.0,
                num_inference_steps=50, batch_size=1, retain_batch=5, retain_weight=0.3, retain_uncond=False,
                attack_tokens=1, attack_steps=30, attack_lr=1e-3, attack_every=1, rank=0)

#: The 80 COCO object categories: the default retain set on real models, as "a photo of a {}" prompts.
COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
RETAIN_TEMPLATE = "a photo of a {}"

Component = Literal["all", "ffn", "attn"]
_FIXED_K = ("prefix_k", "replace_k", "suffix_k", "mid_k", "insert_k")  # δ has the same shape for every prompt


@dataclass(frozen=True)
@training_options
class AdvUnlearnConfig:
    """Defaults are sized for tinyworld on a CPU; the authors' SD settings are ``PAPER_SD``.

    On tinyworld the robustness comes from the adversarial rounds: with 3 attack tokens (UnlearnDiffAtk's k for
    objects) attacked for 10 steps before every one of 400 outer steps, UnlearnDiffAtk succeeds on 0 of 8 circle
    prompts; with 200 or 300 outer steps on 6 or 4 of 8, with 100 steps and 1 token attacked every other step on
    8 of 8 (``benchmarks/te_tinyworld.py``). Training takes ~18 minutes on one CPU core.

    Args:
        concepts: prompts to erase, e.g. ("circle",); with several, each round draws one.
        templates: prompts the concepts are trained in, "{}" standing for the concept. Empty: the bare concept, as
            the authors; on tinyworld, tinyworld's caption templates (ESD's ``training_templates``).
        retain: retain prompts c_r. Empty: on tinyworld the other values of the concept's attribute in the same
            templates; elsewhere "a photo of a {COCO category}" minus the concepts (``COCO_OBJECTS``).
        retain_weight: w_retain, weight of the utility-retaining loss (authors' code 1.0, README 0.3; 0 = off).
            tinyworld needs more: with 1.0 the other shapes' accuracy fell to ~35 %, with 5.0 to ~91 %.
        retain_batch: retain prompts per step (authors 5).
        retain_uncond: also keep the original prediction for the empty prompt at the step's x_t (weight
            ``retain_weight``). An erasekit addition (authors: no): the unconditional branch of classifier-free
            guidance passes through the trained encoder too, so its drift affects every prompt.
        negative_guidance: η in the ESD target (authors 1).
        replace_with: a concept whose original prediction becomes the target instead of the ESD target,
            ε₀(x_t, r) with r in the same template (Concept Ablation's anchor; "" = the ESD target, the authors').
            An erasekit option: erased prompts then draw r rather than a shapeless image near the concept.
        start_guidance: classifier-free guidance of the frozen model's rollout that produces x_t (authors 3).
        num_inference_steps: DDIM steps of that rollout; it stops at a uniformly drawn step (authors 50).
        iterations: outer (defender) steps (authors 1000).
        warmup: outer steps before the first attack, trained on the plain prompt (authors 200).
        lr: Adam learning rate of the text-encoder deltas (authors 1e-5).
        rank: rank of each delta; 0 trains full deltas, as the authors (who save the whole encoder).
        component: which Linear layers of each selected transformer layer train: all, ffn (mlp.fc1/fc2), attn
            (self_attn q/k/v/out) — the authors' ``--component``.
        layers: indices of the transformer layers that train (empty = all, the authors' ``text_encoder_full``;
            (0,) or (0, 11) = their ``text_encoder_layer0`` / ``layer0_11``).
        attack_tokens: k, the adversarial tokens (authors' ``adv_prompt_num`` 1).
        attack_insertion: where they go: prefix_k, replace_k, add, suffix_k, mid_k, insert_k, per_k.
        attack_space: "word_embedding" (free token embeddings, the authors' ``word_embd``), "one_hot" (relaxed
            one-hot over the vocabulary), or "auto" (word_embedding with one text encoder, one_hot on SDXL).
        attack_steps: inner Adam steps per attack round (authors 30).
        attack_lr: inner learning rate (authors 1e-3).
        attack_method: "pgd" (Adam on ∇δ) or "fast_at" (Adam on sign ∇δ, the authors' fast variant).
        attack_init: "latest" (warm start from the previous round's δ) or "random" (fresh random tokens each round).
        attack_every: outer steps between attack rounds; the concept prompt is redrawn with each round (authors 1).
        batch_size: x_t samples per outer step and per attack step (authors 1).
        resolution: image side in pixels (0 = the model's own).
        mixed_precision: "no", "bf16" or "fp16" (CUDA) autocast for the outer forward passes.
        checkpoint_dir: folder for resumable training checkpoints ("" = none); δ is saved with them (fixed-k
            insertions; ``add``/``per_k`` restart δ at random after a resume).
    """

    concepts: tuple[str, ...]
    templates: tuple[str, ...] = ()
    retain: tuple[str, ...] = ()
    retain_weight: float = 5.0
    retain_batch: int = 4
    retain_uncond: bool = True
    negative_guidance: float = 1.0
    replace_with: str = ""
    start_guidance: float = 3.0
    num_inference_steps: int = 10
    iterations: int = 400
    warmup: int = 20
    lr: float = 1e-3
    rank: int = 0
    component: Component = "all"
    layers: tuple[int, ...] = ()
    attack_tokens: int = 3
    attack_insertion: str = "prefix_k"
    attack_space: Literal["auto", "word_embedding", "one_hot"] = "auto"
    attack_steps: int = 10
    attack_lr: float = 1e-2
    attack_method: Literal["pgd", "fast_at"] = "pgd"
    attack_init: Literal["latest", "random"] = "latest"
    attack_every: int = 1
    batch_size: int = 2
    resolution: int = 0

    def __post_init__(self):
        validate_training(self)
        for name in ("iterations", "num_inference_steps", "batch_size", "retain_batch", "attack_tokens",
                     "attack_steps", "attack_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.retain_weight < 0 or self.attack_lr <= 0:
            raise ConfigError("warmup and retain_weight must be ≥ 0 and attack_lr > 0")
        choices = {"component": ("all", "ffn", "attn"), "attack_insertion": sd.INSERTIONS,
                   "attack_space": ("auto", "word_embedding", "one_hot"), "attack_method": ("pgd", "fast_at"),
                   "attack_init": ("latest", "random")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        validate_replace_with(self)
        if isinstance(self.retain, str) or isinstance(self.layers, (str, int)) or any(i < 0 for i in self.layers):
            raise ConfigError("retain must be a tuple of prompts and layers a tuple of layer indices ≥ 0")

    def soft_prompt_config(self, pipe) -> SoftPromptConfig:
        """The inner attack's settings (no weight decay: the authors' attack Adam has none)."""
        space = self.attack_space
        if space == "auto":
            space = "word_embedding" if len(sd.encoders(pipe)) == 1 else "one_hot"
        return SoftPromptConfig(k=self.attack_tokens, insertion=self.attack_insertion, space=space,
                                steps=self.attack_steps, lr=self.attack_lr, weight_decay=0.0,
                                method=self.attack_method, timesteps="random")


def module_selection(component: str, layers: tuple[int, ...]) -> Callable[[str, int, int], bool]:
    """``include(path, layer, num_layers)`` for :func:`erasekit.methods.te.select`."""
    parts = {"all": (".self_attn.", ".mlp."), "ffn": (".mlp.",), "attn": (".self_attn.",)}[component]
    return lambda path, layer, total: (not layers or layer in layers) and any(p in path for p in parts)


def retain_prompts(config) -> list[str]:
    """c_r: ``config.retain``, else "a photo of a {COCO category}" for the categories not named in the concepts.
    (On tinyworld the presets fill ``retain``: :func:`erasekit.methods.presets.retain_values`.)"""
    if config.retain:
        return list(config.retain)
    erased = [c.lower() for c in config.concepts]
    return [RETAIN_TEMPLATE.format(o) for o in COCO_OBJECTS if not any(o in c or c in o for c in erased)]


def attack_state(pipe, config) -> torch.Tensor | None:
    """The checkpointed δ of fixed-k insertions (zeros = not drawn yet), or None."""
    if config.attack_insertion not in _FIXED_K:
        return None
    sp = config.soft_prompt_config(pipe)
    width = (len(sd.allowed_token_ids(pipe, sp.exclude_words)) if sp.space == "one_hot"
             else sd.token_embeddings(pipe)[0].shape[1])
    return torch.zeros(config.attack_tokens, width, device=sd.device_of(pipe))


def inner_attack(pipe, prompt: str, c0: sd.Cond, uncond: sd.Cond, config: AdvUnlearnConfig, scheduler,
                 generator: torch.Generator, init: torch.Tensor | None) -> SoftPrompt:
    """δ* for ``prompt`` against the current (hooked) encoder: the audit's soft-prompt loop with the teacher target
    ε₀(x_t, c) at x_t from a fresh partial rollout of the frozen model for every step (authors' ``attack_util``)."""
    shape = latent_shape(pipe, config.batch_size, config.resolution)

    def target_fn(step: int, g: torch.Generator):
        steps = int(torch.randint(config.num_inference_steps, (), generator=g))
        x, t = te.rollout(pipe, scheduler, c0, uncond, config.start_guidance, steps, shape, g)
        with torch.no_grad():
            e_p = sd.unet_eps(pipe, x, t, c0.expand(shape[0]))
        return x, t, e_p

    return soft_prompt_attack(pipe, prompt, config=config.soft_prompt_config(pipe), target_fn=target_fn, init=init,
                              generator=generator)


def objective(pipe, config: AdvUnlearnConfig, delta_state: torch.Tensor | None = None) -> Callable:
    """``loss_for(deltas) -> loss_fn(step, generator)``: the defender's loss of one outer step (module docstring),
    running the inner attack first on attack steps. ``delta_state`` (see :func:`attack_state`) holds δ across
    rounds and checkpoints."""
    templates = training_templates(config)
    prompts = [t.replace("{}", c) for c in config.concepts for t in templates]
    retain = retain_prompts(config) if config.retain_weight > 0 else []
    scheduler = ddim_scheduler(pipe, config.num_inference_steps)
    shape = latent_shape(pipe, config.batch_size, config.resolution)
    retain_shape = latent_shape(pipe, config.retain_batch, config.resolution)
    n, eta = shape[0], config.negative_guidance

    def loss_for(deltas: te.EncoderDeltas):
        with deltas.disabled(), torch.no_grad():  # the original encoder's conditioning: the teacher's, fixed
            originals = sd.encode(pipe, prompts)
            originals_retain = sd.encode(pipe, retain) if retain else None
            anchors = (sd.encode(pipe, [t.replace("{}", config.replace_with) for _ in config.concepts
                                         for t in templates]) if config.replace_with.strip() else None)
            uncond = sd.uncond(pipe)
        state: dict = {"row": None, "soft": None, "delta": None}

        def loss_fn(step: int, gen: torch.Generator, part: Part = WHOLE) -> torch.Tensor:
            if state["row"] is None or step % config.attack_every == 0:  # a new round: new prompt, new attack
                state["row"], state["soft"] = int(torch.randint(len(prompts), (), generator=gen)), None
            row = state["row"]
            c0 = originals[row:row + 1]
            adversarial = step >= config.warmup
            if adversarial and state["soft"] is None:
                previous = delta_state if delta_state is not None else state["delta"]
                warm = (config.attack_init == "latest" and previous is not None and bool(previous.abs().sum() > 0))
                soft = inner_attack(pipe, prompts[row], c0, uncond, config, scheduler, gen,
                                    previous if warm else None)
                if delta_state is not None:
                    with torch.no_grad():
                        delta_state.copy_(soft.delta)
                state["soft"], state["delta"] = soft, soft.delta
            # defender: the ESD target for the (attacked) prompt, on this process's samples of the batch
            steps = int(torch.randint(config.num_inference_steps, (), generator=gen))
            mine = part.rows(n)
            m = mine.stop - mine.start
            x, t = te.rollout(pipe, scheduler, c0, uncond, config.start_guidance, steps, shape, gen, mine)
            with torch.no_grad():  # ε₀(x_t, ∅) and ε₀(x_t, c) — or ε₀(x_t, r), the anchor's, as the target itself
                other = c0 if anchors is None else anchors[row:row + 1]
                teacher = sd.Cond.cat([uncond.expand(m), other.expand(m)])
                e_null, e_other = sd.unet_eps(pipe, torch.cat([x, x]), t, teacher).chunk(2)
            target = e_null - eta * (e_other - e_null) if anchors is None else e_other
            cond = state["soft"].cond(pipe) if adversarial else te.encode(pipe, [prompts[row]])
            loss = F.mse_loss(sd.unet_eps(pipe, x, t, cond.expand(m)), target)
            if config.retain_uncond and config.retain_weight > 0:  # the CFG branch of every prompt: keep ε(x_t, ∅)
                e_null_student = sd.unet_eps(pipe, x, t, te.encode(pipe, [""]).expand(m))
                loss = loss + config.retain_weight * F.mse_loss(e_null_student, e_null)
            loss = part.mean(loss, n)
            if retain:  # utility retaining ("reg"): the original model's prediction on retain prompts
                rows = torch.randint(len(retain), (config.retain_batch,), generator=gen)
                kept = part.rows(config.retain_batch)
                c_r = originals_retain[rows[kept]]
                x_r, t_r = te.rollout(pipe, scheduler, c_r, uncond, config.start_guidance, steps, retain_shape, gen,
                                      kept)
                with torch.no_grad():
                    e_r0 = sd.unet_eps(pipe, x_r, t_r, c_r)
                e_r = sd.unet_eps(pipe, x_r, t_r, te.encode(pipe, [retain[i] for i in rows[kept].tolist()]))
                loss = loss + config.retain_weight * part.mean(F.mse_loss(e_r, e_r0), config.retain_batch)
            return loss

        return loss_fn

    return loss_for


def erase(pipe, config: AdvUnlearnConfig) -> Adapter:
    """Train an AdvUnlearn text-encoder adapter; ``pipe`` is left as it was (no hooks, same weights)."""
    names = te.select(pipe, module_selection(config.component, config.layers))
    delta_state = attack_state(pipe, config)
    extra = {"attack.delta": delta_state} if delta_state is not None else None
    return te.train(pipe, config, names, objective(pipe, config, delta_state), "advunlearn", config.iterations,
                     extra_params=extra)


__all__ = ["AdvUnlearnConfig", "COCO_OBJECTS", "PAPER_SD", "erase", "objective", "retain_prompts"]
