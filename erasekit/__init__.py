"""erasekit: erase concepts from text-to-image diffusion models, as composable safetensors adapters.

>>> import erasekit
>>> pipe = erasekit.load_pipeline()                        # the packaged tinyworld model, on CPU or CUDA
>>> adapter = erasekit.erase(pipe, "uce", ["circle"])       # seconds; an Adapter of low-rank deltas
>>> adapter.save("circle.uce.safetensors")
>>> erasekit.compose.load(pipe, "circle.uce.safetensors")   # compose at generation time
'circle.uce'

Names are imported lazily so that ``import erasekit`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "erase": "erasekit.api",
    "Adapter": "erasekit.adapter", "ModuleDelta": "erasekit.adapter", "load_adapter": "erasekit.adapter",
    "save_adapter": "erasekit.adapter",
    "load_pipeline": "erasekit.loading",
    "ErasureStableDiffusionPipeline": "erasekit.pipelines", "ErasureStableDiffusionXLPipeline": "erasekit.pipelines",
    "ErasureStableDiffusion3Pipeline": "erasekit.pipelines", "ErasureFluxPipeline": "erasekit.pipelines",
    "METHODS": "erasekit.methods",
}
_SUBMODULES = ("compose", "audit", "bench", "tinyworld", "methods", "attacks", "judges", "export", "errors")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"erasekit.{name}")
    raise AttributeError(f"module 'erasekit' has no attribute {name!r}")
