"""Generate argparse options from a strategy's frozen config dataclass (one place for defaults and docs).

A field ``foo_bar: float = 1.0`` becomes ``--foo-bar FLOAT``; ``tuple[str, ...]`` fields are repeatable
(``concepts`` → ``--concept C --concept C2``); ``bool`` fields get ``--x/--no-x``; ``Literal`` fields get
``choices``; ``X | None`` fields are parsed as ``X`` (left out, None: the method's preset decides). Help text comes
from the dataclass's Google-style ``Args:`` docstring. A TOML file given with ``--config`` sets fields by name; flags
on the command line override it; the config is then built as the Python API builds it
(:func:`erasekit.methods.presets.build`, the presets' one place).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing

from ..errors import ConfigError

_SINGULAR = {"concepts": "concept", "guides": "guide", "targets": "target", "anchors": "anchor",
             "prompts": "prompt", "retain": "retain", "preserve": "preserve"}


def _docs(cls) -> dict[str, str]:
    """Parse ``name: text`` entries of an ``Args:`` docstring section (continuation lines joined)."""
    doc = cls.__doc__ or ""
    out, current = {}, None
    in_args = False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        m = re.match(r"^\s{4,8}([\w, ]+):\s*(.*)$", line)
        if m and not line.startswith(" " * 12):
            for name in m.group(1).split(","):
                current = name.strip()
                out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def flag_name(field_name: str, kind) -> str:
    if kind == "tuple":
        field_name = _SINGULAR.get(field_name, field_name[:-1] if field_name.endswith("s") else field_name)
    return "--" + field_name.replace("_", "-")


def _kind(tp):
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "tuple", typing.get_args(tp)[0]
    if origin is typing.Literal:
        return "literal", typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _kind(args[0]) if len(args) == 1 else ("scalar", str)
    return "scalar", tp


def _arg_type(name: str, tp):
    """The argparse ``type=`` of a scalar of type ``tp`` (the CLI's shared validators: finite floats, UTF-8
    text, seeds in range)."""
    from .types import finite_float, seed, text

    if name == "seed" and tp is int:
        return seed
    return {int: int, float: finite_float}.get(tp, text)


def add_config_arguments(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """Add one option per field of ``cls`` to ``parser`` (all optional: defaults resolve later)."""
    defaults = defaults or {}
    docs = _docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options (defaults from the config dataclass)")
    for f in dataclasses.fields(cls):
        kind, arg = _kind(hints[f.name])
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else
                               (f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
        shown = f" (default: {default!r})" if default not in (None, ()) else ""
        name = flag_name(f.name, kind)
        kw = dict(dest=f.name, default=None, help=(docs.get(f.name, "") + shown).replace("%", "%%"))
        if kind == "tuple":
            group.add_argument(name, action="append", type=_arg_type(f.name, arg),
                               metavar=name[2:].replace("-", "_").upper(), **kw)
        elif kind == "literal":
            group.add_argument(name, choices=list(arg), **kw)
        elif arg is bool:
            group.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(name, type=_arg_type(f.name, arg), metavar=getattr(arg, "__name__", "X").upper(), **kw)


def config_from_args(spec, args: argparse.Namespace, file_values: dict | None = None, tinyworld: bool = False,
                     mmdit: bool = False):
    """The config of registry entry ``spec`` from TOML file values < command-line flags, built as the Python API
    builds it (:func:`erasekit.methods.presets.build`: the preset, on ``tinyworld`` its tinyworld values, then
    these, then per-model values of fields left None)."""
    from ..methods.presets import build

    cls = spec.config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in (file_values or {}).items():
        if key not in names:
            raise ConfigError(f"unknown option {key!r} in the config file; {cls.__name__} has: {', '.join(sorted(names))}")
        values[key] = value
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):
        if _kind(hints[key])[0] == "tuple" and isinstance(value, (list, str)):
            values[key] = tuple([value] if isinstance(value, str) else value)
    try:
        return build(spec, values.pop("concepts", ()), tinyworld, values, mmdit)
    except TypeError as e:  # a TOML value of the wrong type
        raise ConfigError(f"{cls.__name__}: {e}") from e


def read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
