"""The erasekit adapter: one ``.safetensors`` file holding an erasure as deltas, plus its record.

Format 1 (spec with a header example: ``adapters/README.md``). Tensors are deltas, never full weights,
keyed by component and diffusers module path::

    unet.<module path>.lora_A.weight          [r, in] (Conv2d: [r, in, kh, kw])   "down"
    unet.<module path>.lora_B.weight          [out, r] (Conv2d: [out, r, 1, 1])   "up"
    text_encoder.<module path>.delta          [out, in] (Conv2d: [out, in, kh, kw]), only where no low rank exists
    stats.<name>                              optional closed-form statistics for exact merging
    gate.<name>                               optional gating data (e.g. SPM's erased-prompt embeddings)

so that ``W_eff = W + weight · gate(prompt) · (lora_B @ lora_A)`` (or ``+ delta``). The record is one JSON
object under the ``erasekit.adapter`` metadata key (safetensors metadata values are strings).

In memory, ``stats.<name>`` is ``Adapter.stats["<name>"]`` and ``gate.<name>`` is ``Adapter.stats["gate.<name>"]``.

Public functions: :func:`save_adapter` (atomic write), :func:`load_adapter` (validates everything, never
unpickles), :func:`read_record` (the header only), :func:`fingerprint` of a pipeline's weights,
:func:`check_compatible` (does an adapter fit a pipeline?) and :func:`resolve_module`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from .core.files import atomic_save_file
from .errors import (AdapterError, AdapterFileError, AdapterFormatError, AdapterMismatchError,
                     BaseModelMismatchWarning, ConfigError)

FORMAT_VERSION = "1.0"  # major.minor; a reader refuses an unknown major
METADATA_KEY = "erasekit.adapter"
FORMAT_KEY = "erasekit.format"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

#: gating rule -> the fields it needs in ``Adapter.gating`` (besides "rule") and their JSON types
GATING_RULES = {
    "static": {},
    "prompt_similarity": {"prompts": list, "metric": str, "facilitate_factor": (int, float)},
}
#: how many elements of each parameter the "weights" digest of :func:`fingerprint` reads, at most
FINGERPRINT_SAMPLE = 8192  # elements read per parameter
FINGERPRINT_BLOCKS = 16  # contiguous blocks they are read in

# safetensors dtype name -> (torch dtype, bytes per element); the dtypes this reader accepts
_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_SAVE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".delta", "delta"))
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_STATS_NAME = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")
_VERSION = re.compile(r"(\d+)(?:\.(\d+))?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# record field -> JSON type; the first four are required, the others have defaults or are stamps
_RECORD_FIELDS = {
    "format_version": str, "method": str, "concepts": list, "config": dict,
    "base_model": str, "fingerprint": dict, "components": list, "gating": dict, "info": dict,
    "created": str, "dtype": str, "tensor_sha256": str, "erasekit_version": str, "torch_version": str,
    "diffusers_version": str, "transformers_version": str,
}
_REQUIRED_FIELDS = ("method", "concepts", "config")
_JSON_NAMES = {str: "string", list: "array", dict: "object"}
_TEXT_MODEL_PREFIX = "text_model."  # transformers < 5 nests CLIPTextModel under .text_model; >= 5 does not


@dataclass(frozen=True)
class ModuleDelta:
    """The change to one ``nn.Linear``/``nn.Conv2d`` weight: low-rank ``up @ down`` or a full ``delta``."""

    down: torch.Tensor | None = None  # lora_A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor | None = None  # lora_B: [out, r] or [out, r, 1, 1]
    delta: torch.Tensor | None = None  # [out, in] or [out, in, kh, kw]

    def __post_init__(self):
        low_rank = self.down is not None and self.up is not None
        if low_rank == (self.delta is not None) or (self.down is None) != (self.up is None):
            raise ValueError("a ModuleDelta is either (down, up) or delta")

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the module weight this delta applies to."""
        if self.delta is not None:
            return tuple(self.delta.shape)
        return (self.up.shape[0],) + tuple(self.down.shape[1:])

    def dense(self) -> torch.Tensor:
        """The full ΔW (fp32)."""
        if self.delta is not None:
            return self.delta.float()
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down).reshape(self.weight_shape)


