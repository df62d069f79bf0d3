"""Presets, resolved in one place: :func:`resolve` turns (method, model, the user's options) into the config that
``erase`` runs, and an adapter records.

The layers, later ones winning: the config class's own defaults; the registry entry's ``defaults``
(:class:`erasekit.methods.MethodSpec`); on a tinyworld model, the entry's ``tinyworld`` values; the user's options;
last, fields the user left ``None`` get their per-model value (:data:`MODEL_DEFAULTS`: the paper's, or the
tinyworld-sized one), and on tinyworld the world's own data fills what the user left empty (:data:`TINYWORLD_DATA`:
training templates, related concepts to preserve, retain prompts, rendered images). The API
(:func:`erasekit.erase`), the CLI, the registry's ``erase`` and bench build configs here, so a method's ``erase``
never looks at which model it was given, and the adapter records every prompt its training used.
"""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from . import abo, advunlearn, ant, doco, duge, esd, fewshot, layered, paired, realera, rece, spm, trce, uce


#: config class -> (the paper's values, tinyworld's values) of the fields a user may leave ``None``.
MODEL_DEFAULTS: dict[type, tuple[dict, dict]] = {spm.SpmConfig: (spm.PAPER_SD, spm.TINYWORLD)}


def attribute_of(concepts) -> str | None:
    """The one tinyworld attribute every concept is a value of ("shape" for circle and square), else None."""
    from .. import tinyworld

    try:
        attributes = {tinyworld.concept_attribute(c) for c in concepts}
    except KeyError:
        return None
    return attributes.pop() if len(attributes) == 1 else None


def caption_templates(config) -> dict:
    """``templates``, if empty and the concepts are values of one attribute: tinyworld's caption templates (the
    concept in context, never its synonyms, so that leaking through them stays measurable)."""
    if config.templates or not attribute_of(config.concepts):
        return {}
    from .. import tinyworld

    return {"templates": tuple(tinyworld.caption_templates(config.concepts[0], uce.TINYWORLD_TEMPLATES, config.seed))}


def related_concepts(config) -> dict:
    """``preserve``, with ``preserve_related``: plus the erased concepts' siblings (the other shapes for a shape)."""
    if not config.preserve_related:
        return {}
    from .. import tinyworld

    return {"preserve": tuple(dict.fromkeys((*config.preserve, *tinyworld.related_to(config.concepts))))}


def related_anchors(config) -> dict:
    """ESD's ``anchors``, with ``anchor_related`` and none given: each concept's siblings that are not erased, as one
    anchor of several prompts ("square | triangle | ..." for circle)."""
    if not config.anchor_related or config.anchors:
        return {}
    from .. import tinyworld
    from .uce import GUIDE_SEPARATOR

    siblings = tinyworld.related_to(config.concepts)
    anchors = tuple(GUIDE_SEPARATOR.join(s for s in tinyworld.related(c) if s in siblings) for c in config.concepts)
    return {"anchors": anchors} if all(anchors) else {}


def related_guides(config) -> dict:
    """``guides``, with ``guide_related`` and the default guide (""): each concept's guide is its siblings that are
    not erased, as one guide of several prompts ("square | triangle | ..."; the other shapes for a shape)."""
    if not config.guide_related or config.guides != ("",):
        return {}
    from .. import tinyworld
    from .uce import GUIDE_SEPARATOR

    siblings = tinyworld.related_to(config.concepts)
    guides = tuple(GUIDE_SEPARATOR.join(s for s in tinyworld.related(c) if s in siblings) for c in config.concepts)
    return {"guides": guides} if all(guides) else {}


def related_neutral(config) -> dict:
    """SPM's ``neutral``, with ``neutral_related``, the default neutral ("") and concepts of one attribute: their
    siblings that are not erased, as one neutral of several prompts ("square | triangle | ...")."""
    if not config.neutral_related or config.neutral or not attribute_of(config.concepts):
        return {}
    from .. import tinyworld
    from .uce import GUIDE_SEPARATOR

    siblings = tinyworld.related_to(config.concepts)
    return {"neutral": GUIDE_SEPARATOR.join(siblings)} if siblings else {}


def implied_synonyms(config) -> dict:
    """TRCE's ``implied``, with ``implied_synonyms``: plus each erased concept's synonyms but its last one, which is
    held out of training so that leakage through a name never trained on stays measurable ("disc" for circle,
    "round shape" held out)."""
    if not config.implied_synonyms:
        return {}
    from .. import tinyworld

    names = []
    for concept in config.concepts:
        try:
            names += tinyworld.synonyms(concept)[1:-1]
        except KeyError:
            continue
    return {"implied": tuple(n for n in dict.fromkeys((*config.implied, *names)) if n not in config.concepts)}


def safe_siblings(config) -> dict:
    """TRCE's ``safe``, if empty and the concepts are values of one attribute: each concept's first sibling that is
    not erased (square for circle; "" when every sibling is)."""
    if config.safe or not attribute_of(config.concepts):
        return {}
    from .. import tinyworld

    siblings = tinyworld.related_to(config.concepts)
    return {"safe": tuple(next((s for s in tinyworld.related(c) if s in siblings), "") for c in config.concepts)}


def sibling_anchor(config) -> dict:
    """DoCo's ``anchor``, if empty and the concepts are values of one attribute: the first sibling not erased."""
    if config.anchor or not attribute_of(config.concepts):
        return {}
    from .. import tinyworld

    siblings = tinyworld.related_to(config.concepts)
    return {"anchor": next((s for s in tinyworld.related(config.concepts[0]) if s in siblings), "")}


