"""Adapter file format 1: save → load round trip, atomic writes, every named load error, compatibility checks,
fingerprints, and a fuzz test that no damaged file gets past ``load_adapter`` as anything but an AdapterError."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import warnings
from datetime import datetime, timedelta
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from erasekit.adapter import (FORMAT_KEY, FORMAT_VERSION, KINDS, METADATA_KEY, Adapter, ModuleDelta, check_compatible,
                              fingerprint, load_adapter, read_record, resolve_module, save_adapter)
from erasekit.errors import (AdapterError, AdapterFileError, AdapterFormatError, AdapterMismatchError,
                             BaseModelMismatchWarning, ConfigError)
from erasekit.testing import tiny_pipeline

SD1_SPEC = {  # delta key -> rank (None: full delta); real module paths of tiny_pipeline("sd1")
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 2,
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": 1,
    "unet.down_blocks.0.attentions.0.proj_in": 1,  # Conv2d 1x1 in SD 1.x
    "unet.conv_in": 2,  # Conv2d 3x3
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0": None,
    "text_encoder.encoder.layers.0.self_attn.q_proj": None,
}
SDXL_SPEC = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": 1,
    "text_encoder.encoder.layers.1.mlp.fc1": None,
    "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj": 2,
    "text_encoder_2.text_projection": None,
}
TO_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def pipes():
    """Tiny pipelines, built once: sd1 (seeds 0 and 1), sd2, sdxl."""
    return {"sd1": tiny_pipeline("sd1"), "sd1-seed1": tiny_pipeline("sd1", seed=1), "sd2": tiny_pipeline("sd2"),
            "sdxl": tiny_pipeline("sdxl")}


def make_adapter(pipe, spec: dict, *, seed: int = 0, with_fingerprint: bool = True, **fields) -> Adapter:
    """An adapter with random deltas shaped like ``pipe``'s modules (low-rank where spec gives a rank)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for key, rank in spec.items():
        shape = tuple(resolve_module(pipe, key).weight.shape)
        if rank is None:
            deltas[key] = ModuleDelta(delta=torch.randn(shape, generator=g))
        else:
            up_tail = (1, 1) if len(shape) == 4 else ()
            deltas[key] = ModuleDelta(down=torch.randn((rank, *shape[1:]), generator=g),
                                      up=torch.randn((shape[0], rank, *up_tail), generator=g))
    record = dict(method="uce", concepts=("cat", "kitten"),
                  config={"lam": 0.5, "targets": ["attn2.to_k", "attn2.to_v"], "preserve": {"dog": 1.0}},
                  base_model="tiny", fingerprint=fingerprint(pipe) if with_fingerprint else {},
                  stats={"C": torch.randn(4, 4, generator=g, dtype=torch.float64)}, info={"note": "test"})
    record.update(fields)
    return Adapter(deltas=deltas, **record)


def assert_same_adapter(loaded: Adapter, original: Adapter, dtype=torch.float32) -> None:
    assert loaded.method == original.method and loaded.concepts == tuple(original.concepts)
    assert loaded.config == json.loads(json.dumps(original.config))  # tuples come back as lists
    for name in ("base_model", "fingerprint", "gating", "info"):
        assert getattr(loaded, name) == getattr(original, name), name
    assert loaded.deltas.keys() == original.deltas.keys()
    for key, delta in original.deltas.items():
        for part in ("down", "up", "delta"):
            want, got = getattr(delta, part), getattr(loaded.deltas[key], part)
            assert (want is None) == (got is None), (key, part)
            if want is not None:
                assert got.dtype == dtype and torch.equal(got, want.to(dtype)), (key, part)
    assert loaded.stats.keys() == original.stats.keys()
    for name, tensor in original.stats.items():
        assert loaded.stats[name].dtype == torch.float32 and torch.equal(loaded.stats[name], tensor.float())


def tmp_leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("family,spec", [("sd1", SD1_SPEC), ("sdxl", SDXL_SPEC)])
def test_round_trip(pipes, tmp_path, family, spec):
    adapter = make_adapter(pipes[family], spec, config={"lam": 0.5, "targets": ("attn2.to_k",)},
                           stats={"C": torch.randn(3, 3), "D": torch.randn(3, 3), "gate.prompts": torch.randn(2, 3)})
    path = adapter.save(tmp_path / f"cat.uce.{family}.safetensors")
    loaded = Adapter.load(path)
    assert_same_adapter(loaded, adapter)
    assert loaded.config["targets"] == ["attn2.to_k"]
    assert loaded.components == adapter.components
    check_compatible(loaded, pipes[family])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh file loads without any warning
        assert_same_adapter(load_adapter(save_adapter(loaded, tmp_path / "again.safetensors")), adapter)


