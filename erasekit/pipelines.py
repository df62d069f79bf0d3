"""Stable Diffusion pipelines with erasure verbs named like diffusers' LoRA verbs (docs/design.md §3).

``ErasureStableDiffusionPipeline``, ``ErasureStableDiffusionXLPipeline``, ``ErasureStableDiffusion3Pipeline`` and
``ErasureFluxPipeline`` are the stock diffusers pipelines plus
``load_erasure`` / ``set_erasures`` / ``fuse_erasures`` / ``unfuse_erasures`` / ``unload_erasures`` /
``erasures`` / ``erasures_disabled``, all delegating to :mod:`erasekit.compose` (which works on any stock pipeline
too). Generation itself is the parent's ``__call__``, unchanged: with no erasure loaded the output is the stock
pipeline's, bit for bit. ``custom_pipeline_path()`` gives stock diffusers code the same pipeline as a custom pipeline
(``"erasekit_sd"``, ``"erasekit_sd3"``). On the MMDiT pipelines (SD3, FLUX) erasures change the ``transformer``
instead of a ``unet``; prompt gates (SPM) run on SD3, not on FLUX (its transformer's context is T5 rows only), and
inference-time guards (SAFREE) need a UNet.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from . import compose
from .adapter import Adapter
from .errors import AdapterError, AdapterMismatchError, ConfigError

__all__ = ["ErasureLoaderMixin", "ErasureStableDiffusionPipeline", "ErasureStableDiffusionXLPipeline",
           "ErasureStableDiffusion3Pipeline", "ErasureFluxPipeline", "custom_pipeline_path"]

_CUSTOM_PIPELINES = Path(__file__).resolve().parent / "custom_pipelines"


def custom_pipeline_path(name: str = "erasekit_sd") -> str:
    """The absolute folder of a diffusers custom pipeline shipped with erasekit, for ``custom_pipeline=``.

    diffusers resolves ``custom_pipeline`` as a local folder holding ``pipeline.py`` only when the path exists from
    the current directory, so a relative ``"pipelines/erasekit_sd"`` works from a repository checkout's root alone;
    this path works from anywhere, installed or not::

        from diffusers import DiffusionPipeline
        from erasekit.pipelines import custom_pipeline_path

        pipe = DiffusionPipeline.from_pretrained(erasekit.tinyworld.path(), custom_pipeline=custom_pipeline_path(),
                                                 trust_remote_code=True)
        pipe.load_erasure("circle.uce.safetensors", name="circle")

    ``name="erasekit_sd3"`` is the SD3 pipeline (``ErasureStableDiffusion3Pipeline``).
    """
    shipped = sorted(p.parent.name for p in _CUSTOM_PIPELINES.glob("*/pipeline.py"))
    if name not in shipped:
        raise ConfigError(f"unknown custom pipeline {name!r}; erasekit ships: {', '.join(shipped)}")
    return str(_CUSTOM_PIPELINES / name)


class ErasureLoaderMixin:
    """Erasure verbs for a diffusers pipeline; the mechanics live in :mod:`erasekit.compose` (docs/design.md §3).

    Mirrors diffusers' ``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` / ``unfuse_lora`` /
    ``unload_lora_weights``. Erasures are applied through forward hooks (base weights untouched) unless fused.
    """

    _erasure_loadable_modules = ["unet", "text_encoder"]

    def load_erasure(self, path_or_adapter: str | Path | Adapter, name: str | None = None, weight: float = 1.0,
                     strict: bool = False) -> str:
        """Load an erasure adapter (file path or ``Adapter``) and return its name.

        Args:
            path_or_adapter: an adapter ``.safetensors`` file or an in-memory ``Adapter``.
            name: defaults to the file name without ``.safetensors`` (or ``"<method>-<concepts>"``).
            weight: ``w`` in ``W + w·γ·B A``.
            strict: refuse an adapter computed on another checkpoint of the same architecture.
        """
        adapter, default_name = compose.as_adapter(path_or_adapter)
        outside = [c for c in adapter.components if c not in self._erasure_loadable_modules]
        if outside:
            raise AdapterMismatchError(
                f"{type(self).__name__} loads erasures of {self._erasure_loadable_modules}, but adapter "
                f"{name or default_name!r} changes {outside}")
        return compose.load(self, adapter, name=name or default_name, weight=weight, strict=strict)

    def set_erasures(self, names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
        """Make exactly ``names`` active (others disabled), like ``set_adapters``; ``weights=None`` keeps weights."""
        names = [names] if isinstance(names, str) else list(names)
        loaded = [e["name"] for e in compose.list_erasures(self)]
        for name in names:
            if name not in loaded:
                raise AdapterError(f"unknown erasure {name!r}; loaded erasures: {sorted(loaded) or 'none'}")
        if weights is not None:
            compose.set_weights(self, names, weights)
        for name in loaded:
            (compose.enable if name in names else compose.disable)(self, name)

    def fuse_erasures(self, names: str | Sequence[str] | None = None) -> list[str]:
        """Fuse static erasures into the weights (gated ones refuse: their gating would be lost)."""
        return compose.fuse(self, names)

    def unfuse_erasures(self) -> None:
        """Restore the weights fused by ``fuse_erasures`` bit-exactly (the erasures stay loaded)."""
        compose.unfuse(self)

    def unload_erasures(self, names: str | Sequence[str] | None = None) -> None:
        """Remove erasures (all by default); with none left the pipeline is the base model bit for bit."""
        compose.unload(self, names)

    @property
    def erasures(self) -> list[dict]:
        """The loaded erasures: ``name, method, concepts, weight, enabled, fused, gated, kind`` each."""
        return compose.list_erasures(self)

    @contextmanager
    def erasures_disabled(self):
        """Context manager: generate with every erasure off; restored on exit (even on error)."""
        with compose.disabled(self):
            yield self


class ErasureStableDiffusionPipeline(ErasureLoaderMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x / 2.x) with composable erasures (docs/design.md §3).

    Example (tinyworld, the packaged default model, runs offline on a CPU)::

        import torch
        from erasekit import tinyworld
        from erasekit.pipelines import ErasureStableDiffusionPipeline

        pipe = ErasureStableDiffusionPipeline.from_pretrained(tinyworld.path())
        pipe.load_erasure("circle.uce.safetensors", name="circle")   # made by `erasekit erase uce --concepts circle`
        image = pipe("a red circle", generator=torch.manual_seed(0)).images[0]
        with pipe.erasures_disabled():                              # the base model, restored on exit
            base = pipe("a red circle", generator=torch.manual_seed(0)).images[0]
        pipe.erasures       # [{'name': 'circle', 'method': 'uce', 'concepts': ['circle'], 'weight': 1.0, ...}]
        pipe.fuse_erasures()      # static erasures into the weights; pipe.unfuse_erasures() restores them
        pipe.unload_erasures()    # bitwise back to the base model
    """


