"""Config fields that several configs share, declared once: :func:`shared_fields`.

Used by the trained methods (:data:`erasekit.methods.trainer.TRAINING_FIELDS`, ``ROLLOUT_FIELDS``) and the attacks
(:data:`erasekit.attacks.base.JUDGED_GENERATION_FIELDS`).
"""

from __future__ import annotations

import re
import textwrap
from typing import Callable


def shared_fields(fields: dict[str, tuple]) -> Callable[[type], type]:
    """A class decorator, applied under ``@dataclass``: the class gets ``fields`` (``name: (type, default,
    documentation)``) after its own, and their documentation at the end of its ``Args:`` section. A field the class
    declares itself keeps its declaration; one it documents itself keeps its text."""

    def decorate(cls):
        doc = cls.__doc__ or ""
        lines = []
        for name, (tp, default, text) in fields.items():
            if name not in cls.__dict__.get("__annotations__", {}):
                cls.__annotations__[name] = tp
                setattr(cls, name, default)
            if not re.search(rf"^\s+{name}:", doc, re.MULTILINE):
                lines.append(textwrap.fill(f"{name}: {text}", 116, initial_indent=" " * 8,
                                           subsequent_indent=" " * 12))
        cls.__doc__ = doc.rstrip() + "\n" + "\n".join(lines) + "\n    "
        return cls

    return decorate


__all__ = ["shared_fields"]