def test_sdxl_round_trip_touches_three_components(pipes, tmp_path):
    adapter = make_adapter(pipes["sdxl"], SDXL_SPEC)
    loaded = load_adapter(adapter.save(tmp_path / "a.safetensors"))
    assert loaded.components == ("unet", "text_encoder", "text_encoder_2")
    assert set(loaded.fingerprint) == {"unet", "text_encoder", "text_encoder_2"}


def test_fp16_save(pipes, tmp_path):
    adapter = make_adapter(pipes["sd1"], SD1_SPEC)
    full, half = adapter.save(tmp_path / "fp32.safetensors"), adapter.save(tmp_path / "fp16.safetensors",
                                                                          dtype=torch.float16)
    assert_same_adapter(load_adapter(half), adapter, dtype=torch.float16)  # stats stay fp32
    assert read_record(half)["dtype"] == "float16" and read_record(full)["dtype"] == "float32"
    assert half.stat().st_size < full.stat().st_size


def test_fp16_overflow_and_bad_dtype_refused(tmp_path):
    big = Adapter(method="x", concepts=("c",), config={}, deltas={TO_K: ModuleDelta(delta=torch.full((2, 2), 1e6))})
    with pytest.raises(ConfigError, match="float32"):
        big.save(tmp_path / "a.safetensors", dtype=torch.float16)
    with pytest.raises(ConfigError, match="float16"):
        big.save(tmp_path / "a.safetensors", dtype=torch.bfloat16)
    assert list(tmp_path.iterdir()) == []


