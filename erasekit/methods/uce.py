"""Unified Concept Editing (Gandikota et al., WACV 2024, https://arxiv.org/abs/2308.14761), Eq. 7.

Closed-form edit of the cross-attention key/value projections ``W`` (``attn2.to_k``/``to_v``) of the UNet — on an
MMDiT transformer (SD3), of the layers that read the text itself (see "MMDiT" below):

    min_W  s_e Σ_e ||W c_e − v*_e||² + s_p Σ_p ||W c_p − W_old c_p||² + λ ||W − W_old||²_F
    W' = (λ W_old + s_e Σ_e v*_e c_eᵀ + s_p Σ_p W_old c_p c_pᵀ) (λI + s_e Σ_e c_e c_eᵀ + s_p Σ_p c_p c_pᵀ)⁻¹

with ``replace`` targets ``v*_e = W_old c_g`` (c_g: the guide's key, "" = unconditional). Writing
``A = λI + C``, ``C = s_e Σ_e c_e c_eᵀ + s_p Σ_p c_p c_pᵀ``, the right-hand factor, and multiplying out
``W_old A = λW_old + s_e Σ_e W_old c_e c_eᵀ + s_p Σ_p W_old c_p c_pᵀ``, the preserve terms cancel:

    (W' − W_old) A = s_e Σ_e (v*_e − W_old c_e) c_eᵀ
    ΔW = Σ_e s_e (v*_e − W_old c_e)(A⁻¹ c_e)ᵀ                     (rank ≤ number of erase keys)
       = W_old · D A⁻¹,  D = s_e Σ_e (c_g − c_e) c_eᵀ           (replace guides: v*_e = W_old c_g)

so ``W' = W_old T`` with one text-space matrix ``T = I + D (λI + C)⁻¹`` (d×d, d = context width) shared by every
edited layer and independent of the UNet weights. ``erase`` solves the d×d system once (``torch.linalg.solve``
in float64, float32 on MPS), factors ``D A⁻¹ = P Qᵀ`` exactly (P = s_e [c_g − c_e], Q = A⁻¹[c_e]; recompressed by
thin QR + SVD of the small core, dropping only directions with σ ≤ 1e-10·σ_max), and emits per layer the LoRA
factors ``up = W_old P`` [out, r], ``down = Qᵀ`` [r, in] (a dense delta where that would be smaller).

Statistics for exact merging: a joint solve over the erase and preserve sets of several adapters (same λ, same
modules, same base) has ``C = Σ_i C_i`` and ``D = Σ_i D_i``. Stored as d×d fp32 matrices these would not merge
exactly: the adapter file keeps statistics in fp32, and fp32 rounding of ``C`` (about 6e-8·||C|| in every
direction) is amplified by cond(λI + C) ≈ ||C||/λ, large because many keys share directions (LayerNorm outputs, BOS
and padding tokens); on the tiny test models a TIME merge through fp32 C, D already missed the joint solve by more
than 1e-5 relative. So the adapter stores the *keys* themselves, which are
fp32 numbers to begin with (the text encoder's outputs) and so round-trip exactly: ``keys.erase`` (n, d) c_e,
``keys.guide`` (n, d) c_g, ``keys.preserve`` (m, d) c_p, and per-key weights ``weights.erase`` (n,) = s_e,
``weights.preserve`` (m,) = s_p; ``C = Σ w c cᵀ`` and ``D = Σ w_e (c_g − c_e) c_eᵀ`` follow
(:func:`statistics`). :func:`merge` concatenates them and re-solves in float64: the joint solve, exactly (a
prompt preserved by two adapters is counted twice, as in a joint solve over both lists). Size: (2n + m)·D·4
bytes, e.g. 6 KB for one SD 1.x concept in "last_token" mode (``save_stats=False`` leaves them out).

MMDiT (SD3). Joint attention's text-stream projections ``add_k_proj``/``add_v_proj`` read the text tokens after
adaLN modulation by the timestep and pooled text (and, past the first block, after mixing with the image tokens),
so Eq. 7 has no exact solution there. The layers whose input *is* the text are ``context_embedder`` (the context
rows, before every joint block) and the pooled-text embedder ``time_text_embed.text_embedder.linear_1``: the
authors' FLUX edit changes these two (``uce_flux_edit.py``), and so does erasekit. The default ``targets``
(``attn2.to_k``, ``attn2.to_v``) resolve to ``context_embedder`` on a transformer, which is then edited with the
context keys above; the pooled embedder is edited by a second solve of Eq. 7 on the prompts' pooled embeddings
(one key per prompt, same λ and scales), stored as ``pooled.*`` statistics. With "last_token" keys a prompt's context
key and pooled key come from one pass of the CLIP encoders, cut after its [EoT] token, prompts that begin alike
sharing their prefix's states (:func:`text_keys`).

Keys (``key_mode``): "last_token" — one key per prompt, the context vector at ``attention_mask.sum() − 2`` (the
last subject token; BOS for ""), as the authors' diffusers rewrite (``trainscripts/uce_sd_erase.py``);
"tokens" — the paper-era code (``train-scripts/train_erase.py``): every position from the last subject token
through EOS and padding, erase and guide sequences trimmed to equal length and paired position by position.

``expand_prompts`` adds UCE's templates ("object": "image of X", ...; "art": "painting by X", ...) to every
erase *and* preserve prompt, each templated erase prompt mapped to the concept's guide. (The reference code's
loop ``zip(erase_concepts, preserve_concepts)`` expands nothing without preserve prompts and appends the templated
*erase* prompts to the preserve list, cancelling part of the erasure; that is not reproduced.) The reference
code's default guide for art is "art"; here the guide is always what ``guides`` says ("" unless given).

Guides of several prompts ("square | triangle", or ``guide_related``'s siblings): with ``guide_choice="mean"`` the
target is the mean of their keys; with "nearest" each concept is guided to the one prompt nearest it under the
text encoder (cosine of the bare prompts' last-subject-token vectors), chosen once before any key is collected and
recorded in the adapter's ``guides``. This follows Bui et al., ICLR 2025 ("Fantastic Targets for Concept Erasure
in Diffusion Models and Where To Find Them", https://arxiv.org/abs/2501.18950, §3-4): the effect of erasing a
concept is local in concept space, so a close, benign target erases with fewer side effects than a generic one (the
paper learns its target as a mixture; here the nearest candidate is taken, no training). It matters where every
image shows some value of the concept's attribute: a tinyworld texture guided to "" or to the mean of the other
textures is drawn again wherever the model picks the texture itself (README, "Many concepts at once").
"""