class ErasureStableDiffusionXLPipeline(ErasureLoaderMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with composable erasures (docs/design.md §3).

    ``_erasure_loadable_modules`` adds ``text_encoder_2``. Example::

        pipe = ErasureStableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
        pipe.load_erasure("vangogh.uce.safetensors", name="vangogh", weight=1.0)
        image = pipe("a starry night over a village").images[0]
        pipe.unload_erasures()
    """

    _erasure_loadable_modules = ["unet", "text_encoder", "text_encoder_2"]


class ErasureStableDiffusion3Pipeline(ErasureLoaderMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` with composable erasures (docs/design.md §3): adapters change the MMDiT
    ``transformer`` (module paths like ``transformer_blocks.0.attn.add_k_proj``) and the two CLIP encoders.

    Static and gated (SPM) erasures, fuse/unfuse and unload work as on SD 1.x; guards (SAFREE) are refused (they
    filter a UNet's context). Without T5 (``text_encoder_3=None, tokenizer_3=None``) the context's T5 rows are
    zeros. Example::

        pipe = ErasureStableDiffusion3Pipeline.from_pretrained(
            "stabilityai/stable-diffusion-3-medium-diffusers", text_encoder_3=None, tokenizer_3=None)
        pipe.load_erasure("vangogh.uce.safetensors", name="vangogh")
        image = pipe("a starry night over a village").images[0]
        pipe.unload_erasures()
    """

    _erasure_loadable_modules = ["transformer", "text_encoder", "text_encoder_2"]


class ErasureFluxPipeline(ErasureLoaderMixin, FluxPipeline):
    """``FluxPipeline`` with composable erasures: adapters change the ``transformer`` (FLUX's double-stream
    ``transformer_blocks`` and single-stream ``single_transformer_blocks``), the CLIP ``text_encoder`` and the T5
    ``text_encoder_2``. Static erasures only: a prompt gate reads the CLIP context SD pipelines pass to their
    denoiser, and FLUX's transformer sees T5 rows alone (loading a gated adapter raises ``AdapterMismatchError``).
    """

    _erasure_loadable_modules = ["transformer", "text_encoder", "text_encoder_2"]