def test_header_record_and_modelspec(pipes, tmp_path):
    from safetensors import safe_open

    sdxl = make_adapter(pipes["sdxl"], {k: r for k, r in SDXL_SPEC.items() if r is not None})
    sd1 = make_adapter(pipes["sd1"], SD1_SPEC)
    for adapter, name in ((sdxl, "xl"), (sd1, "sd1")):
        path = adapter.save(tmp_path / f"{name}.safetensors")
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        # weight adapters declare 1.0, the lowest version that holds them (guards need 1.1: tests/test_safree.py)
        assert metadata["format"] == "pt" and metadata[FORMAT_KEY] == KINDS["weights"] == "1.0"
        assert FORMAT_VERSION == "1.3"
        assert metadata["modelspec.sai_model_spec"] == "1.0.0" and metadata["modelspec.implementation"] == "diffusers"
        assert metadata["modelspec.title"] == "uce: erase cat, kitten"
        record = json.loads(metadata[METADATA_KEY])
        assert metadata[METADATA_KEY] == json.dumps(record, sort_keys=True)
        assert record == read_record(path)
        for key in ("format_version", "method", "config", "concepts", "base_model", "fingerprint", "components",
                    "gating", "info", "created", "erasekit_version", "torch_version", "diffusers_version",
                    "transformers_version", "dtype", "tensor_sha256"):
            assert key in record, key
        assert record["format_version"] == "1.0" and record["components"] == list(adapter.components)
        assert "kind" not in record and "guard" not in record  # the 1.0 record, unchanged
        assert datetime.strptime(record["created"], "%Y-%m-%dT%H:%M:%SZ")
        assert re.fullmatch(r"[0-9a-f]{64}", record["tensor_sha256"])
    # an all-low-rank SDXL adapter declares its architecture; sd1 has a full delta, so it does not
    with safe_open(str(tmp_path / "xl.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    with safe_open(str(tmp_path / "sd1.safetensors"), "pt") as f:
        assert "modelspec.architecture" not in f.metadata()


def test_tensors_saved_contiguous_and_unshared(tmp_path):
    shared = torch.randn(8, 3)
    adapter = Adapter(method="x", concepts=("c",), config={}, deltas={
        "unet.a": ModuleDelta(down=shared.t(), up=shared),  # non-contiguous view, storage shared with the next
        "unet.b": ModuleDelta(down=shared[:2], up=torch.randn(8, 2)),
    })
    loaded = load_adapter(adapter.save(tmp_path / "a.safetensors"))
    assert torch.equal(loaded.deltas["unet.a"].down, shared.t()) and torch.equal(loaded.deltas["unet.b"].down, shared[:2])


# ---------------------------------------------------------------------------------------- atomic write

def test_failed_save_leaves_no_file(tmp_path):
    bad = Adapter(method="x", concepts=("c",), config={"out": tmp_path}, deltas={TO_K: ModuleDelta(delta=torch.ones(2, 2))})
    with pytest.raises(AdapterError, match=r"config\['out'\].*not JSON"):
        bad.save(tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    good = Adapter(method="x", concepts=("c",), config={}, deltas={TO_K: ModuleDelta(delta=torch.ones(2, 2))})
    good.save(path)
    before = path.read_bytes()

    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)  # the failure comes after the temporary file is fully written
    with pytest.raises(AdapterFileError, match="No space left"):
        Adapter(method="y", concepts=("d",), config={}, deltas={TO_K: ModuleDelta(delta=torch.zeros(2, 2))}).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and tmp_leftovers(tmp_path) == []
    assert load_adapter(path).method == "x"


def test_invalid_adapters_refused_on_save(tmp_path):
    cases = [
        ({"vae.decoder.conv_in": ModuleDelta(delta=torch.ones(2, 2))}, "component"),
        ({TO_K: ModuleDelta(down=torch.ones(2, 4), up=torch.ones(3, 1))}, "rank mismatch"),
        ({TO_K: ModuleDelta(delta=torch.tensor([[float("nan")]]))}, "NaN"),
    ]
    for deltas, message in cases:
        with pytest.raises(AdapterError, match=message):
            Adapter(method="x", concepts=("c",), config={}, deltas=deltas).save(tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="prompts"):
        Adapter(method="spm", concepts=("c",), config={}, deltas={}, gating={"rule": "prompt_similarity"}).save(
            tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- load errors

def small_adapter(**fields) -> Adapter:
    g = torch.Generator().manual_seed(0)
    record = dict(method="spm", concepts=("circle",), config={"rank": 1, "targets": ["attn2"]},
                  deltas={TO_K: ModuleDelta(down=torch.randn(1, 24, generator=g), up=torch.randn(16, 1, generator=g)),
                          "unet.conv_in": ModuleDelta(delta=torch.randn(16, 4, 3, 3, generator=g))},
                  gating={"rule": "prompt_similarity", "prompts": ["a circle"], "metric": "cosine",
                          "facilitate_factor": 3.0},
                  stats={"gate.prompts": torch.randn(1, 24, generator=g)})
    record.update(fields)
    return Adapter(**record)


@lru_cache(maxsize=1)
def small_adapter_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return small_adapter().save(os.path.join(folder, "a.safetensors")).read_bytes()


def split_file(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_file(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def with_record(**changes) -> bytes:
    """The small adapter's file with record fields changed (None deletes one)."""
    header, payload = split_file(small_adapter_bytes())
    record = json.loads(header["__metadata__"][METADATA_KEY])
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    header["__metadata__"][METADATA_KEY] = json.dumps(record)
    return join_file(header, payload)


def with_metadata(**changes) -> bytes:
    header, payload = split_file(small_adapter_bytes())
    header["__metadata__"].update(changes)
    return join_file(header, payload)


def plain_lora(tmp_path) -> bytes:
    save_file({"unet.x.lora_A.weight": torch.ones(1, 2), "unet.x.lora_B.weight": torch.ones(2, 1)},
              tmp_path / "lora.safetensors", metadata={"format": "pt"})
    return (tmp_path / "lora.safetensors").read_bytes()


def adapter_file_with(tmp_path, tensors: dict) -> bytes:
    """A structurally valid file with these tensors and a correct record (no checksum)."""
    header, _ = split_file(small_adapter_bytes())
    metadata = header["__metadata__"]
    record = json.loads(metadata[METADATA_KEY])
    record.pop("tensor_sha256")
    record.pop("components")
    metadata[METADATA_KEY] = json.dumps(record)
    save_file(tensors, tmp_path / "t.safetensors", metadata=metadata)
    return (tmp_path / "t.safetensors").read_bytes()


def sparse_file_with(tmp_path, tensors: dict, version: str = "1.2") -> bytes:
    """:func:`adapter_file_with`, declaring ``version`` (sparse deltas came in 1.2)."""
    header, payload = split_file(adapter_file_with(tmp_path, tensors))
    record = json.loads(header["__metadata__"][METADATA_KEY])
    record["format_version"] = header["__metadata__"][FORMAT_KEY] = version
    header["__metadata__"][METADATA_KEY] = json.dumps(record)
    return join_file(header, payload)


def sparse(values=(0.5, -1.0), indices=(1, 5), shape=(2, 3), index_dtype=torch.int32) -> dict:
    """The three tensors of a sparse delta on module ``unet.x``."""
    return {"unet.x.delta_values": torch.tensor(values), "unet.x.delta_indices": torch.tensor(indices, dtype=index_dtype),
            "unet.x.delta_shape": torch.tensor(shape, dtype=torch.int64)}


def flipped(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1:]


def raw_header(header: dict, payload: bytes = b"") -> bytes:
    return join_file(header, payload)


BAD_FILES = {  # name -> (bytes maker, error class, message pattern)
    "empty": (lambda t: b"", AdapterFileError, "truncated or not a safetensors"),
    "short": (lambda t: b"\x10\x00", AdapterFileError, "8-byte header length"),
    "header longer than file": (lambda t: small_adapter_bytes()[:300], AdapterFileError, "header length says"),
    "huge header length": (lambda t: struct.pack("<Q", 2**63) + b"{}", AdapterFileError, "header length"),
    "header not JSON": (lambda t: struct.pack("<Q", 4) + b"{abc", AdapterFileError, "not JSON"),
    "header JSON list": (lambda t: struct.pack("<Q", 2) + b"[]", AdapterFileError, "not JSON|expected an object"),
    "truncated data": (lambda t: small_adapter_bytes()[:-5], AdapterFileError, "truncated"),
    "extra data": (lambda t: small_adapter_bytes() + b"\0" * 4, AdapterFileError, "bytes after the last tensor"),
    "offsets out of range": (lambda t: raw_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                                  b"\0" * 8), AdapterFileError, "starts at data byte 4"),
    "offsets disagree with shape": (lambda t: raw_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                                         b"\0" * 8), AdapterFileError, "span 8 bytes"),
    "unknown dtype": (lambda t: raw_header({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
                      AdapterFileError, "dtype 'Q7'"),
    "bad shape": (lambda t: raw_header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
                  AdapterFileError, "shape"),
    "duplicate header keys": (lambda t: struct.pack("<Q", 17) + b'{"a": 1, "a": 2} ', AdapterFileError, "duplicate"),
    "plain LoRA": (plain_lora, AdapterFileError, "not an erasekit adapter.*plain LoRA"),
    "record not JSON": (lambda t: with_metadata(**{METADATA_KEY: "{nope"}), AdapterFileError, "record.*not JSON"),
    "record missing method": (lambda t: with_record(method=None), AdapterFileError, "malformed: missing method"),
    "record wrong type": (lambda t: with_record(concepts="circle"), AdapterFileError, "'concepts'.*array"),
    "format major 2": (lambda t: with_metadata(**{FORMAT_KEY: "2.0"}), AdapterFormatError, r"format 2\.0.*1\.x"),
    "record major 2": (lambda t: with_record(format_version="2.1"), AdapterFormatError, r"format 2\.1.*1\.x"),
    "bad version string": (lambda t: with_metadata(**{FORMAT_KEY: "one"}), AdapterFileError, "major.minor"),
    "bad gating": (lambda t: with_record(gating={"rule": "prompt_similarity", "prompts": []}), AdapterFileError, "metric"),
    "bad components": (lambda t: with_record(components=["unet", "text_encoder"]), AdapterFileError, "components"),
    "checksum mismatch": (lambda t: flipped(small_adapter_bytes(), len(small_adapter_bytes()) - 3), AdapterFileError,
                          "corrupt.*sha256"),
    "key outside the scheme": (lambda t: adapter_file_with(t, {"unet.x.weight": torch.ones(2)}), AdapterFileError,
                               "does not follow adapter format 1"),
    "unknown component": (lambda t: adapter_file_with(t, {"vae.x.delta": torch.ones(2, 2)}), AdapterFileError,
                          "does not follow"),
    "lora_A without lora_B": (lambda t: adapter_file_with(t, {"unet.x.lora_A.weight": torch.ones(1, 2)}),
                              AdapterFileError, "has lora_A but no lora_B"),
    "rank mismatch": (lambda t: adapter_file_with(t, {"unet.x.lora_A.weight": torch.ones(2, 3),
                                                      "unet.x.lora_B.weight": torch.ones(4, 1)}),
                      AdapterFileError, "rank mismatch"),
    "integer delta": (lambda t: adapter_file_with(t, {"unet.x.delta": torch.ones(2, 2, dtype=torch.int32)}),
                      AdapterFileError, "floating point"),
    "NaN delta": (lambda t: adapter_file_with(t, {"unet.x.delta": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}),
                  AdapterFileError, r"tensor 'unet\.x\.delta' holds 1 NaN or infinite"),
    "inf lora_B": (lambda t: adapter_file_with(t, {"unet.x.lora_A.weight": torch.ones(1, 2),
                                                   "unet.x.lora_B.weight": torch.tensor([[float("-inf")], [1.0]])}),
                   AdapterFileError, r"'unet\.x\.lora_B\.weight' holds 1 NaN or infinite"),
    "fp16 inf lora_A": (lambda t: adapter_file_with(t, {
        "unet.x.lora_A.weight": torch.tensor([[float("inf"), 1.0]], dtype=torch.float16),
        "unet.x.lora_B.weight": torch.ones(2, 1, dtype=torch.float16)}), AdapterFileError, "lora_A.weight' holds"),
    "sparse delta in a 1.0 file": (lambda t: adapter_file_with(t, sparse()), AdapterFileError,
                                   r"sparse delta, which came in format 1\.2, but the file says 1\.0"),
    "sparse delta without its shape": (lambda t: sparse_file_with(t, {k: v for k, v in sparse().items()
                                                                      if not k.endswith("shape")}),
                                       AdapterFileError, "sparse delta without delta_shape"),
    "sparse and full delta": (lambda t: sparse_file_with(t, {**sparse(), "unet.x.delta": torch.ones(2, 3)}),
                              AdapterFileError, "both a sparse delta and a full delta"),
    "sparse index out of range": (lambda t: sparse_file_with(t, sparse(indices=(1, 6))), AdapterFileError,
                                  r"strictly increasing and within \[0, 6\)"),
    "sparse indices repeated": (lambda t: sparse_file_with(t, sparse(indices=(4, 4))), AdapterFileError,
                                "strictly increasing"),
    "sparse float indices": (lambda t: sparse_file_with(t, sparse(index_dtype=torch.float32)), AdapterFileError,
                             "delta_indices must be I32 or I64"),
    "sparse indices and values disagree": (lambda t: sparse_file_with(t, sparse(indices=(1, 2, 5))),
                                           AdapterFileError, "one per value"),
    "sparse 3-D shape": (lambda t: sparse_file_with(t, sparse(shape=(2, 3, 1))), AdapterFileError,
                         r"delta_shape must be I64 \[2\]"),
    "NaN gate embedding": (lambda t: adapter_file_with(t, {"unet.x.delta": torch.ones(2, 2),
                                                           "gate.prompts": torch.full((1, 24), float("nan"))}),
                           AdapterFileError, "'gate.prompts' holds 24 NaN"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_load_errors(tmp_path, name):
    make, error, pattern = BAD_FILES[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=pattern) as info:
            load_adapter(path)
    assert str(path) in str(info.value)


def test_sparse_delta_round_trip_is_exact_and_smaller(tmp_path):
    """Format 1.2: a full delta that is mostly zeros (SalUn's masked training) is stored as its nonzero values and
    their indices, and loads back bit for bit as the same full ModuleDelta; dense deltas stay 1.0 files."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(16, 24, generator=g)
    masked = dense * (torch.rand(16, 24, generator=g) < 0.1)  # 10 % of the weights changed
    conv = torch.randn(16, 4, 3, 3, generator=g) * (torch.rand(16, 4, 3, 3, generator=g) < 0.3)
    adapter = small_adapter(deltas={TO_K: ModuleDelta(delta=masked), "unet.conv_in": ModuleDelta(delta=conv)})
    sparse_path = adapter.save(tmp_path / "sparse.safetensors")
    dense_path = small_adapter(deltas={TO_K: ModuleDelta(delta=dense),
                                       "unet.conv_in": ModuleDelta(delta=conv + 1.0)}).save(tmp_path / "dense.safetensors")
    header, _ = split_file(sparse_path.read_bytes())
    assert {k for k in header if k.startswith(TO_K)} == {TO_K + ".delta_values", TO_K + ".delta_indices",
                                                         TO_K + ".delta_shape"}
    assert header[TO_K + ".delta_values"]["shape"] == [int(torch.count_nonzero(masked))]
    assert header[TO_K + ".delta_indices"]["dtype"] == "I32"
    assert read_record(sparse_path)["format_version"] == "1.2" and read_record(dense_path)["format_version"] == "1.0"
    payload = lambda path: len(split_file(path.read_bytes())[1])  # noqa: E731 - tensor bytes, without the header
    assert payload(sparse_path) < 0.6 * payload(dense_path)  # 10 % and 30 % nonzero, 8 bytes each
    loaded = load_adapter(sparse_path)
    for key, delta in adapter.deltas.items():
        assert loaded.deltas[key].delta is not None and torch.equal(loaded.deltas[key].delta, delta.delta)
    modules = {m["module"]: m for m in loaded.describe()["modules"]}
    assert modules[TO_K]["stored"] == "sparse" and modules[TO_K]["nonzero"] == int(torch.count_nonzero(masked))
    half = adapter.save(tmp_path / "half.safetensors", dtype=torch.float16)  # fp16 values, same positions
    assert torch.equal(load_adapter(half).deltas[TO_K].delta, masked.half())


def test_sparse_adapter_composes_fuses_and_unloads_like_the_dense_one(tmp_path):
    """A sparse delta loaded from its file is the same full delta in memory: hooks, fuse and unload give what the
    dense adapter gives, bit for bit, and unload restores the base."""
    from erasekit import compose

    pipe = tiny_pipeline("sd1")
    g = torch.Generator().manual_seed(1)
    deltas = {}
    for path, module in pipe.unet.named_modules():
        if path.endswith(("attn2.to_k", "attn2.to_v")):
            w = module.weight
            deltas[f"unet.{path}"] = ModuleDelta(delta=torch.randn(w.shape, generator=g) * (torch.rand(w.shape, generator=g) < 0.2))
    adapter = Adapter(method="esd-x", concepts=("cat",), config={}, deltas=deltas)
    loaded = load_adapter(adapter.save(tmp_path / "a.safetensors"))
    run = lambda: pipe("a cat", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images  # noqa: E731
    base = run()
    for which in (adapter, loaded):
        compose.load(pipe, which, name="a")
        hooked = run()
        compose.fuse(pipe)
        fused = run()
        compose.unload(pipe)
        assert torch.equal(run(), base)
        if which is adapter:
            expected = (hooked, fused)
    assert torch.equal(hooked, expected[0]) and torch.equal(fused, expected[1])
    assert (hooked - base).abs().max() > 1e-4


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_adapter(tmp_path / "nope.safetensors")
    with pytest.raises(AdapterFileError, match="not a file"):
        load_adapter(tmp_path)


def test_unknown_record_fields_warn_and_load(tmp_path):
    path = tmp_path / "newer.safetensors"
    path.write_bytes(with_record(format_version="1.7", hologram={"x": 1}))
    header, _ = split_file(path.read_bytes())
    path.write_bytes(with_metadata(**{FORMAT_KEY: "1.7", METADATA_KEY: header["__metadata__"][METADATA_KEY]}))
    with pytest.warns(UserWarning, match="'hologram'.*1.7"):
        adapter = load_adapter(path)
    assert adapter.method == "spm" and adapter.gating["rule"] == "prompt_similarity"


def test_small_adapter_round_trip(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(small_adapter_bytes())
    assert_same_adapter(load_adapter(path), small_adapter())


def test_digest_is_what_the_adapter_does(tmp_path):
    """The digest survives a float32 file round trip and changes with any tensor, the gating or the config (an audit
    keys its resumable results on it)."""
    adapter = small_adapter()
    path = tmp_path / "a.safetensors"
    path.write_bytes(small_adapter_bytes())
    assert load_adapter(path).digest == adapter.digest == small_adapter().digest
    nudged = {k: ModuleDelta(delta=d.delta + 1e-6) if d.delta is not None else d for k, d in adapter.deltas.items()}
    others = [small_adapter(deltas=nudged), small_adapter(gating={"rule": "static"}),
              small_adapter(config={"rank": 2, "targets": ["attn2"]}), small_adapter(concepts=("square",)),
              small_adapter(stats={})]
    assert len({adapter.digest, *(o.digest for o in others)}) == 1 + len(others)


# ----------------------------------------------------------------------------------------- compatibility

def test_check_compatible_missing_module(pipes):
    adapter = make_adapter(pipes["sd1"], {TO_K: 1}, with_fingerprint=False)
    adapter.deltas["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_k"] = adapter.deltas[TO_K]
    with pytest.raises(AdapterMismatchError, match=r"attn9\.to_k: no such module"):
        check_compatible(adapter, pipes["sd1"])


def test_check_compatible_shape_mismatch(pipes):
    adapter = Adapter(method="uce", concepts=("cat",), config={}, deltas={
        TO_K: ModuleDelta(down=torch.ones(1, 32), up=torch.ones(16, 1))})
    with pytest.raises(AdapterMismatchError, match=r"attn2\.to_k: the adapter expects weight shape \[16, 32\], "
                                                   r"the pipeline has \[16, 24\]"):
        check_compatible(adapter, pipes["sd1"])
    not_linear = Adapter(method="uce", concepts=("cat",), config={}, deltas={
        "unet.down_blocks.0.attentions.0.norm": ModuleDelta(delta=torch.ones(16, 16))})
    with pytest.raises(AdapterMismatchError, match="GroupNorm, expected nn.Linear or nn.Conv2d"):
        check_compatible(not_linear, pipes["sd1"])


def test_check_compatible_other_architecture_refused(pipes):
    adapter = make_adapter(pipes["sd1"], SD1_SPEC)
    with pytest.raises(AdapterMismatchError, match="another architecture"):
        check_compatible(adapter, pipes["sd2"])


def test_check_compatible_missing_component(pipes):
    adapter = make_adapter(pipes["sdxl"], SDXL_SPEC, with_fingerprint=False)
    with pytest.raises(AdapterMismatchError, match="has no text_encoder_2"):
        check_compatible(adapter, pipes["sd1"])


def test_check_compatible_other_checkpoint_warns_or_refuses(pipes):
    adapter = make_adapter(pipes["sd1"], SD1_SPEC)
    with pytest.warns(BaseModelMismatchWarning, match="same architecture"):
        check_compatible(adapter, pipes["sd1-seed1"])
    with pytest.raises(AdapterMismatchError, match="same architecture.*strict"):
        check_compatible(adapter, pipes["sd1-seed1"], strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_compatible(adapter, pipes["sd1"], strict=True)
        # no fingerprint: digests skipped, modules and shapes still checked
        check_compatible(make_adapter(pipes["sd1"], SD1_SPEC, with_fingerprint=False), pipes["sd1-seed1"])


def test_text_model_prefix_resolves_either_way(pipes):
    """transformers 5 dropped CLIPTextModel's ``.text_model``; keys written either way must resolve."""
    te = pipes["sd1"].text_encoder
    flat = resolve_module(pipes["sd1"], "text_encoder.encoder.layers.0.self_attn.q_proj")
    assert resolve_module(pipes["sd1"], "text_encoder.text_model.encoder.layers.0.self_attn.q_proj") is flat
    adapter = Adapter(method="esd", concepts=("c",), config={}, deltas={
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": ModuleDelta(delta=torch.zeros(te.config.hidden_size,
                                                                                                  te.config.hidden_size))})
    check_compatible(adapter, pipes["sd1"])
    with pytest.raises(AdapterMismatchError, match="no module"):
        resolve_module(pipes["sd1"], "text_encoder.encoder.layers.7.self_attn.q_proj")


# ------------------------------------------------------------------------------------------- fingerprint

def test_fingerprint_properties(pipes):
    import copy

    sd1 = fingerprint(pipes["sd1"])
    assert set(sd1) == {"unet", "text_encoder"} and set(fingerprint(pipes["sdxl"])) == {"unet", "text_encoder",
                                                                                        "text_encoder_2"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for c in sd1.values() for d in c.values())
    assert fingerprint(pipes["sd1"]) == sd1  # deterministic
    half = copy.copy(pipes["sd1"])  # shallow: swap in fp16 copies of the components, keep the fixture intact
    half.unet, half.text_encoder = (copy.deepcopy(pipes["sd1"].unet).half(),
                                    copy.deepcopy(pipes["sd1"].text_encoder).half())
    assert fingerprint(half) == sd1
    other = fingerprint(pipes["sd1-seed1"])
    assert all(other[c]["architecture"] == sd1[c]["architecture"] and other[c]["weights"] != sd1[c]["weights"]
               for c in sd1)
    assert fingerprint(pipes["sd2"])["unet"]["architecture"] != sd1["unet"]["architecture"]
    assert fingerprint(pipes["sd1"], components=["unet"]) == {"unet": sd1["unet"]}
    with pytest.raises(ConfigError, match="no text_encoder_2"):
        fingerprint(pipes["sd1"], components=["text_encoder_2"])


# ---------------------------------------------------------------------------------------------- fuzzing

class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no handler inside load_adapter can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise _Hang(f"load_adapter ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "fuzzed.safetensors"


def load_fuzzed(path, data: bytes, *, must_fail: bool) -> None:
    path.write_bytes(data)
    with warnings.catch_warnings(), time_limit(10):
        warnings.simplefilter("ignore")
        try:
            result = load_adapter(path)
        except AdapterError:
            return
    assert not must_fail, "a damaged file loaded"
    assert isinstance(result, Adapter)


FUZZ = settings(max_examples=120, deadline=timedelta(seconds=2), database=None,
                suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


@FUZZ
@given(data=st.data())
def test_fuzz_truncated(fuzz_path, data):
    good = small_adapter_bytes()
    length = data.draw(st.integers(0, len(good) - 1))
    load_fuzzed(fuzz_path, good[:length], must_fail=True)


@FUZZ
@given(positions=st.lists(st.integers(0, 10**9), min_size=1, max_size=4), bits=st.integers(0, 7))
def test_fuzz_bit_flips(fuzz_path, positions, bits):
    data = bytearray(small_adapter_bytes())
    for p in positions:
        data[p % len(data)] ^= 1 << bits
    # a flip inside a record string (a concept's letter) can leave a valid adapter; anything else must fail
    load_fuzzed(fuzz_path, bytes(data), must_fail=False)


@FUZZ
@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=64))
def test_fuzz_random_header_length(fuzz_path, length, body):
    load_fuzzed(fuzz_path, struct.pack("<Q", length) + body, must_fail=True)


tensor_infos = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I8", "BOOL", "F8_E4M3", "X"]) | json_values,
    "shape": st.lists(st.integers(-2, 2**64), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-2, 2**64), min_size=2, max_size=2) | json_values,
})
headers = st.dictionaries(st.sampled_from([TO_K + ".lora_A.weight", TO_K + ".lora_B.weight", "unet.x.delta",
                                           "stats.C", "weird"]) | st.text(max_size=6),
                          tensor_infos | json_values, max_size=3)


@FUZZ
@given(header=headers | json_values, metadata=st.none() | json_values | st.just("adapter"), payload=st.binary(max_size=48),
       pad=st.integers(0, 3))
def test_fuzz_malformed_headers(fuzz_path, header, metadata, payload, pad):
    if isinstance(header, dict) and metadata is not None:
        header = dict(header, __metadata__={METADATA_KEY: json.dumps(metadata)} if metadata != "adapter"
                      else split_file(small_adapter_bytes())[0]["__metadata__"])
    raw = json.dumps(header).encode() + b" " * pad
    load_fuzzed(fuzz_path, struct.pack("<Q", len(raw)) + raw + payload, must_fail=True)


RECORD_FIELDS = ["format_version", "method", "concepts", "config", "base_model", "fingerprint", "components", "gating",
                 "info", "created", "dtype", "tensor_sha256", "erasekit_version", "future_field"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(RECORD_FIELDS), json_values | st.just({"rule": "prompt_similarity"}),
                               min_size=1, max_size=3))
def test_fuzz_record_fields(fuzz_path, changes):
    # a field replaced by any JSON value either still makes a valid adapter (config={} is fine) or is refused
    header, payload = split_file(small_adapter_bytes())
    record = json.loads(header["__metadata__"][METADATA_KEY])
    record.update(changes)
    header["__metadata__"][METADATA_KEY] = json.dumps(record)
    load_fuzzed(fuzz_path, join_file(header, payload), must_fail=False)


def test_checksum_follows_the_written_spec(tmp_path):
    """adapters/README.md §2: sha256 over sorted keys of JSON [key, dtype, shape] + newline, then raw bytes."""
    import hashlib

    from safetensors import safe_open

    path = small_adapter().save(tmp_path / "a.safetensors", dtype=torch.float16)
    header, payload = split_file(path.read_bytes())
    digest = hashlib.sha256()
    for key in sorted(k for k in header if k != "__metadata__"):
        begin, end = header[key]["data_offsets"]
        digest.update(json.dumps([key, header[key]["dtype"], header[key]["shape"]]).encode() + b"\n")
        digest.update(payload[begin:end])
    assert read_record(path)["tensor_sha256"] == digest.hexdigest()
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor(TO_K + ".lora_A.weight").dtype == torch.float16
        assert f.get_tensor("gate.prompts").dtype == torch.float32


def test_nan_delta_with_a_recomputed_checksum_is_refused(tmp_path):
    """A broken delta whose checksum was recomputed (so the file is 'consistent') is still refused by name."""
    import hashlib

    path = small_adapter().save(tmp_path / "a.safetensors")
    header, payload = split_file(path.read_bytes())
    key = "unet.conv_in.delta"
    begin, end = header[key]["data_offsets"]
    payload = payload[:begin] + struct.pack("<f", float("nan")) + payload[begin + 4:]
    digest = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        lo, hi = header[name]["data_offsets"]
        digest.update(json.dumps([name, header[name]["dtype"], header[name]["shape"]]).encode() + b"\n")
        digest.update(payload[lo:hi])
    record = json.loads(header["__metadata__"][METADATA_KEY])
    record["tensor_sha256"] = digest.hexdigest()
    header["__metadata__"][METADATA_KEY] = json.dumps(record)
    path.write_bytes(join_file(header, payload))
    assert read_record(path)["tensor_sha256"] == digest.hexdigest()  # the header alone is fine
    with pytest.raises(AdapterFileError, match=r"tensor 'unet\.conv_in\.delta' holds 1 NaN or infinite value"):
        load_adapter(path)


def test_saving_refuses_non_finite_statistics(tmp_path):
    bad = small_adapter(stats={"gate.prompts": torch.tensor([[1.0, float("inf")]])})
    with pytest.raises(AdapterError, match=r"stats\['gate.prompts'\] contains NaN or infinite"):
        bad.save(tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())
    small_adapter(stats={"counts": torch.tensor([3, 4])}).save(tmp_path / "ints.safetensors")  # integers are fine


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_file_mode_follows_the_umask(tmp_path, mask, mode):
    with umask(mask):
        path = small_adapter().save(tmp_path / "a.safetensors")
    assert path.stat().st_mode & 0o777 == mode
    path.chmod(0o640)  # overwriting keeps the mode of the file it replaces
    small_adapter().save(path)
    assert path.stat().st_mode & 0o777 == 0o640


def test_fingerprinted_but_unchanged_component_is_checked(pipes):
    """A UNet-only edit that recorded its text encoder warns when that text encoder is another checkpoint."""
    adapter = make_adapter(pipes["sd1"], {TO_K: 1})
    assert adapter.components == ("unet",) and "text_encoder" in adapter.fingerprint
    mixed = tiny_pipeline("sd1")
    mixed.text_encoder = pipes["sd1-seed1"].text_encoder
    with pytest.warns(BaseModelMismatchWarning, match="weights of text_encoder differ"):
        check_compatible(adapter, mixed)