import dataclasses
import logging
import time
import typing
from dataclasses import dataclass
from typing import Literal

import torch

from ..adapter import Adapter, ModuleDelta
from ..core import sd
from ..core.mmdit import POOLED_TEXT_EMBEDDER
from ..core.config import shared_fields
from ..errors import ConfigError
from . import text
from .trainer import check_distinct, package

logger = logging.getLogger(__name__)

DEFAULT_TARGETS: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")
#: what the default targets mean on an MMDiT transformer (module docstring, "MMDiT")
MMDIT_TARGETS: tuple[str, ...] = ("context_embedder",)
#: the pooled-text embedder of SD3's transformer, edited by the pooled solve
MMDIT_POOLED = f"{POOLED_TEXT_EMBEDDER}.linear_1"
RTOL = 1e-10  # singular values below RTOL·σ_max of the text-space edit are numerically zero (fp64)


# ------------------------------------------------------------------------------------------------ config
def validate_config(config) -> None:
    """Shared checks of the closed-form configs: coerce lists/strings to tuples, check types, Literal values,
    non-empty concepts. Raises ConfigError naming the field."""
    name = type(config).__name__
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        origin = typing.get_origin(hint)
        if origin is tuple:
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}.{f.name} must be a sequence of strings, got {value!r}")
            object.__setattr__(config, f.name, tuple(value))
        elif origin is Literal:
            if value not in typing.get_args(hint):
                raise ConfigError(f"{name}.{f.name} must be one of {typing.get_args(hint)}, got {value!r}")
        elif hint is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{name}.{f.name} must be true or false, got {value!r}")
        elif hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}.{f.name} must be an integer, got {value!r}")
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ConfigError(f"{name}.{f.name} must be a number, got {value!r}")
            object.__setattr__(config, f.name, float(value))
    if not config.concepts:
        raise ConfigError(f"{name}: give at least one concept to erase")
    if any(not c.strip() for c in config.concepts):
        raise ConfigError(f"{name}: a concept is empty ({config.concepts!r})")
    check_distinct(config.concepts, name)
    guides = getattr(config, "guides", None)
    if guides is not None and len(guides) not in (1, len(config.concepts)):
        raise ConfigError(f"{name}: give one guide for all concepts or one per concept; got {len(guides)} guides "
                          f"for {len(config.concepts)} concepts")
    targets = getattr(config, "targets", None)
    if targets is not None and not targets:
        raise ConfigError(f"{name}.targets is empty")


def positive(config, *names: str, strict: bool = True) -> None:
    for n in names:
        v = getattr(config, n)
        if v < 0 or (strict and v == 0):
            raise ConfigError(f"{type(config).__name__}.{n} must be {'> 0' if strict else '>= 0'}, got {v}")


