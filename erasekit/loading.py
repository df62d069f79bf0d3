"""Load a text-to-image pipeline from a hub id, a local diffusers folder, or a single checkpoint file.

The default model is tinyworld, shipped inside the package, so nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from .core.device import resolve_device, resolve_dtype
from .errors import ModelNotFoundError

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


#: the names of the packaged models (``--model`` accepts them): tinyworld (UNet) and tinyworld-mmdit (SD3's MMDiT)
PACKAGED = {"tinyworld": "unet", "tinyworld-mmdit": "mmdit", "mmdit": "mmdit"}


def model_path(model: str | Path | None) -> str:
    """``None``/"tinyworld" → the packaged tinyworld folder, "tinyworld-mmdit" (or "mmdit") → the packaged MMDiT one;
    anything else unchanged."""
    from . import tinyworld

    if model is None:
        return str(tinyworld.path())
    if str(model) in PACKAGED:
        return str(tinyworld.path(PACKAGED[str(model)]))
    return str(model)


def _model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    return json.loads(index.read_text()) if index.exists() else {}


def _is_sdxl_folder(folder: Path) -> bool:
    return "XL" in _model_index(folder).get("_class_name", "")


#: the diffusers pipeline class of an MMDiT model folder (``model_index.json``'s ``_class_name``)
MMDIT_CLASSES = ("StableDiffusion3Pipeline", "FluxPipeline")


def _mmdit_folder(path: Path, dtype):
    """An SD3 or FLUX folder as its stock pipeline: components the folder lists as null (SD3 without T5:
    ``text_encoder_3``/``tokenizer_3``) are passed as None, as ``from_pretrained`` needs."""
    import diffusers

    index = _model_index(path)
    cls = getattr(diffusers, index["_class_name"].removeprefix("Erasure"))  # a folder an erasure pipeline saved
    absent = {name: None for name, entry in index.items()
              if not name.startswith("_") and isinstance(entry, list) and entry[:1] == [None]}
    return cls.from_pretrained(str(path), torch_dtype=dtype, **absent)


def _is_sdxl_file(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any(k.startswith("conditioner.embedders.1") for k in f.keys())


def _from(path: Path, source: str, dtype, config):
    """The pipeline from a diffusers folder, a single checkpoint file, or a hub id."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.is_dir() and _model_index(path).get("_class_name", "").removeprefix("Erasure") in MMDIT_CLASSES:
        return _mmdit_folder(path, dtype)
    if path.is_dir():
        cls = StableDiffusionXLPipeline if _is_sdxl_folder(path) else StableDiffusionPipeline
        kwargs = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
        return cls.from_pretrained(str(path), torch_dtype=dtype, **kwargs)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ModelNotFoundError(f"model file not found: {path}")
        cls = StableDiffusionXLPipeline if _is_sdxl_file(path) else StableDiffusionPipeline
        kwargs = {"config": str(config)} if config else {}
        return cls.from_single_file(str(path), torch_dtype=dtype, **kwargs)
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelNotFoundError(
            f"model {source!r} is neither a diffusers folder (with model_index.json), a checkpoint file "
            f"({', '.join(SINGLE_FILE_SUFFIXES)}), nor a hub id of the form 'owner/name'")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)


def load_pipeline(model: str | Path | None = None, *, device: str | torch.device | None = "auto",
                  dtype: str | torch.dtype | None = "auto", config: str | Path | None = None):
    """Load a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, or (from a diffusers folder)
    ``StableDiffusion3Pipeline`` (without T5 when the folder has none) or ``FluxPipeline``.

    Args:
        model: hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5"), a local diffusers folder, a single
            ``.safetensors``/``.ckpt`` checkpoint as SD web UIs keep them, or None/"tinyworld".
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (fp16 on CUDA, fp32 on CPU), "float32", "float16", "bfloat16".
        config: for a single-file checkpoint, a local diffusers folder (or hub id) with the model's
            configs, needed when offline.

    Raises:
        ModelNotFoundError: the model is neither a folder, a checkpoint file nor a reachable hub id.

    >>> import erasekit
    >>> pipe = erasekit.load_pipeline(device="cpu")            # the packaged tinyworld model
    >>> type(pipe).__name__, pipe.unet.config.cross_attention_dim
    ('StableDiffusionPipeline', 64)
    """
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from safetensors import SafetensorError

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = model_path(model)
    path = Path(source)
    try:
        with warnings.catch_warnings():  # diffusers ≥ 0.36 renames torch_dtype to dtype; ≥ 0.30 is supported
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = _from(path, source, dtype, config)
    except ModelNotFoundError:
        raise
    except (OSError, ValueError, SafetensorError, SingleFileComponentError) as e:  # a corrupt or foreign file too
        hint = " (when offline, give a local folder, or `config=` a local config folder for a single file)"
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelNotFoundError(f"could not load model {source!r}: {first_line}{hint}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
