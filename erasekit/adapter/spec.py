"""The file format's tensor rules, shared by the writer and the reader: dtypes, key scheme, shape and record checks."""

from __future__ import annotations

import json
import re

import torch

from ..errors import AdapterError
from .model import COMPONENTS, GATING_RULES, GUARD_RULES, KINDS

# safetensors dtype name -> (torch dtype, bytes per element); the dtypes this reader accepts
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
STATS_NAME = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")


#: the three tensors of a sparse full delta (format 1.2): its nonzero values, their flat (row-major) indices into the
#: weight, and the weight's shape
SPARSE_PARTS = {"values": ".delta_values", "indices": ".delta_indices", "shape": ".delta_shape"}


def index_dtype(numel: int) -> torch.dtype:
    """The index dtype of a sparse delta over ``numel`` weights: int32 while it can address them, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def stored_sparse(delta: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a full delta is written sparse: when its nonzero values and their indices take fewer bytes than the
    dense tensor in ``dtype`` (fp32 with int32 indices: fewer than half its entries are nonzero), as SalUn's masked
    deltas are. Dense deltas are stored as before (format 1.0)."""
    value_bytes = torch.empty((), dtype=dtype).element_size()
    index_bytes = torch.empty((), dtype=index_dtype(delta.numel())).element_size()
    return int(torch.count_nonzero(delta)) * (value_bytes + index_bytes) < delta.numel() * value_bytes


def split_key(key: str) -> tuple[str, str] | None:
    """'unet.down_blocks.0.proj_in' -> ('unet', 'down_blocks.0.proj_in'); None if the key is malformed."""
    component, _, module_path = key.partition(".")
    if component not in COMPONENTS or not MODULE_PATH.fullmatch(module_path):
        return None
    return component, module_path


def check_low_rank_shapes(down_shape, up_shape) -> str | None:
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


def check_gating(gating: dict, where: str, error=AdapterError) -> None:
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


def check_guard(guard: dict, where: str, error=AdapterError) -> None:
    """A guard record: a ``rule`` string and, for a rule this erasekit knows, its fields with their JSON types."""
    rule = guard.get("rule")
    if not isinstance(rule, str) or not rule:
        raise error(f"{where}: a guard needs a 'rule' string (one of {', '.join(GUARD_RULES)}), got {guard!r}")
    for name, kind in GUARD_RULES.get(rule, {}).items():
        value = guard.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise error(f"{where}: guard rule {rule!r} needs {name!r} "
                        f"({'number' if isinstance(kind, tuple) else kind.__name__}), got {value!r}")


def check_kind(kind: str, guard: dict, deltas: int, gating: dict, where: str, error=AdapterError) -> None:
    """What a kind implies: a guard has a guard record, no deltas and no gate; a weight adapter has no guard."""
    if kind not in KINDS:
        raise error(f"{where}: adapter kind {kind!r} is unknown to this erasekit (it knows {', '.join(KINDS)}); "
                    "upgrade erasekit to read it")
    if kind == "guard":
        if not guard:
            raise error(f"{where}: a guard adapter needs a 'guard' record (its rule and parameters)")
        if deltas:
            raise error(f"{where}: a guard adapter changes no weights, but it holds {deltas} module delta(s); "
                        "an inference-time guard and weight deltas go in separate adapters")
        if gating.get("rule", "static") != "static":
            raise error(f"{where}: a guard adapter has no prompt gate (gating {gating.get('rule')!r})")
    elif guard:
        raise error(f"{where}: a {kind!r} adapter has a 'guard' record; only kind 'guard' has one")


def check_fingerprint(fp, where: str, error) -> None:
    if not isinstance(fp, dict):
        raise error(f"{where} must be a dict component -> {{'architecture': hex, 'weights': hex}}, got {fp!r}")
    for component, digests in fp.items():
        if component not in COMPONENTS or not isinstance(digests, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
            raise error(f"{where}[{component!r}] must map a component ({', '.join(COMPONENTS)}) to "
                        f"{{'architecture': hex, 'weights': hex}}, got {digests!r}")


def hash_entry(name: str, dtype_name: str, shape) -> bytes:
    return json.dumps([name, dtype_name, list(shape)]).encode() + b"\n"