#: The prompt and target fields of a closed-form cross-attention solve, shared by UCE and RECE (after their own).
SOLVE_FIELDS: dict[str, tuple] = {
    "expand_prompts": (Literal["none", "object", "art", "tinyworld"], "none",
                       'add prompt templates to every erase and preserve prompt: "none", "object" ("image of/photo '
                       'of/portrait of/picture of/painting of X"), "art" ("painting by/art by/artwork by/picture '
                       'by/style of X") or "tinyworld" (64 of tinyworld\'s caption templates, the concept in context).'),
    "negative_guidance": (float, 0.0, "η, push the erased keys' values past the guide's, away from the concept: "
                          "v* = W(c_g + η(c_g − c_e)); 0 = the paper's replace target (an extension, as ESD's η)."),
    "guide_related": (bool, False, "guide each erased concept to the mean of its related concepts' keys (tinyworld: "
                      "the other values of its attribute, e.g. the other shapes for \"circle\"), given as one guide "
                      "of several prompts, \"square | triangle | ...\"; for a model whose prompts without the concept "
                      "still draw it, where \"\" cannot be the guide; no effect on models without a vocabulary."),
    "guide_choice": (Literal["mean", "nearest"], "mean",
                     'how a guide of several prompts ("square | triangle", or guide_related\'s) becomes the target: '
                     '"mean", the mean of their keys; "nearest", the one prompt nearest the erased concept under the '
                     "text encoder (Bui et al., ICLR 2025), recorded in the adapter's guides."),
    "preserve_related": (bool, False, "also preserve the concepts related to each erased one in the model's own "
                         "concept vocabulary (tinyworld: the other values of its attribute, e.g. the other shapes "
                         'for "circle"); no effect on models without one.'),
    "targets": (tuple[str, ...], DEFAULT_TARGETS,
                "module-path suffixes of the UNet Linear layers to edit (they must read the text context)."),
}
solve_options = shared_fields(SOLVE_FIELDS)


@dataclass(frozen=True)
@solve_options
class UceConfig:
    """Unified Concept Editing (Eq. 7), defaults of the authors' diffusers code.

    Args:
        concepts: prompts to erase, e.g. ("Van Gogh",); any number, solved jointly.
        guides: what each erased concept is mapped to (v* = W·key of the guide); "" = unconditional. One for
            all concepts, or one per concept. A guide may list several prompts separated by "|" ("square |
            triangle"): its key is the mean of theirs, each templated as the guide would be.
        preserve: prompts whose key/value outputs must not change.
        erase_scale: s_e, weight of the erase sum in Eq. 7.
        preserve_scale: s_p, weight of the preserve sum in Eq. 7.
        lam: λ in Eq. 7, keeps W close to the original (repo default 0.5).
        key_mode: "last_token" (one key per prompt at its last subject token, the authors' current code),
            "tokens" (last subject token through EOS/padding, the paper-era code) or "aligned" (every token
            of the prompt, each mapped to its aligned token of the prompt with the guide in the concept's place,
            TIME's alignment: for templates with the concept mid-sentence, whose later tokens carry it too).
        save_stats: store the keys and weights of the solve so that adapters can be merged exactly.
    """

    concepts: tuple[str, ...]
    guides: tuple[str, ...] = ("",)
    preserve: tuple[str, ...] = ()
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    lam: float = 0.5
    key_mode: Literal["last_token", "tokens", "aligned"] = "last_token"
    save_stats: bool = True

    def __post_init__(self):
        validate_config(self)
        positive(self, "erase_scale", "lam")
        positive(self, "preserve_scale", "negative_guidance", strict=False)
        if self.key_mode == "tokens" and any("|" in g for g in self.guides):
            raise ConfigError('a guide of several prompts needs key_mode "last_token" or "aligned" (the "tokens" '
                              "keys pair each erase token with the guide's by position, and the guides' lengths "
                              "differ)")


# ------------------------------------------------------------------------------------------------ keys
@dataclass(frozen=True)
class Keys:
    """The vectors of one closed-form solve, one per row (d = context width).

    Attributes:
        erase: (n, d) erase keys c_e.
        guide: (n, d) guide keys c_g, paired with ``erase``: v*_e = W c_g.
        preserve: (m, d) preserve keys c_p (targets W c_p).
    """

    erase: torch.Tensor
    guide: torch.Tensor
    preserve: torch.Tensor


#: tinyworld caption templates per concept: UCE's expand_prompts="tinyworld", and the trained methods' templates
#: on tinyworld (:func:`erasekit.methods.presets.caption_templates`)
TINYWORLD_TEMPLATES = 64


def templates_for(concept: str, preset: str, fallback: str | None = None, avoid=()) -> tuple[str, ...]:
    """The templates ("{}" = the concept) of ``preset`` for ``concept``; "tinyworld" draws them per concept
    (those of ``fallback`` for a word that is not a tinyworld concept), never naming a concept in ``avoid``."""
    if preset != "tinyworld":
        return text.PRESETS[preset]
    from .. import tinyworld

    for word in (concept, fallback):
        try:
            return tuple(tinyworld.caption_templates(word, TINYWORLD_TEMPLATES, avoid=avoid))
        except (KeyError, StopIteration, TypeError):
            continue
    raise ConfigError(f"expand_prompts='tinyworld' needs tinyworld concepts; {concept!r} is not one")