@dataclass(frozen=True)
class Adapter:
    """An erasure, as returned by every strategy's ``erase(pipe, config)`` and stored in one file.

    Attributes:
        method: registry name of the strategy ("uce", "esd", ...).
        concepts: what was erased, as the user named it.
        config: the strategy's full config (``dataclasses.asdict`` of its frozen config). Must be JSON-able:
            tuples are stored as lists (and come back as lists).
        deltas: "<component>.<module path>" -> ModuleDelta, component in ``COMPONENTS``.
        base_model: id or path of the model the deltas were computed on.
        fingerprint: component -> {"architecture": hex digest, "weights": hex digest} of that base
            (see :func:`fingerprint`).
        gating: {"rule": "static"}, or a prompt-similarity rule with what it needs (SPM); see ``GATING_RULES``.
        stats: optional named tensors (closed-form statistics for exact merging, gate embeddings as "gate.<name>").
        info: free-form extra record (merge provenance ...). The file's own stamps (created time, library
            versions, dtype) are in the file's record, see :func:`read_record`.
    """

    method: str
    concepts: tuple[str, ...]
    config: dict
    deltas: dict[str, ModuleDelta]
    base_model: str = ""
    fingerprint: dict = field(default_factory=dict)
    gating: dict = field(default_factory=lambda: {"rule": "static"})
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(k.startswith(c + ".") for k in self.deltas))

    @property
    def is_static(self) -> bool:
        return self.gating.get("rule", "static") == "static"

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for d in self.deltas.values() for t in (d.down, d.up, d.delta) if t is not None)

    @property
    def is_low_rank(self) -> bool:
        """True when every delta is a (lora_A, lora_B) pair: the layout stock diffusers LoRA loading accepts."""
        return bool(self.deltas) and all(d.delta is None for d in self.deltas.values())

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32) -> Path:
        """Write this adapter to one ``.safetensors`` file, atomically. See :func:`save_adapter`."""
        return save_adapter(self, path, dtype=dtype)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Adapter:
        """Read and validate an adapter file. See :func:`load_adapter`."""
        return load_adapter(path)

    def describe(self) -> dict:
        """A JSON-able summary: the record plus one entry per module (kind, rank, weight shape)."""
        return {
            "method": self.method, "concepts": list(self.concepts), "base_model": self.base_model,
            "components": list(self.components), "gating": self.gating, "config": self.config,
            "fingerprint": self.fingerprint, "parameters": self.num_parameters, "stats": sorted(self.stats),
            "info": self.info,
            "modules": [{"module": k, "kind": "lowrank" if d.delta is None else "full", "rank": d.rank,
                         "shape": list(d.weight_shape)} for k, d in sorted(self.deltas.items())],
        }


# ------------------------------------------------------------------------------------------------ save

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
            value that is not JSON ...).
        AdapterFileError: the file system refused the write.
    """
    path = Path(path)
    dtype = _storage_dtype(dtype)
    tensors = _tensors_to_save(adapter, dtype)
    record = _record(adapter, tensors, dtype)
    metadata = {
        "format": "pt",
        FORMAT_KEY: FORMAT_VERSION,
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


def _split_key(key: str) -> tuple[str, str] | None:
    """'unet.down_blocks.0.proj_in' -> ('unet', 'down_blocks.0.proj_in'); None if the key is malformed."""
    component, _, module_path = key.partition(".")
    if component not in COMPONENTS or not _MODULE_PATH.fullmatch(module_path):
        return None
    return component, module_path


def _check_low_rank_shapes(down_shape, up_shape) -> str | None:
    """Why (lora_A, lora_B) with these shapes is not a format-1 pair, or None if it is."""
    if len(down_shape) not in (2, 4):
        return f"lora_A has shape {list(down_shape)}; expected [r, in] (Linear) or [r, in, kh, kw] (Conv2d)"
    if len(up_shape) != len(down_shape):
        return f"lora_A has shape {list(down_shape)} but lora_B has shape {list(up_shape)}; they must both be 2-D or 4-D"
    if up_shape[1] != down_shape[0]:
        return (f"rank mismatch: lora_A {list(down_shape)} has rank {down_shape[0]} but lora_B {list(up_shape)} "
                f"has rank {up_shape[1]}")
    if len(up_shape) == 4 and tuple(up_shape[2:]) != (1, 1):
        return f"a Conv2d lora_B must be [out, r, 1, 1], got {list(up_shape)}"
    return None


def _tensors_to_save(adapter: Adapter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors: validated, cast, contiguous, on CPU and sharing no storage."""
    tensors = {}
    for key in sorted(adapter.deltas):
        delta = adapter.deltas[key]
        if not isinstance(key, str) or _split_key(key) is None:
            raise AdapterError(f"delta key {key!r} is not '<component>.<module path>' with component one of "
                               f"{', '.join(COMPONENTS)} and a dotted diffusers module path")
        if not isinstance(delta, ModuleDelta):
            raise AdapterError(f"deltas[{key!r}] is a {type(delta).__name__}, expected a ModuleDelta")
        if delta.delta is not None:
            if delta.delta.dim() not in (2, 4):
                raise AdapterError(f"{key}: a full delta is [out, in] or [out, in, kh, kw], got {list(delta.delta.shape)}")
            tensors[f"{key}.delta"] = _prepare(delta.delta, dtype, f"{key}.delta")
        else:
            problem = _check_low_rank_shapes(tuple(delta.down.shape), tuple(delta.up.shape))
            if problem:
                raise AdapterError(f"{key}: {problem}")
            tensors[f"{key}.lora_A.weight"] = _prepare(delta.down, dtype, f"{key}.lora_A.weight")
            tensors[f"{key}.lora_B.weight"] = _prepare(delta.up, dtype, f"{key}.lora_B.weight")
    for name in sorted(adapter.stats):
        value = adapter.stats[name]
        if not isinstance(name, str) or not _STATS_NAME.fullmatch(name):
            raise AdapterError(f"stats name {name!r} must be dotted words of letters, digits, '_' and '-'")
        if not isinstance(value, torch.Tensor):
            raise AdapterError(f"stats[{name!r}] is a {type(value).__name__}, expected a torch.Tensor")
        key = name if name.startswith("gate.") else f"stats.{name}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterError(f"stats[{name!r}] contains NaN or infinite values; refusing to save broken statistics")
        stat_dtype = torch.float32 if value.is_floating_point() else value.dtype
        if stat_dtype not in _DTYPE_NAMES:
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