def sibling_partners(config) -> dict:
    """Paired suppression's ``partners``, with ``partner_related`` and none given: each concept's first sibling that
    is not erased (square for circle, green for red, solid for striped)."""
    if not config.partner_related or config.partners:
        return {}
    from .. import tinyworld

    siblings = tinyworld.related_to(config.concepts)
    try:
        partners = tuple(next((s for s in tinyworld.related(c) if s in siblings), "") for c in config.concepts)
    except KeyError:
        return {}
    return {"partners": partners} if all(partners) else {}


def retain_values(config) -> dict:
    """AdvUnlearn's ``retain``, if empty: the attribute's other values in the training templates."""
    attribute = attribute_of(config.concepts)
    if config.retain or not attribute:
        return {}
    from .. import tinyworld

    names = {tinyworld.canonical(c) for c in config.concepts}
    others = [n for n in tinyworld.ATTRIBUTES[attribute] if n not in names]
    return {"retain": tuple(t.replace("{}", o) for o in others for t in config.templates or ("{}",))}


def rendered_images(config) -> dict:
    """Few-shot's images, if no folder is given: fresh renders of the concept (``tinyworld_images``)."""
    return {} if config.images or config.zero_shot else {"tinyworld_images": True}


#: config class -> what tinyworld's data fills in, in order (each: config -> changed fields)
TINYWORLD_DATA: dict[type, tuple] = {
    esd.EsdConfig: (caption_templates, related_concepts, related_anchors),
    ant.AntConfig: (caption_templates, related_concepts),
    doco.DocoConfig: (caption_templates, related_concepts, sibling_anchor),
    abo.AboConfig: (caption_templates,),
    spm.SpmConfig: (caption_templates, related_neutral),
    advunlearn.AdvUnlearnConfig: (caption_templates, retain_values),
    fewshot.FewShotConfig: (rendered_images,),
    uce.UceConfig: (related_concepts, related_guides),
    rece.ReceConfig: (related_concepts, related_guides),
    realera.RealEraConfig: (related_concepts, related_guides),
    trce.TrceConfig: (caption_templates, related_concepts, implied_synonyms, safe_siblings),
    duge.DugeConfig: (caption_templates, related_concepts),
    layered.LayeredConfig: (caption_templates, related_concepts, related_anchors),
    paired.PairedConfig: (sibling_partners,),
}


def on_tinyworld(pipe_or_model) -> bool:
    """Whether presets for tinyworld apply: a tinyworld pipeline or model folder, or None (the packaged model)."""
    from ..tinyworld import is_tinyworld

    return pipe_or_model is None or is_tinyworld(pipe_or_model)


def on_mmdit(pipe_or_model) -> bool:
    """Whether the model's denoiser is an MMDiT transformer (a pipeline, or a folder whose ``model_index.json``
    names an SD3 pipeline); None (the packaged tinyworld) is a UNet."""
    import json
    from pathlib import Path

    from ..core import sd

    if pipe_or_model is None:
        return False
    if not isinstance(pipe_or_model, (str, Path)):
        return sd.is_mmdit(pipe_or_model)
    from ..loading import model_path

    index = Path(model_path(pipe_or_model)) / "model_index.json"
    try:
        return "StableDiffusion3" in json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError):
        return False


def resolve(method: str, pipe_or_model, options: dict, concepts):
    """The config ``erase`` runs for ``method`` on ``pipe_or_model`` (a pipeline, a model folder or id, or None for
    the packaged tinyworld model) with the user's ``options`` (config fields) and ``concepts``.

    Raises:
        ConfigError: unknown method, unknown option, or an invalid value.
    """
    from . import METHODS

    spec = METHODS.get(method)
    if spec is None:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return build(spec, concepts, on_tinyworld(pipe_or_model), options, on_mmdit(pipe_or_model))


def build(spec, concepts, tinyworld: bool, options: dict, mmdit: bool = False):
    """:func:`resolve` for a registry entry ``spec`` and a known kind of model (``mmdit``: the tinyworld-mmdit
    presets apply on tinyworld)."""
    unknown = [k for k in options if k not in spec.options]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} for method {spec.name!r}; valid options: "
                          f"{', '.join(spec.options)}")
    concepts = (concepts,) if isinstance(concepts, str) else tuple(concepts or ())
    return for_model(spec.config_cls(concepts=concepts, **{**spec.preset(tinyworld, mmdit), **options}), tinyworld)


def for_model(config, tinyworld: bool):
    """``config`` made concrete for a model: every field left ``None`` set to its per-model value
    (:data:`MODEL_DEFAULTS`) and, on tinyworld, the world's data where the user gave none (:data:`TINYWORLD_DATA`).
    Idempotent: a resolved config comes back unchanged."""
    paper, tiny = MODEL_DEFAULTS.get(type(config), ({}, {}))
    missing = {k: v for k, v in (tiny if tinyworld else paper).items() if getattr(config, k) is None}
    config = dataclasses.replace(config, **missing) if missing else config
    for fill in TINYWORLD_DATA.get(type(config), ()) if tinyworld else ():
        changes = fill(config)
        if changes and any(getattr(config, k) != v for k, v in changes.items()):
            config = dataclasses.replace(config, **changes)
    return config


__all__ = ["MODEL_DEFAULTS", "TINYWORLD_DATA", "attribute_of", "build", "for_model",
           "on_mmdit", "on_tinyworld", "resolve"]