def _fill(template: str, word: str) -> str:
    return GUIDE_SEPARATOR.join(" ".join(template.replace("{}", w).split()) for w in alternatives(word))


#: separates the prompts of a guide whose key is their mean ("square | triangle")
GUIDE_SEPARATOR = " | "


def alternatives(guide: str) -> list[str]:
    """The prompts of a guide: "square | triangle" → ["square", "triangle"]; a plain guide → [guide]."""
    return [g.strip() for g in guide.split("|")] if "|" in guide else [guide]


@torch.no_grad()
def choose_guides(pipe, config) -> tuple[str, ...]:
    """``config.guides``, one per concept; with ``guide_choice="nearest"`` a guide of several prompts is narrowed
    to the one whose last-subject-token vector has the highest cosine with the concept's (bare prompts)."""
    if getattr(config, "guide_choice", "mean") != "nearest" or not any("|" in g for g in config.guides):
        return tuple(config.guides)
    guides = tuple(config.guides) * len(config.concepts) if len(config.guides) == 1 else tuple(config.guides)
    prompts = list(dict.fromkeys([*config.concepts, *(a for g in guides for a in alternatives(g))]))
    vectors = torch.nn.functional.normalize(text.last_token_embeddings(pipe, prompts).float(), dim=-1)  # one pass
    row = {p: i for i, p in enumerate(prompts)}
    out = []
    for concept, guide in zip(config.concepts, guides):
        options = alternatives(guide)
        cosines = vectors[[row[o] for o in options]] @ vectors[row[concept]]
        out.append(guide if len(options) == 1 else options[int(cosines.argmax())])
    return tuple(out)


def single_guides(config) -> None:
    """Raise ConfigError if a guide of ``config`` lists several prompts (for the methods whose guides are used
    beyond UCE's keys), unless ``guide_choice="nearest"`` narrows each to one (:func:`choose_guides`) before use."""
    if getattr(config, "guide_choice", "mean") == "nearest":
        return
    several = [g for g in getattr(config, "guides", ()) if "|" in g]
    if several or getattr(config, "guide_related", False):
        what = repr(several[0]) if several else "guide_related"
        fix = ("needs guide_choice='nearest' here (one prompt per guide is used beyond the keys)"
               if hasattr(config, "guide_choice") else "is UCE's and RECE's; give one prompt per guide")
        raise ConfigError(f"{type(config).__name__}: a guide of several prompts ({what}) {fix}")


def prompt_pairs(concepts, guides, preset: str = "none", templated_guides: bool = False) -> list[tuple[str, str]]:
    """(erase prompt, guide prompt) pairs: each concept and its templated forms, mapped to its guide (or, with
    ``templated_guides``, to the same template filled with the guide). A concept's templates never name another
    erased concept: "a striped {}" among circle's would hold striped's keys where striped is erased too (the words
    before a concept encode alike in the erase and guide prompts, so a templated guide keeps them)."""
    guides = tuple(guides) * len(concepts) if len(guides) == 1 else tuple(guides)
    pairs = []
    for c, g in zip(concepts, guides):
        pairs.append((c, g))
        others = tuple(x for x in concepts if x != c)
        pairs += [(_fill(t, c), _fill(t, g) if templated_guides else g) for t in templates_for(c, preset, avoid=others)]
    return pairs


def preserve_prompts(config) -> list[str]:
    """``config.preserve``, each with its templated forms, none of which names an erased concept (a preserved
    "a red triangle" would hold what erasing red removes); with ``preserve_related`` on tinyworld the presets have
    added the erased concepts' related concepts (:func:`erasekit.methods.presets.related_concepts`)."""
    out = []
    for p in config.preserve:
        out.append(p)
        out += [_fill(t, p) for t in templates_for(p, config.expand_prompts, config.concepts[0], config.concepts)]
    return out


def collect_keys(pipe, config: UceConfig, batch_size: int = 256) -> Keys:
    """Encode the erase, guide and preserve prompts of ``config`` into keys (fp32, on the text encoder's device);
    guide keys moved by ``negative_guidance``: c_g + η (c_g − c_e)."""
    return _guided(_collect_keys(pipe, config, batch_size), config)


def _guided(keys: Keys, config) -> Keys:
    """``keys`` with the guide keys moved by ``negative_guidance``: c_g + η (c_g − c_e)."""
    eta = getattr(config, "negative_guidance", 0.0)
    return Keys(keys.erase, keys.guide + eta * (keys.guide - keys.erase), keys.preserve) if eta else keys


