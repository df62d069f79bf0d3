"""Writing an adapter file: :func:`save_adapter` (validated, atomic) and :func:`write_safetensors`."""

from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..core.files import atomic_save_file
from ..core.lora import ModuleDelta
from ..errors import AdapterError, AdapterFileError, ConfigError
from .model import COMPONENTS, FORMAT_KEY, KINDS, METADATA_KEY, SPARSE_SINCE, TRANSFORMER_SINCE, Adapter
from .spec import (DTYPE_NAMES, SPARSE_PARTS, STATS_NAME, check_fingerprint, check_gating, check_guard, check_kind,
                   check_low_rank_shapes, hash_entry, index_dtype, split_key, stored_sparse)

_SAVE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


def save_adapter(adapter: Adapter, path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32) -> Path:
    """Write ``adapter`` to one ``.safetensors`` file, atomically.

    The file is written to a temporary file in the same folder, flushed, then renamed over ``path``, so
    ``path`` holds either its old content or the complete new adapter, never a partial file.

    Args:
        adapter: the adapter to write.
        path: destination file (by convention ``<concept>.<method>.safetensors``); missing folders are created.
        dtype: storage dtype of the deltas, ``torch.float32`` (default) or ``torch.float16``. Statistics
            (``adapter.stats``) are always stored in fp32.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ConfigError: ``dtype`` is not fp32/fp16, or a delta overflows fp16.
        AdapterError: the adapter cannot be written as format 1 (a bad delta key, mismatched ranks, a config
            value that is not JSON, a guard that holds deltas ...).
        AdapterFileError: the file system refused the write.
    """
    path = Path(path)
    dtype = _storage_dtype(dtype)
    tensors = _tensors_to_save(adapter, dtype)
    record = _record(adapter, tensors, dtype)
    metadata = {
        "format": "pt",
        FORMAT_KEY: record["format_version"],
        METADATA_KEY: json.dumps(record, sort_keys=True, allow_nan=False),
        **_modelspec(adapter),
    }
    write_safetensors(tensors, metadata, path)
    return path


def _storage_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _SAVE_DTYPES:
            raise ConfigError(f"adapter dtype {dtype!r} is not supported; choose one of {', '.join(_SAVE_DTYPES)}")
        return _SAVE_DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16):
        raise ConfigError(f"adapters are stored in torch.float32 or torch.float16, got {dtype}")
    return dtype


def _tensors_to_save(adapter: Adapter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors: validated, cast, contiguous, on CPU and sharing no storage."""
    tensors = {}
    for key in sorted(adapter.deltas):
        delta = adapter.deltas[key]
        if not isinstance(key, str) or split_key(key) is None:
            raise AdapterError(f"delta key {key!r} is not '<component>.<module path>' with component one of "
                               f"{', '.join(COMPONENTS)} and a dotted diffusers module path")
        if not isinstance(delta, ModuleDelta):
            raise AdapterError(f"deltas[{key!r}] is a {type(delta).__name__}, expected a ModuleDelta")
        if delta.delta is not None:
            if delta.delta.dim() not in (2, 4):
                raise AdapterError(f"{key}: a full delta is [out, in] or [out, in, kh, kw], got {list(delta.delta.shape)}")
            dense = _prepare(delta.delta, dtype, f"{key}.delta")
            if stored_sparse(dense, dtype):  # only what changed (format 1.2): values, flat indices, shape
                flat = dense.reshape(-1)
                where = torch.nonzero(flat).reshape(-1)
                tensors[f"{key}{SPARSE_PARTS['values']}"] = flat[where].contiguous()
                tensors[f"{key}{SPARSE_PARTS['indices']}"] = where.to(index_dtype(flat.numel())).contiguous()
                tensors[f"{key}{SPARSE_PARTS['shape']}"] = torch.tensor(dense.shape, dtype=torch.int64)
            else:
                tensors[f"{key}.delta"] = dense
        else:
            problem = check_low_rank_shapes(tuple(delta.down.shape), tuple(delta.up.shape))
            if problem:
                raise AdapterError(f"{key}: {problem}")
            tensors[f"{key}.lora_A.weight"] = _prepare(delta.down, dtype, f"{key}.lora_A.weight")
            tensors[f"{key}.lora_B.weight"] = _prepare(delta.up, dtype, f"{key}.lora_B.weight")
    for name in sorted(adapter.stats):
        value = adapter.stats[name]
        if not isinstance(name, str) or not STATS_NAME.fullmatch(name):
            raise AdapterError(f"stats name {name!r} must be dotted words of letters, digits, '_' and '-'")
        if not isinstance(value, torch.Tensor):
            raise AdapterError(f"stats[{name!r}] is a {type(value).__name__}, expected a torch.Tensor")
        key = name if name.startswith(("gate.", "guard.")) else f"stats.{name}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterError(f"stats[{name!r}] contains NaN or infinite values; refusing to save broken statistics")
        stat_dtype = torch.float32 if value.is_floating_point() else value.dtype
        if stat_dtype not in DTYPE_NAMES:
            raise AdapterError(f"stats[{name!r}] has dtype {value.dtype}, which format 1 cannot store")
        tensors[key] = _prepare(value, stat_dtype, key, check_finite=False)
    return tensors


def _prepare(tensor, dtype: torch.dtype, key: str, *, check_finite: bool = True) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise AdapterError(f"{key} is a {type(tensor).__name__}, expected a torch.Tensor")
    if check_finite and not tensor.is_floating_point():
        raise AdapterError(f"{key} has dtype {tensor.dtype}; deltas must be floating point")
    if check_finite and not bool(torch.isfinite(tensor).all()):
        raise AdapterError(f"{key} contains NaN or infinite values; refusing to save a broken delta")
    out = tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
    if check_finite and not bool(torch.isfinite(out).all()):
        raise ConfigError(f"{key} has values beyond the range of {dtype} (max |x| = "
                          f"{tensor.detach().abs().max().item():.3g}); save with dtype=torch.float32")
    return out


def _jsonable(value, where: str):
    """``value`` as JSON types (tuples become lists); AdapterError naming ``where`` if it is not JSON."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AdapterError(f"{where} is {value}, which JSON cannot hold; adapter records need finite numbers")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise AdapterError(f"{where} has the key {k!r} ({type(k).__name__}); JSON objects need str keys")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    raise AdapterError(f"{where} is {value!r} ({type(value).__name__}), which is not JSON; adapter records hold "
                       "str, int, float, bool, None, lists and dicts with str keys (convert it, e.g. str(path))")


