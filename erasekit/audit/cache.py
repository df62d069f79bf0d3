"""A folder of base-model results that audits share: the original image of a (prompt, seed), made with every erasure
disabled, is the same for every erasure audited on one model, so an audit given ``base_cache`` reads it from there
instead of generating it again (``erasekit bench`` gives one folder to all its rows). So are the results of attack
steps that run on the base model alone (Ring-A-Bell's genetic search, on the original text encoder: attacks get
the cache as ``cache`` and keep such results with :meth:`BaseCache.result`).

An image is found by the sha256 of everything its pixels depend on: the model (its id, the pipeline and scheduler
classes and the scheduler's config, the default image size, a digest of each component's weights and architecture
as :mod:`erasekit.adapter.fingerprint` reads them, taken with the erasures disabled), the generation (steps,
guidance, each component's dtype, the device type, torch's CPU threads, the torch / diffusers / transformers
versions) and the call that made it: the (prompt, seed) pairs generated together and the image's place among them,
since a batched call may round differently from a single one. So a hit is bit for bit the image a fresh call would
give. Images are PNG files (lossless for the pipeline's 8-bit RGB images), an attack's result a JSON file found by
the same identity and the attack's own description of the call; each is written atomically: audits sharing the
folder from several processes never read half a file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

from .. import compose
from ..adapter.fingerprint import fingerprint_module
from ..core import sd
from ..core.files import replacing
from .store import load_image

#: the pipeline's modules whose weights make an image (those a pipeline has: SD3's denoiser is ``transformer``)
MODULES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def base_identity(pipe, generation: dict) -> dict:
    """Everything but the prompts and seeds that the base model's images depend on, as JSON."""
    import diffusers
    import torch
    import transformers

    modules = {name: getattr(pipe, name) for name in MODULES if getattr(pipe, name, None) is not None}
    with compose.disabled(pipe):  # the base weights (a fused erasure is unfused inside)
        weights = {name: fingerprint_module(module) for name, module in modules.items()}
    device = sd.device_of(pipe).type
    identity = {
        "model": sd.model_id(pipe, type(pipe).__name__), "pipeline": type(pipe).__name__,
        "scheduler": [type(pipe.scheduler).__name__, dict(pipe.scheduler.config)],
        "size": [sd.denoiser(pipe).config.sample_size, getattr(pipe, "vae_scale_factor", None)],
        "weights": weights, "dtypes": {name: str(module.dtype) for name, module in modules.items()},
        "generation": generation, "device": device,
        "threads": torch.get_num_threads() if device == "cpu" else None,  # CPU kernels split sums by thread
        "versions": [torch.__version__, diffusers.__version__, transformers.__version__],
    }
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


class BaseCache:
    """The base-model images and results of one pipeline and generation in the cache folder ``folder``."""

    def __init__(self, folder: str | Path, pipe, generation: dict):
        self.folder = Path(folder)
        self.identity = base_identity(pipe, generation)

    def paths(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Path]:
        """The files of the images of one call generating ``prompts`` with ``seeds``, in order."""
        call = [[p, int(s)] for p, s in zip(prompts, seeds)]
        out = []
        for index in range(len(call)):
            text = json.dumps({"base": self.identity, "call": call, "index": index}, sort_keys=True)
            digest = hashlib.sha256(text.encode()).hexdigest()
            out.append(self.folder / digest[:2] / f"{digest}.png")
        return out

    def images(self, prompts: Sequence[str], seeds: Sequence[int], make: Callable[[], list]) -> list:
        """The call's images from the folder when all are there, else ``make()``'s (then saved for the next)."""
        paths = self.paths(prompts, seeds)
        if all(p.is_file() for p in paths):
            try:
                return [load_image(path.parent, path.name) for path in paths]
            except OSError:  # removed meanwhile, or not an image: made again below
                pass
        images = make()
        for path, image in zip(paths, images):
            with replacing(path) as tmp:
                image.save(tmp, format="PNG")
        return images

    def result(self, kind: str, call: dict, make: Callable[[], dict]) -> dict:
        """The JSON result of a computation on the base model (``kind``, e.g. "ring_a_bell") described by ``call``
        (everything it depends on besides the model: JSON, e.g. digests of its inputs), from the folder when there,
        else ``make()``'s (then saved for the next)."""
        text = json.dumps({"base": self.identity, "kind": kind, "call": call}, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        path = self.folder / kind / digest[:2] / f"{digest}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # not there yet (or damaged): made again below
            pass
        result = make()
        with replacing(path) as tmp:
            Path(tmp).write_text(json.dumps(result))
        return result