def _prompt_sets(config) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(erase prompt, guide) pairs, the preserve prompts, and every distinct prompt among them (each encoded once:
    a guide is shared by every concept), guides templated with "aligned" keys."""
    pairs = prompt_pairs(config.concepts, config.guides, config.expand_prompts,
                         templated_guides=config.key_mode == "aligned")
    preserve = preserve_prompts(config)
    guides = [a for _, g in pairs for a in alternatives(g)]
    return pairs, preserve, list(dict.fromkeys([e for e, _ in pairs] + guides + preserve))


def _gather(emb: torch.Tensor, unique: list[str], pairs, preserve: list[str]) -> Keys:
    """One key per erase / guide / preserve prompt from ``emb`` (one row per prompt of ``unique``); a guide of
    several prompts gets the mean of their keys."""
    row = {p: i for i, p in enumerate(unique)}

    def pick(prompts):
        return emb[torch.tensor([row[p] for p in prompts], dtype=torch.long, device=emb.device)]

    guide = torch.stack([pick(alternatives(g)).mean(0) for _, g in pairs]) if pairs else pick([])
    return Keys(pick([e for e, _ in pairs]), guide, pick(preserve))


def text_keys(pipe, config: UceConfig, batch_size: int = 256) -> tuple[Keys, Keys | None]:
    """The context keys (:func:`collect_keys`) and, on an MMDiT pipeline, the pooled keys (:func:`pooled_keys`) of
    ``config``'s prompts (None elsewhere). With "last_token" keys both come from one pass of the text encoders
    (:func:`erasekit.methods.text.last_token_and_pooled`): the prompts are the same, and CLIP computes the last
    subject token's vector on its way to the pooled output at the [EoT] token after it."""
    if not sd.is_mmdit(pipe):
        return collect_keys(pipe, config, batch_size), None
    if config.key_mode != "last_token":
        return collect_keys(pipe, config, batch_size), pooled_keys(pipe, config, batch_size)
    pairs, preserve, unique = _prompt_sets(config)
    context, pooled = text.last_token_and_pooled(pipe, unique, batch_size)
    return (_guided(_gather(context, unique, pairs, preserve), config),
            _guided(_gather(pooled, unique, pairs, preserve), config))


def _collect_keys(pipe, config, batch_size: int) -> Keys:
    aligned = config.key_mode == "aligned"
    pairs, preserve, unique = _prompt_sets(config)
    row = {p: i for i, p in enumerate(unique)}
    if config.key_mode == "last_token":
        return _gather(text.last_token_embeddings(pipe, unique, batch_size), unique, pairs, preserve)  # (U, d)
    emb = text.encode_prompts(pipe, unique, batch_size)  # (U, 77, d)
    if sd.is_mmdit(pipe):  # SD3: the CLIP rows; T5's follow no CLIP token (zeros alike in every prompt without T5)
        emb = emb[:, :77]
    dim = emb.shape[-1]
    cat = lambda xs: torch.cat(xs) if xs else emb.new_zeros(0, dim)  # noqa: E731
    if aligned:  # every token, to its aligned guide token (TIME's alignment)
        guide = [torch.stack([emb[row[a]][torch.tensor(text.align_tokens(pipe, e, a), device=emb.device)]
                              for a in alternatives(g)]).mean(0) for e, g in pairs]
        return Keys(cat([emb[row[e]] for e, _ in pairs]), cat(guide), cat([emb[row[p]] for p in preserve]))
    # "tokens": paper-era keys, train_erase.py (old UCE code)
    last = text.tokenize(pipe, unique).last_index.tolist()
    length = emb.shape[1]
    erase, guide = [], []
    for e, g in pairs:
        i, j = last[row[e]], last[row[g]]
        farthest = max(i, j)
        erase.append(emb[row[e], i:length - (farthest - i)])
        guide.append(emb[row[g], j:length - (farthest - j)])
    kept = [emb[row[p], last[row[p]]:] for p in preserve]
    return Keys(cat(erase), cat(guide), cat(kept))


# ------------------------------------------------------------------------------------------------ solve
def solve_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@dataclass(frozen=True)
class TextEdit:
    """A closed-form edit in text space: ``W' = W (I + P Qᵀ)`` for every edited layer W.

    Attributes:
        P, Q: (d, r) factors of ``D A⁻¹``, r = numerical rank ≤ number of erase keys.
    """

    P: torch.Tensor
    Q: torch.Tensor


