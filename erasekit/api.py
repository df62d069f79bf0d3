"""The Python entry point: ``erasekit.erase(pipe, "uce", ["Van Gogh"], preserve=("Monet",))``."""

from __future__ import annotations

from .adapter import Adapter


def erase(pipe, method: str, concepts, **options) -> Adapter:
    """Erase ``concepts`` from ``pipe`` with a registered method and return the erasure as an :class:`Adapter`.

    Args:
        pipe: a loaded ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (not modified).
        method: a key of :data:`erasekit.methods.METHODS` ("uce", "time", "rece", ...).
        concepts: a prompt or a sequence of prompts to erase.
        **options: fields of the method's config (e.g. ``preserve=("Monet",)``, ``lam=0.1``); the registry's
            preset defaults apply first (on a tinyworld model, its tinyworld values), resolved by
            :func:`erasekit.methods.presets.resolve`.

    Raises:
        ConfigError: unknown method, unknown option, or an invalid value.

    >>> import erasekit
    >>> pipe = erasekit.load_pipeline(device="cpu")
    >>> adapter = erasekit.erase(pipe, "uce", ["circle"])        # closed form: a fraction of a second
    >>> adapter.method, adapter.concepts, len(adapter.deltas)
    ('uce', ('circle',), 14)
    >>> erasekit.erase(pipe, "uce", ["circle"], lamb=0.1)
    Traceback (most recent call last):
    ...
    erasekit.errors.ConfigError: unknown option 'lamb' for method 'uce'; valid options: ...
    """
    from .methods import METHODS
    from .methods.presets import resolve

    config = resolve(method, pipe, options, concepts)
    return METHODS[method].erase(pipe, config)


__all__ = ["erase"]
