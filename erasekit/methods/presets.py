"""Presets, resolved in one place: :func:`resolve` turns (method, model, the user's options) into the config that
``erase`` runs, and an adapter records.

The layers, later ones winning: the config class's own defaults; the registry entry's ``defaults``
(:class:`erasekit.methods.MethodSpec`); on a tinyworld model, the entry's ``tinyworld`` values; the user's options;
last, fields the user left ``None`` get their per-model value (:data:`MODEL_DEFAULTS`: the paper's, or the
tinyworld-sized one). The API (:func:`erasekit.erase`), the CLI and bench build configs here, so a method's
``erase`` never looks at which model it was given to choose a setting.
"""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from . import spm


#: config class -> (the paper's values, tinyworld's values) of the fields a user may leave ``None``.
MODEL_DEFAULTS: dict[type, tuple[dict, dict]] = {spm.SpmConfig: (spm.PAPER_SD, spm.TINYWORLD)}


def on_tinyworld(pipe_or_model) -> bool:
    """Whether presets for tinyworld apply: a tinyworld pipeline or model folder, or None (the packaged model)."""
    from ..tinyworld import is_tinyworld

    return pipe_or_model is None or is_tinyworld(pipe_or_model)


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
    return build(spec, concepts, on_tinyworld(pipe_or_model), options)


def build(spec, concepts, tinyworld: bool, options: dict):
    """:func:`resolve` for a registry entry ``spec`` and a known kind of model."""
    unknown = [k for k in options if k not in spec.options]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} for method {spec.name!r}; valid options: "
                          f"{', '.join(spec.options)}")
    concepts = (concepts,) if isinstance(concepts, str) else tuple(concepts or ())
    return model_defaults(spec.config_cls(concepts=concepts, **{**spec.preset(tinyworld), **options}), tinyworld)


def model_defaults(config, tinyworld: bool):
    """``config`` with every field left ``None`` set to its per-model value (:data:`MODEL_DEFAULTS`)."""
    paper, tiny = MODEL_DEFAULTS.get(type(config), ({}, {}))
    missing = {k: v for k, v in (tiny if tinyworld else paper).items() if getattr(config, k) is None}
    return dataclasses.replace(config, **missing) if missing else config


__all__ = ["MODEL_DEFAULTS", "build", "model_defaults", "on_tinyworld", "resolve"]