def compress(P: torch.Tensor, Q: torch.Tensor, rtol: float = RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factor ``P Qᵀ`` (d×n times n×d) to its numerical rank r ≤ min(n, d): thin QR of both factors, SVD of
    the small core, singular values ≤ rtol·σ_max dropped (at least one direction kept), √σ on each side."""
    Qa, Ra = torch.linalg.qr(P)
    Qb, Rb = torch.linalg.qr(Q)
    U, S, Vh = torch.linalg.svd(Ra @ Rb.T)
    r = max(1, int((S > rtol * S[0]).sum())) if S.numel() and S[0] > 0 else 1
    root = S[:r].sqrt()
    return Qa @ (U[:, :r] * root), Qb @ (Vh[:r].T * root)


def _weights(scale, n: int, dtype, device) -> torch.Tensor:
    """Per-key weights (n, 1) from a scalar scale or an (n,) tensor."""
    if isinstance(scale, torch.Tensor):
        return scale.to(device=device, dtype=dtype).reshape(n, 1)
    return torch.full((n, 1), float(scale), dtype=dtype, device=device)


def statistics(keys: Keys, erase_scale, preserve_scale, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``C = s_e Σ c_e c_eᵀ + s_p Σ c_p c_pᵀ`` and ``D = s_e Σ (c_g − c_e) c_eᵀ`` (d×d); scales may be per key."""
    c_e, c_g, c_p = (k.to(dtype) for k in (keys.erase, keys.guide, keys.preserve))
    w_e = _weights(erase_scale, len(c_e), dtype, c_e.device)
    w_p = _weights(preserve_scale, len(c_p), dtype, c_e.device)
    return (w_e * c_e).T @ c_e + (w_p * c_p).T @ c_p, (w_e * (c_g - c_e)).T @ c_e


def solve(keys: Keys, erase_scale, preserve_scale, lam: float, dtype: torch.dtype | None = None) -> TextEdit:
    """Eq. 7 in text space: ``D A⁻¹ = P Qᵀ`` with ``A = λI + C``, one linear solve for all layers (no explicit
    inverse). ``erase_scale``/``preserve_scale``: scalars, or one weight per key ((n,), (m,) tensors)."""
    device = keys.erase.device
    dtype = dtype or solve_dtype(device)
    c_e, c_g, c_p = (k.to(device=device, dtype=dtype) for k in (keys.erase, keys.guide, keys.preserve))
    w_e = _weights(erase_scale, len(c_e), dtype, device)
    w_p = _weights(preserve_scale, len(c_p), dtype, device)
    # only the directions some key spans: where every key is 0 (SD3 without T5: the 4096-wide context's last 2048
    # columns) A = λI, and A⁻¹ c_e is 0 there, so solving on the rest is exact and cheaper
    support = torch.cat([c_e, c_g, c_p]).abs().sum(0) > 0
    if bool(support.all()) or not bool(support.any()):
        support = None
    s_e, s_g, s_p = (c if support is None else c[:, support] for c in (c_e, c_g, c_p))
    C = (w_e * s_e).T @ s_e + (w_p * s_p).T @ s_p  # Eq. 7, right-hand sums
    A = lam * torch.eye(s_e.shape[1], dtype=dtype, device=device) + C
    P0 = (w_e * (c_g - c_e)).T  # (d, n): s_e (c_g − c_e), so that D = P0 c_e
    Q0 = torch.linalg.solve(A, s_e.T)  # (d, n): A⁻¹ c_e
    if support is not None:
        Q0 = torch.zeros(c_e.shape[1], Q0.shape[1], dtype=dtype, device=device).index_copy_(
            0, support.nonzero().flatten(), Q0)
    return TextEdit(*compress(P0, Q0))


# ------------------------------------------------------------------------------------------------ modules
def base_linear(module: torch.nn.Module) -> torch.nn.Module:
    """The plain Linear under a PEFT/LoRA wrapper (``base_layer``), or the module itself."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def resolve_targets(pipe, targets: tuple[str, ...]) -> tuple[str, ...]:
    """``targets``, with the default cross-attention targets read as ``context_embedder`` on an MMDiT transformer."""
    return MMDIT_TARGETS if sd.is_mmdit(pipe) and tuple(targets) == DEFAULT_TARGETS else tuple(targets)


def find_targets(pipe, targets: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """Denoiser modules whose path equals or ends with ``"." + pattern`` for a pattern in ``targets`` (resolved by
    :func:`resolve_targets`), sorted by path.

    Every one must be a Linear reading the text context (``in_features`` = context width)."""
    dim = text.context_dim(pipe)
    found: dict[str, torch.nn.Linear] = {}
    denoiser = sd.denoiser(pipe)
    for pattern in resolve_targets(pipe, targets):
        hits = {n: m for n, m in denoiser.named_modules() if n == pattern or n.endswith("." + pattern)}
        if not hits:
            raise ConfigError(f"target {pattern!r} matches no module of the {type(denoiser).__name__}")
        for n, m in hits.items():
            m = base_linear(m)
            if not isinstance(m, torch.nn.Linear) or m.in_features != dim:
                raise ConfigError(f"target {pattern!r} matches {n}, which is not a Linear layer reading the "
                                  f"{dim}-wide text context (closed-form edits apply to cross-attention k/v)")
            found[n] = m
    return dict(sorted(found.items()))


def weight64(module: torch.nn.Module, device, dtype) -> torch.Tensor:
    return module.weight.detach().to(device=device, dtype=dtype)


def module_deltas(modules: dict[str, torch.nn.Module], P: torch.Tensor, Q: torch.Tensor,
                  component: str = "unet") -> dict[str, ModuleDelta]:
    """``ΔW = W (P Qᵀ)`` per layer as LoRA factors ``up = W P``, ``down = Qᵀ`` (fp32, CPU, contiguous); a dense
    delta where the factors would hold more numbers than the matrix. Keys: ``"<component>.<path>"``."""
    deltas = {}
    down = Q.T.float().contiguous().cpu()
    M = None
    for name, module in modules.items():
        W = weight64(module, P.device, P.dtype)
        out, dim = W.shape
        r = P.shape[1]
        if r * (out + dim) < out * dim:
            deltas[f"{component}.{name}"] = ModuleDelta(down=down, up=(W @ P).float().contiguous().cpu())
        else:
            M = P @ Q.T if M is None else M
            deltas[f"{component}.{name}"] = ModuleDelta(delta=(W @ M).float().contiguous().cpu())
    return deltas


# ------------------------------------------------------------------------------------------------ adapter
def denoiser_component(pipe) -> str:
    """The pipeline attribute of the denoiser: "unet" or "transformer"."""
    return "transformer" if sd.is_mmdit(pipe) else "unet"


def text_components(pipe) -> tuple[str, ...]:
    """Components a closed-form edit depends on: the denoiser (edited) and the text encoders (they make the keys)."""
    return (denoiser_component(pipe),) + tuple(c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None)


def base_fingerprint(pipe) -> dict:
    """The fingerprint of the components a closed-form edit of ``pipe`` depends on (:func:`text_components`)."""
    from ..adapter import fingerprint

    return dict(fingerprint(pipe, list(text_components(pipe))))


def make_adapter(method: str, config, pipe, deltas, stats: dict, info: dict) -> Adapter:
    """A closed-form edit's Adapter (:func:`erasekit.methods.trainer.package`, over the UNet and text encoders)."""
    return package(pipe, config, method, deltas, text_components(pipe), info, stats)


def key_stats(keys: Keys, erase_scale: float, preserve_scale: float) -> dict[str, torch.Tensor]:
    """The adapter's merge statistics: the keys (fp32, exact) and one weight per key."""
    cpu = lambda t: t.float().contiguous().cpu()  # noqa: E731
    return {"keys.erase": cpu(keys.erase), "keys.guide": cpu(keys.guide), "keys.preserve": cpu(keys.preserve),
            "weights.erase": torch.full((len(keys.erase),), float(erase_scale)),
            "weights.preserve": torch.full((len(keys.preserve),), float(preserve_scale))}


STAT_NAMES = ("keys.erase", "keys.guide", "keys.preserve", "weights.erase", "weights.preserve")
POOLED_STAT_NAMES = tuple("pooled." + n for n in STAT_NAMES)


def pooled_keys(pipe, config, batch_size: int = 256) -> Keys:
    """One pooled-text key per erase / guide / preserve prompt (SD3's ``pooled_projections``), prompts as in
    :func:`collect_keys` (guide keys moved by ``negative_guidance``): with "aligned" keys each templated erase prompt
    is guided by the same template filled with the guide, as its context keys are. (:func:`text_keys` gives these
    and the "last_token" context keys from one encoder pass.)"""
    pairs, preserve, unique = _prompt_sets(config)
    return _guided(_gather(text.pooled_embeddings(pipe, unique, batch_size), unique, pairs, preserve), config)


def pooled_edit(pipe, keys: Keys, erase_scale, preserve_scale, lam: float) -> dict[str, ModuleDelta]:
    """Eq. 7 on the pooled keys, applied to SD3's pooled-text embedder."""
    edit = solve(keys, erase_scale, preserve_scale, lam)
    module = base_linear(sd.denoiser(pipe).get_submodule(MMDIT_POOLED))
    return module_deltas({MMDIT_POOLED: module}, edit.P, edit.Q, "transformer")


@torch.no_grad()
def erase(pipe, config: UceConfig) -> Adapter:
    """Return the UCE edit of ``pipe``'s UNet as exact low-rank deltas; ``pipe`` is not modified."""
    start = time.perf_counter()
    modules = find_targets(pipe, config.targets)
    config = dataclasses.replace(config, guides=choose_guides(pipe, config))  # guide_choice="nearest": one each
    keys, pooled = text_keys(pipe, config)  # 1. keys and guide keys from the text encoder(s); MMDiT: pooled too
    edit = solve(keys, config.erase_scale, config.preserve_scale, config.lam)  # 2. one d×d solve
    deltas = module_deltas(modules, edit.P, edit.Q, denoiser_component(pipe))  # 3. per-layer ΔW = W P Qᵀ
    stats = key_stats(keys, config.erase_scale, config.preserve_scale) if config.save_stats else {}
    if pooled is not None:  # 4. the pooled text, its own solve (module docstring, "MMDiT")
        deltas.update(pooled_edit(pipe, pooled, config.erase_scale, config.preserve_scale, config.lam))
        if config.save_stats:
            stats.update({"pooled." + k: v for k, v in key_stats(pooled, config.erase_scale,
                                                                   config.preserve_scale).items()})
    info = {"rank": int(edit.P.shape[1]), "erase_keys": int(keys.erase.shape[0]),
            "preserve_keys": int(keys.preserve.shape[0]), "targets": list(resolve_targets(pipe, config.targets)),
            "solve_dtype": str(edit.P.dtype).replace("torch.", ""), "seconds": round(time.perf_counter() - start, 3)}
    logger.info("uce: %d concept(s), %d erase / %d preserve keys, rank %d, %d modules in %.2f s",
                len(config.concepts), info["erase_keys"], info["preserve_keys"], info["rank"], len(deltas),
                info["seconds"])
    return make_adapter("uce", config, pipe, deltas, stats, info)


# ------------------------------------------------------------------------------------------------ merge
@torch.no_grad()
def merge(adapters, pipe) -> Adapter:
    """Merge closed-form adapters (UCE, TIME) exactly: one joint solve of Eq. 7 over all their stored erase and
    preserve keys (each with its own weights), re-factorised into low-rank deltas for ``pipe``'s current weights.

    Requires statistics in every adapter (``save_stats``), the same λ, the same edited modules and the same base
    fingerprint (and ``pipe`` of that base); else ConfigError.
    """
    adapters = list(adapters)
    if not adapters:
        raise ConfigError("merge needs at least one adapter")
    for i, a in enumerate(adapters):
        if any(n not in a.stats for n in STAT_NAMES) or "lam" not in a.config:
            raise ConfigError(f"adapter {i} ({a.method}: {', '.join(a.concepts)}) has no closed-form statistics: "
                              f"only UCE/TIME adapters made with save_stats can be merged")
    lams = {float(a.config["lam"]) for a in adapters}
    if len(lams) != 1:
        raise ConfigError(f"adapters to merge must share λ (lam); got {sorted(lams)}")
    names = {tuple(sorted(a.deltas)) for a in adapters}
    if len(names) != 1:
        raise ConfigError("adapters to merge must edit the same modules (same targets); they differ")
    prints = [a.fingerprint for a in adapters if a.fingerprint]
    if any(p != prints[0] for p in prints):
        raise ConfigError("adapters to merge were computed on different base models (fingerprints differ)")
    if prints:
        current = base_fingerprint(pipe)
        if current and any(current.get(k) != v for k, v in prints[0].items()):
            raise ConfigError("the pipeline is not the base model the adapters were computed on "
                              "(fingerprint differs); merge on the original base pipeline")
    dim = text.context_dim(pipe)
    if any(a.stats["keys.erase"].shape[-1] != dim for a in adapters):
        raise ConfigError(f"the adapters' keys do not have the pipeline's text-context width {dim}")
    lam = lams.pop()
    device = text.device_of(pipe)
    cat = lambda name: torch.cat([a.stats[name] for a in adapters]).to(device)  # noqa: E731
    keys = Keys(cat("keys.erase"), cat("keys.guide"), cat("keys.preserve"))
    edit = solve(keys, cat("weights.erase"), cat("weights.preserve"), lam)
    component = denoiser_component(pipe)
    paths = [k.split(".", 1)[1] for k in sorted(adapters[0].deltas) if not k.endswith(MMDIT_POOLED)]
    deltas = module_deltas({p: base_linear(sd.denoiser(pipe).get_submodule(p)) for p in paths}, edit.P, edit.Q,
                           component)
    pooled = all(n in a.stats for a in adapters for n in POOLED_STAT_NAMES)
    if sd.is_mmdit(pipe):
        if not pooled:
            raise ConfigError("merging UCE adapters of an MMDiT transformer needs their pooled statistics "
                              "(made by erasekit ≥ the SD3 release with save_stats)")
        pkeys = Keys(cat("pooled.keys.erase"), cat("pooled.keys.guide"), cat("pooled.keys.preserve"))
        deltas.update(pooled_edit(pipe, pkeys, cat("pooled.weights.erase"), cat("pooled.weights.preserve"), lam))
    methods = {a.method for a in adapters}
    concepts = tuple(c for a in adapters for c in a.concepts)
    targets = adapters[0].info.get("targets", adapters[0].config.get("targets"))
    info = {"rank": int(edit.P.shape[1]), "erase_keys": int(keys.erase.shape[0]),
            "preserve_keys": int(keys.preserve.shape[0]), "targets": targets,
            "merged_from": [{"method": a.method, "concepts": list(a.concepts), "config": a.config} for a in adapters]}
    names = STAT_NAMES + (POOLED_STAT_NAMES if sd.is_mmdit(pipe) else ())
    stats = {n: torch.cat([a.stats[n] for a in adapters]).float().contiguous() for n in names}
    return Adapter(method=methods.pop() if len(methods) == 1 else "uce", concepts=concepts,
                   config={"concepts": concepts, "lam": lam, "targets": targets}, deltas=deltas,
                   base_model=adapters[0].base_model, fingerprint=dict(prints[0]) if prints else {},
                   stats=stats, info=info)
