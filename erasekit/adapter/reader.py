"""Reading an adapter file: :func:`load_adapter` (validates everything, never unpickles) and :func:`read_record`.

The safetensors header is parsed here, without safetensors, before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.lora import ModuleDelta
from ..errors import AdapterFileError, AdapterFormatError
from .model import (COMPONENTS, FORMAT_KEY, FORMAT_VERSION, GATING_RULES, GUARD_RULES, KINDS, METADATA_KEY,
                    SPARSE_SINCE, TRANSFORMER_SINCE, Adapter)
from .spec import (DTYPES, FLOAT_DTYPES, SPARSE_PARTS, STATS_NAME, check_fingerprint, check_gating, check_guard, check_kind,
                   check_low_rank_shapes, hash_entry, split_key)

_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".delta", "delta"),
             *((suffix, part) for part, suffix in SPARSE_PARTS.items()))
_VERSION = re.compile(r"(\d+)(?:\.(\d+))?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# record field -> JSON type; the first four are required, the others have defaults or are stamps
_RECORD_FIELDS = {
    "format_version": str, "method": str, "concepts": list, "config": dict,
    "base_model": str, "fingerprint": dict, "components": list, "gating": dict, "info": dict,
    "created": str, "dtype": str, "tensor_sha256": str, "erasekit_version": str, "torch_version": str,
    "diffusers_version": str, "transformers_version": str,
    "kind": str, "guard": dict,  # format 1.1
}
_FIELDS_SINCE = {"kind": (1, 1), "guard": (1, 1)}
_REQUIRED_FIELDS = ("method", "concepts", "config")
_JSON_NAMES = {str: "string", list: "array", dict: "object"}


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
            gating or guard rule; they are ignored.
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
    _check_feature_versions(path, record, header, layout)
    deltas = {}
    for key, parts in layout["deltas"].items():
        if "delta" in parts:
            deltas[key] = ModuleDelta(delta=tensors[parts["delta"]])
        elif "values" in parts:
            deltas[key] = ModuleDelta(delta=_dense(path, key, *(tensors[parts[p]] for p in ("values", "indices", "shape"))))
        else:
            deltas[key] = ModuleDelta(down=tensors[parts["down"]], up=tensors[parts["up"]])
    stats = {name: tensors[key] for name, key in layout["stats"].items()}
    adapter = Adapter(
        method=record["method"], concepts=tuple(record["concepts"]), config=record["config"], deltas=deltas,
        base_model=record.get("base_model", ""), fingerprint=record.get("fingerprint", {}),
        gating=record.get("gating", {"rule": "static"}), stats=stats, info=record.get("info", {}),
        guard=record.get("guard", {}),
    )
    kind = record.get("kind", "weights")
    check_kind(kind, adapter.guard, len(deltas), adapter.gating, str(path), AdapterFileError)
    guard_tensors = [k for k in stats if k.startswith("guard.")]
    if guard_tensors and kind != "guard":
        raise AdapterFileError(f"{path}: tensors {guard_tensors[:3]} are a guard's data, but the adapter's kind is "
                               f"{kind!r}")
    if "components" in record and sorted(record["components"]) != sorted(adapter.components):
        raise AdapterFileError(f"{path}: the record lists components {record['components']} but the tensors "
                               f"change {list(adapter.components)}")
    return adapter


def _check_feature_versions(path: Path, record: dict, header: _Header, layout: dict) -> None:
    """A file using a later feature (a sparse delta: 1.2; the ``transformer`` component: 1.3) declares its version."""
    version = record.get("format_version") or header.metadata.get(FORMAT_KEY)
    found = _parse_version(path, version, "format_version")
    sparse = [key for key, parts in layout["deltas"].items() if "values" in parts]
    if sparse and found < tuple(int(x) for x in SPARSE_SINCE.split(".")):
        raise AdapterFileError(f"{path}: module {sparse[0]!r} is a sparse delta, which came in format {SPARSE_SINCE}, "
                               f"but the file says {version}")
    mmdit = [f"module {key!r}" for key in sorted(layout["deltas"]) if key.startswith("transformer.")]
    if "transformer" in record.get("fingerprint", {}):
        mmdit.append("its fingerprint")
    if mmdit and found < tuple(int(x) for x in TRANSFORMER_SINCE.split(".")):
        raise AdapterFileError(f"{path}: {mmdit[0]} names the transformer component (MMDiT pipelines), which came in "
                               f"format {TRANSFORMER_SINCE}, but the file says {version}")


def _dense(path: Path, key: str, values: torch.Tensor, indices: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The full delta of a sparse one (format 1.2): zeros of ``shape`` with ``values`` at the flat ``indices``,
    which must be in range and strictly increasing (each weight once)."""
    dims = shape.tolist()
    if not all(d > 0 for d in dims):
        raise AdapterFileError(f"{path}: module {key!r}: sparse delta shape {dims} must be positive dimensions")
    numel = math.prod(dims)
    if len(values) > numel:
        raise AdapterFileError(f"{path}: module {key!r}: {len(values)} sparse values for a weight of {numel} entries")
    flat = indices.long()
    if len(flat) and (int(flat[0]) < 0 or int(flat[-1]) >= numel or not bool((flat[1:] > flat[:-1]).all())):
        raise AdapterFileError(f"{path}: module {key!r}: sparse delta indices must be strictly increasing and within "
                               f"[0, {numel}) for shape {dims}")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[flat] = values
    return dense.reshape(dims)