def _check_gating(gating: dict, where: str, error=AdapterError) -> None:
    rule = gating.get("rule")
    if not isinstance(rule, str):
        raise error(f"{where}: gating needs a 'rule' string (one of {', '.join(GATING_RULES)}), got {gating!r}")
    for name, kind in GATING_RULES.get(rule, {}).items():
        value = gating.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise error(f"{where}: gating rule {rule!r} needs {name!r} "
                        f"({'number' if isinstance(kind, tuple) else kind.__name__}), got {value!r}")
    if rule == "prompt_similarity" and not all(isinstance(p, str) for p in gating["prompts"]):
        raise error(f"{where}: gating 'prompts' must be a list of strings, got {gating['prompts']!r}")


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
    _check_gating(gating, "adapter.gating")
    fp = _jsonable(adapter.fingerprint, "adapter.fingerprint")
    _check_fingerprint(fp, "adapter.fingerprint", AdapterError)
    info = _jsonable(adapter.info, "adapter.info")
    if not isinstance(info, dict):
        raise AdapterError(f"adapter.info must be a dict, got {type(adapter.info).__name__}")
    if not isinstance(adapter.base_model, str):
        raise AdapterError(f"adapter.base_model must be a str (hub id or path), got {adapter.base_model!r}")
    return {
        "format_version": FORMAT_VERSION,
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


def _check_fingerprint(fp, where: str, error) -> None:
    if not isinstance(fp, dict):
        raise error(f"{where} must be a dict component -> {{'architecture': hex, 'weights': hex}}, got {fp!r}")
    for component, digests in fp.items():
        if component not in COMPONENTS or not isinstance(digests, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
            raise error(f"{where}[{component!r}] must map a component ({', '.join(COMPONENTS)}) to "
                        f"{{'architecture': hex, 'weights': hex}}, got {digests!r}")


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"erasekit_version": __version__, "torch_version": torch.__version__}
    for package in ("diffusers", "transformers"):
        try:
            out[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            out[f"{package}_version"] = "not installed"
    return out


def _hash_entry(name: str, dtype_name: str, shape) -> bytes:
    return json.dumps([name, dtype_name, list(shape)]).encode() + b"\n"


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: ``JSON [name, dtype, shape] + newline``, then the raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(_hash_entry(name, _DTYPE_NAMES[tensor.dtype], tensor.shape))
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
        # the architecture id needs the family; only SDXL can be told from the adapter itself
        family = adapter.info.get("architecture") if isinstance(adapter.info.get("architecture"), str) else None
        if family is None and "text_encoder_2" in set(adapter.fingerprint) | set(adapter.components):
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


# ------------------------------------------------------------------------------------------------ load

@dataclass(frozen=True)
class _TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Header:
    data_start: int  # file offset of the tensor data
    tensors: dict[str, _TensorEntry]
    metadata: dict[str, str]


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter file, checking everything; never unpickles.

    The safetensors header is parsed and validated here before safetensors reads any tensor, then the record,
    the tensor keys, ranks and the payload checksum are checked. Tensors come back in the stored dtype.

    Raises:
        AdapterFileError: missing file, truncated or corrupt file, not safetensors, not an erasekit adapter
            (e.g. a plain LoRA file), malformed record, tensor keys outside the format.
        AdapterFormatError: the file's format major version is not the one this erasekit reads.

    Warns:
        UserWarning: the record has fields this erasekit does not know (a newer minor version), or an unknown
            gating rule; they are ignored.
    """
    path = Path(path)
    header = _read_header(path)
    record = _read_record(path, header.metadata)
    layout = _tensor_layout(path, header.tensors)
    if "tensor_sha256" in record:
        found = _file_sha256(path, header)
        if found != record["tensor_sha256"]:
            raise AdapterFileError(f"{path} is corrupt: its tensor data has sha256 {found[:16]}…, but the record "
                                   f"says {record['tensor_sha256'][:16]}… (the file changed after it was written)")
    tensors = _read_tensors(path, header)
    for name in sorted(tensors):
        finite = torch.isfinite(tensors[name]) if tensors[name].is_floating_point() else None
        if finite is not None and not bool(finite.all()):
            raise AdapterFileError(f"{path}: tensor {name!r} holds {int((~finite).sum())} NaN or infinite value(s) "
                                   f"of {finite.numel()}; an adapter's tensors must be finite (the file is broken)")
    deltas = {}
    for key, parts in layout["deltas"].items():
        if "delta" in parts:
            deltas[key] = ModuleDelta(delta=tensors[parts["delta"]])
        else:
            deltas[key] = ModuleDelta(down=tensors[parts["down"]], up=tensors[parts["up"]])
    stats = {name: tensors[key] for name, key in layout["stats"].items()}
    adapter = Adapter(
        method=record["method"], concepts=tuple(record["concepts"]), config=record["config"], deltas=deltas,
        base_model=record.get("base_model", ""), fingerprint=record.get("fingerprint", {}),
        gating=record.get("gating", {"rule": "static"}), stats=stats, info=record.get("info", {}),
    )
    if "components" in record and sorted(record["components"]) != sorted(adapter.components):
        raise AdapterFileError(f"{path}: the record lists components {record['components']} but the tensors "
                               f"change {list(adapter.components)}")
    return adapter


def read_record(path: str | os.PathLike) -> dict:
    """The validated JSON record of an adapter file (with its stamps: created, versions, dtype, checksum).

    Reads only the header (cheap even for large adapters); does not load or verify the tensors.
    Raises the same errors as :func:`load_adapter` for the header and record.
    """
    path = Path(path)
    header = _read_header(path)
    record = _read_record(path, header.metadata)
    _tensor_layout(path, header.tensors)
    return record


def _read_header(path: Path) -> _Header:
    """Parse and validate the safetensors header (8-byte little-endian length + JSON) without safetensors."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AdapterFileError(f"adapter file {path} does not exist") from None
    except OSError as err:
        raise AdapterFileError(f"cannot read adapter file {path}: {err}") from err
    if not stat.S_ISREG(st.st_mode):
        raise AdapterFileError(f"adapter path {path} is not a file (a directory?); expected a .safetensors file")
    size = st.st_size
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise AdapterFileError(f"{path} is truncated or not a safetensors file: {size} bytes, but a "
                                       "safetensors file starts with an 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n < 2 or n > size - 8:
                raise AdapterFileError(f"{path} is truncated or not a safetensors file: its header length says "
                                       f"{n} bytes but only {size - 8} bytes follow")
            if n > _MAX_HEADER_BYTES:
                raise AdapterFileError(f"{path} is not a valid safetensors file: header length {n} bytes is over "
                                       f"the {_MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except OSError as err:
        raise AdapterFileError(f"cannot read adapter file {path}: {err}") from err
    if len(raw) < n:
        raise AdapterFileError(f"{path} is truncated: the header needs {n} bytes, the file has {len(raw)}")
    header = _parse_json(raw, f"{path} is not a valid safetensors file: the header")
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path} is not a valid safetensors file: the header is JSON "
                               f"{type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path} is not a valid safetensors file: __metadata__ must map str to str")
    tensors = {name: _tensor_entry(path, name, info) for name, info in header.items()}
    _check_offsets(path, tensors, size - 8 - n)
    return _Header(data_start=8 + n, tensors=tensors, metadata=metadata)


def _parse_json(raw: bytes, what: str):
    """json.loads, refusing duplicate keys; AdapterFileError mentioning ``what`` on any problem."""
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    def not_json(constant):
        raise ValueError(f"{constant} is not a JSON value")

    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not text.lstrip().startswith("{"):
            raise ValueError(f"it starts with {text[:20]!r}, expected '{{'")
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=not_json)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AdapterFileError(f"{what} is not JSON ({str(err)[:200]})") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_entry(path: Path, name: str, info) -> _TensorEntry:
    bad = f"{path} is not a valid safetensors file: tensor {name[:200]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise AdapterFileError(f"{bad} must be described by exactly dtype, shape and data_offsets, got {str(info)[:200]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise AdapterFileError(f"{bad} has dtype {str(dtype)[:40]!r}, unknown to erasekit (it reads "
                               f"{', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
        raise AdapterFileError(f"{bad} has shape {str(shape)[:200]}, expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] < 2**63):
        raise AdapterFileError(f"{bad} has data_offsets {str(offsets)[:200]}, expected [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * _DTYPES[dtype][1]
    if offsets[1] - offsets[0] != nbytes:
        raise AdapterFileError(f"{bad} is {dtype} {shape} ({nbytes} bytes) but its data_offsets span "
                               f"{offsets[1] - offsets[0]} bytes")
    return _TensorEntry(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _check_offsets(path: Path, tensors: dict[str, _TensorEntry], data_bytes: int) -> None:
    """Tensor data must tile the data section exactly (what safetensors itself demands)."""
    expected = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != expected:
            raise AdapterFileError(f"{path} is corrupt: tensor {name[:200]!r} starts at data byte {entry.begin}, "
                                   f"expected {expected} (tensors must not overlap or leave gaps)")
        expected = entry.end
    if expected > data_bytes:
        raise AdapterFileError(f"{path} is truncated: its tensors need {expected} bytes of data, the file has "
                               f"{data_bytes}")
    if expected < data_bytes:
        raise AdapterFileError(f"{path} is corrupt: {data_bytes - expected} bytes after the last tensor")


def _parse_version(path: Path, version, where: str) -> tuple[int, int]:
    match = _VERSION.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise AdapterFileError(f"{path}: {where} is {str(version)[:40]!r}, expected 'major.minor' such as "
                               f"{FORMAT_VERSION!r}")
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    supported = int(FORMAT_VERSION.split(".")[0])
    if major != supported:
        from . import __version__

        raise AdapterFormatError(f"{path} is an erasekit adapter in format {version}; this erasekit ({__version__}) "
                                 f"reads format {supported}.x. "
                                 + ("Upgrade erasekit to read it." if major > supported else
                                    "Re-create it with a current erasekit."))
    return major, minor


def _read_record(path: Path, metadata: dict[str, str]) -> dict:
    """The JSON record under ``METADATA_KEY``, its format version checked (major refuses, minor warns)."""
    declared = metadata.get(FORMAT_KEY)
    if declared is None and METADATA_KEY not in metadata:
        raise AdapterFileError(f"{path} is a safetensors file but not an erasekit adapter (no {METADATA_KEY!r} "
                               "metadata); plain LoRA files are not adapters")
    if declared is not None:
        _parse_version(path, declared, f"metadata {FORMAT_KEY!r}")
    if METADATA_KEY not in metadata:
        raise AdapterFileError(f"{path} declares erasekit format {declared} but has no {METADATA_KEY!r} record")
    record = _parse_json(metadata[METADATA_KEY], f"{path}: the {METADATA_KEY!r} record")
    if not isinstance(record, dict):
        raise AdapterFileError(f"{path}: the {METADATA_KEY!r} record is JSON {type(record).__name__}, expected an object")
    version = record.get("format_version", declared)
    if version is None:
        raise AdapterFileError(f"{path}: the {METADATA_KEY!r} record has no 'format_version'")
    found = _parse_version(path, version, "the record's format_version")
    if declared is not None and _parse_version(path, declared, FORMAT_KEY) != found:
        raise AdapterFileError(f"{path}: metadata {FORMAT_KEY!r} says {declared} but the record says {version}")
    missing = [name for name in _REQUIRED_FIELDS if name not in record]
    if missing:
        raise AdapterFileError(f"{path}: the {METADATA_KEY!r} record is malformed: missing {', '.join(missing)}")
    for name, kind in _RECORD_FIELDS.items():
        if name in record and not isinstance(record[name], kind):
            raise AdapterFileError(f"{path}: the {METADATA_KEY!r} record is malformed: {name!r} is "
                                   f"{str(record[name])[:80]!r}, expected a JSON {_JSON_NAMES[kind]}")
    if not all(isinstance(c, str) for c in record["concepts"]):
        raise AdapterFileError(f"{path}: the record's 'concepts' must be a list of strings, got {record['concepts']!r}")
    if not all(isinstance(c, str) and c in COMPONENTS for c in record.get("components", [])):
        raise AdapterFileError(f"{path}: the record's 'components' must be among {', '.join(COMPONENTS)}, "
                               f"got {record['components']!r}")
    _check_fingerprint(record.get("fingerprint", {}), f"{path}: the record's fingerprint", AdapterFileError)
    if "gating" in record:
        _check_gating(record["gating"], f"{path}", AdapterFileError)
        if record["gating"]["rule"] not in GATING_RULES:
            warnings.warn(f"{path}: gating rule {record['gating']['rule']!r} is unknown to this erasekit (it knows "
                          f"{', '.join(GATING_RULES)}); the adapter may not apply as intended", UserWarning,
                          stacklevel=3)
    if "tensor_sha256" in record and not _SHA256.fullmatch(record["tensor_sha256"]):
        raise AdapterFileError(f"{path}: the record's tensor_sha256 {record['tensor_sha256'][:80]!r} is not a "
                               "64-digit lowercase hex sha256")
    unknown = sorted(set(record) - set(_RECORD_FIELDS))
    if unknown:
        warnings.warn(f"{path}: record fields {', '.join(map(repr, unknown))} are unknown to this erasekit (file "
                      f"format {version}, this erasekit writes {FORMAT_VERSION}); ignoring them", UserWarning,
                      stacklevel=3)
    return record


def _tensor_layout(path: Path, tensors: dict[str, _TensorEntry]) -> dict:
    """Map tensor keys to deltas and stats, checking the key scheme, pairs, dtypes and ranks from the header."""
    modules: dict[str, dict[str, str]] = {}
    stats: dict[str, str] = {}
    for key in sorted(tensors):
        if key.startswith("stats.") and _STATS_NAME.fullmatch(key[len("stats."):]):
            stats[key[len("stats."):]] = key
            continue
        if key.startswith("gate.") and _STATS_NAME.fullmatch(key[len("gate."):]):
            stats[key] = key
            continue
        for suffix, part in _SUFFIXES:
            if key.endswith(suffix) and _split_key(key[:-len(suffix)]) is not None:
                modules.setdefault(key[:-len(suffix)], {})[part] = key
                break
        else:
            raise AdapterFileError(
                f"{path}: tensor key {key[:200]!r} does not follow adapter format 1: expected "
                f"'<component>.<module path>.lora_A.weight', '….lora_B.weight' or '….delta' with component one of "
                f"{', '.join(COMPONENTS)}, or 'stats.<name>' / 'gate.<name>'")
    for module, parts in modules.items():
        if "delta" in parts and len(parts) > 1:
            raise AdapterFileError(f"{path}: module {module!r} has both a full delta and lora_A/lora_B; expected one")
        if "delta" not in parts and len(parts) == 1:
            have, lack = ("lora_A", "lora_B") if "down" in parts else ("lora_B", "lora_A")
            raise AdapterFileError(f"{path}: module {module!r} has {have} but no {lack}; low-rank deltas are pairs")
        for key in parts.values():
            if tensors[key].dtype not in _FLOAT_DTYPES:
                raise AdapterFileError(f"{path}: tensor {key!r} has dtype {tensors[key].dtype}; deltas are floating "
                                       f"point ({', '.join(_FLOAT_DTYPES)})")
        if "delta" in parts:
            if len(tensors[parts["delta"]].shape) not in (2, 4):
                raise AdapterFileError(f"{path}: tensor {parts['delta']!r} has shape "
                                       f"{list(tensors[parts['delta']].shape)}; expected [out, in] or [out, in, kh, kw]")
        else:
            problem = _check_low_rank_shapes(tensors[parts["down"]].shape, tensors[parts["up"]].shape)
            if problem:
                raise AdapterFileError(f"{path}: module {module!r}: {problem}")
    return {"deltas": modules, "stats": stats}


def _file_sha256(path: Path, header: _Header, chunk: int = 1 << 20) -> str:
    """The same digest as :func:`_tensors_sha256`, read straight from the file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for name in sorted(header.tensors):
                entry = header.tensors[name]
                digest.update(_hash_entry(name, entry.dtype, entry.shape))
                f.seek(header.data_start + entry.begin)
                remaining = entry.end - entry.begin
                while remaining:
                    block = f.read(min(chunk, remaining))
                    if not block:
                        raise AdapterFileError(f"{path} is truncated: it ended inside tensor {name!r}")
                    digest.update(block)
                    remaining -= len(block)
    except OSError as err:
        raise AdapterFileError(f"cannot read adapter file {path}: {err}") from err
    return digest.hexdigest()


def _read_tensors(path: Path, header: _Header) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {name: f.get_tensor(name) for name in header.tensors}
    except BaseException as err:  # noqa: BLE001 - the header was checked above, so this is a last guard
        # safetensors' error types vary across versions, and a Rust panic surfaces as pyo3's PanicException,
        # which derives from BaseException; anything else (KeyboardInterrupt, SystemExit) passes through
        if not isinstance(err, Exception) and type(err).__name__ != "PanicException":
            raise
        raise AdapterFileError(f"{path}: safetensors could not read the tensors ({err})") from err
    for name, entry in header.tensors.items():  # the file may have changed since its header was read
        if out[name].dtype != _DTYPES[entry.dtype][0] or tuple(out[name].shape) != entry.shape:
            raise AdapterFileError(f"{path} changed while it was being read (tensor {name!r})")
    return out


# ----------------------------------------------------------------------------------------- fingerprint

def _canonical_name(name: str) -> str:
    # transformers >= 5 flattened CLIPTextModel (no .text_model); the same checkpoint must fingerprint the same
    return name.removeprefix(_TEXT_MODEL_PREFIX)


def _pipeline_components(pipe) -> tuple[str, ...]:
    return tuple(c for c in COMPONENTS if getattr(pipe, c, None) is not None)


def _fingerprint_module(module: torch.nn.Module, sample: int = FINGERPRINT_SAMPLE) -> dict[str, str]:
    params = sorted(((_canonical_name(name), p) for name, p in module.named_parameters()), key=lambda item: item[0])
    architecture, weights = hashlib.sha256(), hashlib.sha256()
    for name, p in params:
        architecture.update(json.dumps([name, list(p.shape)]).encode() + b"\n")
        flat = p.detach().reshape(-1)
        if flat.numel() > sample:  # FINGERPRINT_BLOCKS contiguous blocks, evenly spread (cheap to read)
            block = sample // FINGERPRINT_BLOCKS
            # integer arithmetic: a float32 linspace rounds differently with the CPU's vector width above ~1.2M
            last = flat.numel() - block
            starts = [i * last // (FINGERPRINT_BLOCKS - 1) for i in range(FINGERPRINT_BLOCKS)]
            flat = torch.cat([flat[s:s + block] for s in starts])
        values = flat.to(device="cpu", dtype=torch.float16).contiguous()
        weights.update(name.encode() + b"\n")
        weights.update(values.view(torch.uint8).numpy())
    return {"architecture": architecture.hexdigest(), "weights": weights.hexdigest()}


def fingerprint(pipe, components=None) -> dict[str, dict[str, str]]:
    """Digests of a pipeline's base weights, stored in an adapter to recognise the model it was made on.

    For each component (by default every one of ``unet``, ``text_encoder``, ``text_encoder_2`` the pipeline
    has): ``"architecture"`` is the sha256 of the sorted (parameter name, shape) list, and ``"weights"`` the
    sha256 of a sample of each parameter, cast to fp16: all of it up to ``FINGERPRINT_SAMPLE`` elements, else
    ``FINGERPRINT_BLOCKS`` contiguous blocks of ``FINGERPRINT_SAMPLE // FINGERPRINT_BLOCKS`` elements starting at
    ``i * (numel - block) // (FINGERPRINT_BLOCKS - 1)`` (the exact recipe: ``adapters/README.md`` §4), so
    fp32 and fp16 loads of one checkpoint, on any device, give the same digests. Parameter names drop a leading
    ``text_model.`` so that transformers 4 and 5 agree. Cost: a read of ≤ ``FINGERPRINT_SAMPLE`` elements per parameter.

    Args:
        pipe: a diffusers pipeline (anything with ``unet``/``text_encoder``/``text_encoder_2`` attributes).
        components: names to fingerprint; default all present.

    Returns:
        component -> {"architecture": hex, "weights": hex}.
    """
    names = _pipeline_components(pipe) if components is None else tuple(components)
    out = {}
    for name in names:
        if name not in COMPONENTS:
            raise ConfigError(f"cannot fingerprint component {name!r}; adapters touch {', '.join(COMPONENTS)}")
        module = getattr(pipe, name, None)
        if module is None:
            raise ConfigError(f"the pipeline has no {name}; it has {', '.join(_pipeline_components(pipe)) or 'none'}")
        out[name] = _fingerprint_module(module)
    return out


# ------------------------------------------------------------------------------------------ compatibility

def _find_module(root: torch.nn.Module, module_path: str) -> torch.nn.Module | None:
    candidates = [module_path]
    if module_path.startswith(_TEXT_MODEL_PREFIX):
        candidates.append(module_path[len(_TEXT_MODEL_PREFIX):])
    else:
        candidates.append(_TEXT_MODEL_PREFIX + module_path)
    for candidate in candidates:
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def resolve_module(pipe, key: str) -> torch.nn.Module:
    """The module a delta key ("unet.<path>", "text_encoder.<path>" ...) names in ``pipe``.

    Text-encoder paths resolve with or without the ``text_model.`` prefix, since transformers 5 dropped it
    from ``CLIPTextModel``.

    Raises:
        AdapterMismatchError: the component or the module does not exist.
    """
    split = _split_key(key)
    if split is None:
        raise AdapterMismatchError(f"{key!r} is not '<component>.<module path>' (component one of {', '.join(COMPONENTS)})")
    component, module_path = split
    root = getattr(pipe, component, None)
    if root is None:
        raise AdapterMismatchError(f"the pipeline has no {component}; it has "
                                   f"{', '.join(_pipeline_components(pipe)) or 'none'}")
    module = _find_module(root, module_path)
    if module is None:
        raise AdapterMismatchError(f"the pipeline's {component} has no module {module_path!r}")
    return module


def _describe_adapter(adapter: Adapter) -> str:
    return f"adapter {adapter.method!r} (erasing {', '.join(adapter.concepts) or 'nothing'})"


def check_compatible(adapter: Adapter, pipe, *, strict: bool = False) -> None:
    """Check that ``adapter`` fits ``pipe`` before it is applied; raise or warn with the reason.

    For every component the adapter changes: the pipeline must have it; its architecture digest must equal
    the adapter's fingerprint (else it was computed on another architecture); its weights digest should (else
    another checkpoint of the same architecture: a warning, an error if ``strict``). Components the adapter
    fingerprinted without changing them (the text encoder a closed-form edit took its keys from) get the same
    digest checks when the pipeline has them. Every delta's module must exist and be an
    ``nn.Linear``/``nn.Conv2d`` whose weight has the delta's shape. An adapter without a fingerprint skips the
    digest checks.

    Raises:
        AdapterMismatchError: missing component or module, other architecture, shape mismatch, or (strict)
            other weights.

    Warns:
        BaseModelMismatchWarning: same architecture, other weights (SPM and text-encoder adapters may transfer).
    """
    what = _describe_adapter(adapter)
    base = f" ({adapter.base_model!r})" if adapter.base_model else ""
    other_weights = []
    # fingerprinted components the adapter does not change (UCE records the text encoder its keys came from)
    # are checked too, where the pipeline has them
    recorded = [c for c in COMPONENTS if c in adapter.fingerprint and c not in adapter.components
                and getattr(pipe, c, None) is not None]
    for component in (*adapter.components, *recorded):
        root = getattr(pipe, component, None)
        if root is None:
            raise AdapterMismatchError(f"{what} changes the {component}, but this {type(pipe).__name__} has no "
                                       f"{component} (it has {', '.join(_pipeline_components(pipe)) or 'none'}); "
                                       f"it was made for another model family{base}")
        expected = adapter.fingerprint.get(component) or {}
        if not (expected.get("architecture") or expected.get("weights")):
            continue
        found = _fingerprint_module(root)
        if expected.get("architecture") and expected["architecture"] != found["architecture"]:
            raise AdapterMismatchError(
                f"{what} was computed on another architecture{base}: its {component} has architecture digest "
                f"{expected['architecture'][:12]}…, this pipeline's {component} has {found['architecture'][:12]}… "
                "(parameter names or shapes differ). Use it with the model family it was made for, or erase again "
                "on this model.")
        if expected.get("weights") and expected["weights"] != found["weights"]:
            other_weights.append(component)
    for component in adapter.components:
        root = getattr(pipe, component)
        problems = []
        for key in sorted(k for k in adapter.deltas if k.startswith(component + ".")):
            module_path = key[len(component) + 1:]
            module = _find_module(root, module_path)
            shape = list(adapter.deltas[key].weight_shape)
            if module is None:
                problems.append(f"{key}: no such module in the pipeline's {component}")
            elif not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                problems.append(f"{key}: is a {type(module).__name__}, expected nn.Linear or nn.Conv2d")
            elif list(module.weight.shape) != shape:
                problems.append(f"{key}: the adapter expects weight shape {shape}, the pipeline has "
                                f"{list(module.weight.shape)}")
        if problems:
            more = f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise AdapterMismatchError(f"{what} does not fit this pipeline's {component} ({len(problems)} "
                                       "module(s)):\n  " + "\n  ".join(problems[:10]) + more)
    if other_weights:
        message = (f"{what} was computed on another checkpoint of the same architecture{base}: the weights of "
                   f"{', '.join(other_weights)} differ from the ones it was made on")
        if strict:
            raise AdapterMismatchError(message + " (strict=True refuses this)")
        warnings.warn(message + "; it may still transfer, check its effect", BaseModelMismatchWarning, stacklevel=2)
