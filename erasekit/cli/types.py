"""The CLI's argparse ``type=`` validators: each checks one kind of value and raises ArgumentTypeError, which
argparse reports as "argument --flag: <message>"; none creates anything. Shared by every command (and by
``erasekit.cli.config`` for the methods' options)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..errors import ConfigError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; int64 everywhere a seed is stored
ADAPTER_WEIGHT_LIMIT = 100.0  # |w| of an adapter's PATH:WEIGHT; beyond it the image is noise, never an erasure
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_OUT_DIR = "erasekit-out"


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors raised as ``ConfigError``: one ``erasekit: error:`` line, exit 2."""

    def error(self, message):
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def number(value: str, kind: type, what: str, valid, rule: str):
    """``value`` read as ``kind`` (int or float), or ArgumentTypeError: "expected <what>" if it is not one, ``rule``
    (with ``{}`` for the value) if ``valid(number)`` is false."""
    try:
        parsed = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if not valid(parsed):
        raise argparse.ArgumentTypeError(rule.format(value if kind is float else parsed))
    return parsed


def positive_int(value: str) -> int:
    """An integer ≥ 1."""
    return number(value, int, "an integer", lambda n: n >= 1, "must be at least 1, got {}")


def processes_count(value: str) -> int | str:
    """"auto" or an integer ≥ 1."""
    return "auto" if value == "auto" else number(value, int, '"auto" or an integer', lambda n: n >= 1,
                                                 "must be at least 1, got {}")


def finite_float(value: str) -> float:
    """A number that is neither nan nor ±inf."""
    return number(value, float, "a number", math.isfinite, "must be a finite number, got {!r}")


def seed(value: str) -> int:
    """An integer in [0, SEED_MAX]."""
    return number(value, int, "an integer seed", lambda n: 0 <= n <= SEED_MAX,
                  "a seed is an integer from 0 to 2**63-1, got {}")


def text(value: str) -> str:
    """Text that is valid UTF-8: argv bytes that are not arrive as lone surrogates, which can be neither printed,
    tokenised nor stored (paths are checked too: they are printed back)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8: {value!r}") from None
    return value


def _creatable(folder: Path) -> None:
    """Raise unless ``folder`` exists or can be created, and files can be written in it."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # the root always exists
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write to output folder {str(folder)!r}: "
                                         f"{str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to output folder {str(folder)!r}: permission denied")


def out_dir(value: str) -> Path:
    """A folder to write into: an existing folder, or one that can be created (it is not created here)."""
    path = Path(text(value))
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a file, not a folder")
    _creatable(path)
    return path


def out_file(*suffixes: str):
    """A file to write, ending in one of ``suffixes``: not a folder, in a folder that exists or can be created."""
    def check(value: str) -> Path:
        path = Path(text(value))
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{value!r} must end in {' / '.join(suffixes)}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{value!r} is a folder; give a file name")
        _creatable(path.parent)
        return path
    return check


def in_file(value: str) -> Path:
    """An existing file."""
    path = Path(text(value))
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value!r} is a folder, not a file" if path.is_dir()
                                         else f"file not found: {value!r}")
    return path


def adapter_arg(value: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:WEIGHT`` → (an existing file, a finite weight with |w| ≤ ADAPTER_WEIGHT_LIMIT)."""
    path, weight = value, 1.0
    head, colon, tail = value.rpartition(":")
    if colon:
        try:
            path, weight = head, float(tail)
        except ValueError:  # the ':' belongs to the file name, unless the name before it is the file
            if Path(head).is_file() and not Path(value).exists():
                raise argparse.ArgumentTypeError(f"{value!r}: the weight after ':' must be a number, got {tail!r}")
    if not (math.isfinite(weight) and abs(weight) <= ADAPTER_WEIGHT_LIMIT):
        raise argparse.ArgumentTypeError(f"{value!r}: the weight must be a number from -{ADAPTER_WEIGHT_LIMIT:g} "
                                         f"to {ADAPTER_WEIGHT_LIMIT:g}, got {tail!r}")
    return in_file(path), weight