def read_record(path: str | os.PathLike) -> dict:
    """The validated JSON record of an adapter file (with its stamps: created, versions, dtype, checksum).

    Reads only the header (cheap even for large adapters); does not load or verify the tensors.
    Raises the same errors as :func:`load_adapter` for the header and record.
    """
    path = Path(path)
    header = _read_header(path)
    record = _read_record(path, header.metadata)
    _check_feature_versions(path, record, header, _tensor_layout(path, header.tensors))
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
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise AdapterFileError(f"{bad} has dtype {str(dtype)[:40]!r}, unknown to erasekit (it reads "
                               f"{', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
        raise AdapterFileError(f"{bad} has shape {str(shape)[:200]}, expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] < 2**63):
        raise AdapterFileError(f"{bad} has data_offsets {str(offsets)[:200]}, expected [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPES[dtype][1]
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
        from .. import __version__

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
    newer = [name for name, since in _FIELDS_SINCE.items() if name in record and found < since]
    if newer:
        raise AdapterFileError(f"{path}: record fields {newer} came in format "
                               f"{'.'.join(map(str, _FIELDS_SINCE[newer[0]]))}, but the file says {version}")
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
    check_fingerprint(record.get("fingerprint", {}), f"{path}: the record's fingerprint", AdapterFileError)
    if "gating" in record:
        check_gating(record["gating"], f"{path}", AdapterFileError)
        if record["gating"]["rule"] not in GATING_RULES:
            warnings.warn(f"{path}: gating rule {record['gating']['rule']!r} is unknown to this erasekit (it knows "
                          f"{', '.join(GATING_RULES)}); the adapter may not apply as intended", UserWarning,
                          stacklevel=3)
    if "guard" in record:
        check_guard(record["guard"], f"{path}", AdapterFileError)
        if record["guard"]["rule"] not in GUARD_RULES:
            warnings.warn(f"{path}: guard rule {record['guard']['rule']!r} is unknown to this erasekit (it knows "
                          f"{', '.join(GUARD_RULES)}); the guard cannot be applied", UserWarning, stacklevel=3)
    if record.get("kind", "weights") not in KINDS:
        raise AdapterFileError(f"{path}: adapter kind {record['kind']!r} is unknown to this erasekit (it knows "
                               f"{', '.join(KINDS)}); upgrade erasekit to read it")
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
        if key.startswith("stats.") and STATS_NAME.fullmatch(key[len("stats."):]):
            stats[key[len("stats."):]] = key
            continue
        if key.startswith(("gate.", "guard.")) and STATS_NAME.fullmatch(key.partition(".")[2]):
            stats[key] = key
            continue
        for suffix, part in _SUFFIXES:
            if key.endswith(suffix) and split_key(key[:-len(suffix)]) is not None:
                modules.setdefault(key[:-len(suffix)], {})[part] = key
                break
        else:
            raise AdapterFileError(
                f"{path}: tensor key {key[:200]!r} does not follow adapter format 1: expected "
                f"'<component>.<module path>.lora_A.weight', '….lora_B.weight', '….delta' or a sparse delta's "
                f"'….delta_values' / '….delta_indices' / '….delta_shape' with component one of "
                f"{', '.join(COMPONENTS)}, or 'stats.<name>' / 'gate.<name>' / 'guard.<name>'")
    for module, parts in modules.items():
        sparse = set(parts) & set(SPARSE_PARTS)
        if sparse and set(parts) != set(SPARSE_PARTS):
            if set(parts) - set(SPARSE_PARTS):
                raise AdapterFileError(f"{path}: module {module!r} has both a sparse delta and "
                                       f"{'a full delta' if 'delta' in parts else 'lora_A/lora_B'}; expected one")
            lack = sorted(SPARSE_PARTS[p].lstrip(".") for p in set(SPARSE_PARTS) - set(parts))
            raise AdapterFileError(f"{path}: module {module!r} is a sparse delta without {', '.join(lack)}; a sparse "
                                   f"delta is three tensors: {', '.join(s.lstrip('.') for s in SPARSE_PARTS.values())}")
        if sparse:
            values, indices, shape = (tensors[parts[p]] for p in ("values", "indices", "shape"))
            if values.dtype not in FLOAT_DTYPES or len(values.shape) != 1:
                raise AdapterFileError(f"{path}: module {module!r}: delta_values must be a 1-D floating-point tensor, "
                                       f"got {values.dtype} {list(values.shape)}")
            if indices.dtype not in ("I32", "I64") or tuple(indices.shape) != tuple(values.shape):
                raise AdapterFileError(f"{path}: module {module!r}: delta_indices must be I32 or I64 of shape "
                                       f"{list(values.shape)} (one per value), got {indices.dtype} {list(indices.shape)}")
            if shape.dtype != "I64" or tuple(shape.shape) not in ((2,), (4,)):
                raise AdapterFileError(f"{path}: module {module!r}: delta_shape must be I64 [2] (Linear) or [4] "
                                       f"(Conv2d), got {shape.dtype} {list(shape.shape)}")
            continue
        if "delta" in parts and len(parts) > 1:
            raise AdapterFileError(f"{path}: module {module!r} has both a full delta and lora_A/lora_B; expected one")
        if "delta" not in parts and len(parts) == 1:
            have, lack = ("lora_A", "lora_B") if "down" in parts else ("lora_B", "lora_A")
            raise AdapterFileError(f"{path}: module {module!r} has {have} but no {lack}; low-rank deltas are pairs")
        for key in parts.values():
            if tensors[key].dtype not in FLOAT_DTYPES:
                raise AdapterFileError(f"{path}: tensor {key!r} has dtype {tensors[key].dtype}; deltas are floating "
                                       f"point ({', '.join(FLOAT_DTYPES)})")
        if "delta" in parts:
            if len(tensors[parts["delta"]].shape) not in (2, 4):
                raise AdapterFileError(f"{path}: tensor {parts['delta']!r} has shape "
                                       f"{list(tensors[parts['delta']].shape)}; expected [out, in] or [out, in, kh, kw]")
        else:
            problem = check_low_rank_shapes(tensors[parts["down"]].shape, tensors[parts["up"]].shape)
            if problem:
                raise AdapterFileError(f"{path}: module {module!r}: {problem}")
    return {"deltas": modules, "stats": stats}


def _file_sha256(path: Path, header: _Header, chunk: int = 1 << 20) -> str:
    """The record's ``tensor_sha256`` (as :mod:`erasekit.adapter.writer` computes it), read from the file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for name in sorted(header.tensors):
                entry = header.tensors[name]
                digest.update(hash_entry(name, entry.dtype, entry.shape))
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
        if out[name].dtype != DTYPES[entry.dtype][0] or tuple(out[name].shape) != entry.shape:
            raise AdapterFileError(f"{path} changed while it was being read (tensor {name!r})")
    return out