def _record(adapter: Adapter, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """The JSON record stored under ``METADATA_KEY``."""
    if not isinstance(adapter.method, str) or not adapter.method:
        raise AdapterError(f"adapter.method must be a non-empty str, got {adapter.method!r}")
    concepts = _jsonable(adapter.concepts, "adapter.concepts")
    if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
        raise AdapterError(f"adapter.concepts must be a tuple of str, got {adapter.concepts!r}")
    if not isinstance(adapter.config, dict):
        raise AdapterError(f"adapter.config must be a dict (dataclasses.asdict(config)), got {type(adapter.config).__name__}")
    gating = _jsonable(adapter.gating, "adapter.gating")
    if not isinstance(gating, dict):
        raise AdapterError(f"adapter.gating must be a dict, got {adapter.gating!r}")
    check_gating(gating, "adapter.gating")
    guard = _jsonable(adapter.guard, "adapter.guard")
    if not isinstance(guard, dict):
        raise AdapterError(f"adapter.guard must be a dict ({{}} for a weight adapter), got {adapter.guard!r}")
    if guard:
        check_guard(guard, "adapter.guard")
    check_kind(adapter.kind, guard, len(adapter.deltas), gating, "adapter")
    fp = _jsonable(adapter.fingerprint, "adapter.fingerprint")
    check_fingerprint(fp, "adapter.fingerprint", AdapterError)
    info = _jsonable(adapter.info, "adapter.info")
    if not isinstance(info, dict):
        raise AdapterError(f"adapter.info must be a dict, got {type(adapter.info).__name__}")
    if not isinstance(adapter.base_model, str):
        raise AdapterError(f"adapter.base_model must be a str (hub id or path), got {adapter.base_model!r}")
    kind = {"kind": "guard", "guard": guard} if guard else {}  # weight adapters: the 1.0 record, unchanged
    sparse = any(name.endswith(SPARSE_PARTS["values"]) for name in tensors)
    mmdit = "transformer" in adapter.components or "transformer" in fp
    version = max(KINDS[adapter.kind], SPARSE_SINCE if sparse else "1.0", TRANSFORMER_SINCE if mmdit else "1.0",
                  key=lambda v: tuple(map(int, v.split("."))))
    return {
        "format_version": version,
        **kind,
        "method": adapter.method,
        "concepts": concepts,
        "config": _jsonable(adapter.config, "adapter.config"),
        "base_model": adapter.base_model,
        "fingerprint": fp,
        "components": list(adapter.components),
        "gating": gating,
        "info": info,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dtype": str(dtype).removeprefix("torch."),
        "tensor_sha256": _tensors_sha256(tensors),
        **_library_versions(),
    }


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    out = {"erasekit_version": __version__, "torch_version": torch.__version__}
    for package in ("diffusers", "transformers"):
        try:
            out[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            out[f"{package}_version"] = "not installed"
    return out


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: ``JSON [name, dtype, shape] + newline``, then the raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(hash_entry(name, DTYPE_NAMES[tensor.dtype], tensor.shape))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _modelspec(adapter: Adapter) -> dict[str, str]:
    """Optional Stability AI model-spec keys, so that SD UIs can show what the file is."""
    out = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"{adapter.method}: erase {', '.join(adapter.concepts)}",
    }
    if adapter.is_low_rank:
        # the architecture id needs the family; only SDXL can be told from the adapter itself (two text encoders
        # and a UNet: SD3 and FLUX have two text encoders and a transformer)
        family = adapter.info.get("architecture") if isinstance(adapter.info.get("architecture"), str) else None
        named = set(adapter.fingerprint) | set(adapter.components)
        if family is None and "text_encoder_2" in named and "transformer" not in named:
            family = "stable-diffusion-xl-v1-base"
        if family:
            out["modelspec.architecture"] = f"{family}/lora"
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """:func:`erasekit.core.files.atomic_save_file`, with an ``OSError`` reported as ``AdapterFileError``."""
    try:
        atomic_save_file(tensors, metadata, path)
    except OSError as err:
        raise AdapterFileError(f"cannot write {path}: {err}") from err
