"""The audit's folder: the results file (one JSON line per (kind, prompt, seed, attack), flushed as written; a
torn last line is dropped), the manifest that a rerun must match, images, per-attack state, and the merge of the
per-process results files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from ..core.files import atomic_write, replacing
from ..errors import ConfigError

logger = logging.getLogger("erasekit.audit")

RESULTS = "results.jsonl"
MANIFEST = "audit.json"
# options that change what a line means: a rerun must match them to reuse the results
SIGNATURE_KEYS = ("concept", "attacks", "judge", "generation", "model")


def unit_key(record: Mapping) -> tuple:
    return (record["kind"], record["prompt"], int(record["seed"]), record.get("attack", "none"))


def unit_id(key: tuple) -> str:
    return hashlib.sha1("\x1f".join(map(str, key)).encode()).hexdigest()[:16]


def read_results(path: Path, repair: bool = False) -> list[dict]:
    """Records of a JSONL results file; a torn last line (killed mid-write) is dropped (and cut off the file
    when ``repair``, so that appends start on a clean line)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good_end = [], 0
    for line in data.split(b"\n"):
        end = good_end + len(line) + 1
        if not line.strip():
            good_end = min(end, len(data))
            continue
        try:
            rec = json.loads(line)
            unit_key(rec)
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: dropping an incomplete or invalid line (%d bytes)", path, len(line))
            break
        if end > len(data):  # no newline after it: written only in part, even if it parses
            logger.warning("%s: dropping a last line without its newline", path)
            break
        records.append(rec)
        good_end = end
    if repair and good_end < len(data):
        atomic_write(path, data[:good_end])
    return records


class ResultsWriter:
    """Appends one JSON line per record and flushes it to disk at once."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, sort_keys=True, default=json_default) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def json_default(o):
    import torch

    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)

def check_manifest(path: Path, manifest: dict) -> None:
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(manifest, default=json_default))
    differ = [k for k in SIGNATURE_KEYS if old.get(k) != new.get(k)]
    if differ:
        raise ConfigError(f"{path.parent} holds an audit made with other {', '.join(differ)}; its results cannot "
                          "be reused: use another out_dir (or delete this one)")


def save_image(image, out_dir: Path, key: tuple, role: str) -> str:
    rel = Path("images") / key[0] / f"{unit_id(key)}_{role}.png"
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        image.save(tmp, format="PNG")
    return rel.as_posix()


def load_image(out_dir: Path, rel: str):
    from PIL import Image

    with Image.open(out_dir / rel) as im:
        return im.convert("RGB").copy()


def state_files(out_dir: Path, label: str) -> tuple[Path, Path]:
    stem = label.replace(":", "-")
    return out_dir / "state" / f"{stem}.safetensors", out_dir / "state" / f"{stem}.json"


def save_state(out_dir: Path, label: str, state: dict) -> None:
    import torch
    from safetensors.torch import save_file

    tensors_path, json_path = state_files(out_dir, label)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    with replacing(tensors_path) as tmp:
        save_file(tensors, str(tmp))
    atomic_write(json_path, json.dumps(rest, default=json_default).encode())


def load_state(out_dir: Path, label: str) -> dict | None:
    from safetensors.torch import load_file

    tensors_path, json_path = state_files(out_dir, label)
    if not (tensors_path.exists() and json_path.exists()):
        return None
    return {**json.loads(json_path.read_text()), **load_file(str(tensors_path))}


def done_units(out_dir: Path, repair: Path | None = None) -> dict[tuple, dict]:
    """The lines already in the folder's results files, by unit key (the ``repair`` file's torn end is cut off)."""
    done: dict[tuple, dict] = {}
    for path in [out_dir / RESULTS] + sorted(out_dir.glob("results.rank*.jsonl")):
        for rec in read_results(path, repair=(path == repair)):
            done.setdefault(unit_key(rec), rec)
    return done


def merge_results(out_dir: Path, order: Sequence[tuple] = ()) -> list[dict]:
    """Union of ``results.jsonl`` and every ``results.rank*.jsonl`` (first record of a key wins), in ``order``
    (then any other records), written back to ``results.jsonl``; the rank files are removed."""
    out_dir = Path(out_dir)
    ranks = sorted(out_dir.glob("results.rank*.jsonl"))
    by_key: dict[tuple, dict] = {}
    for path in [out_dir / RESULTS] + ranks:
        for rec in read_results(path):
            by_key.setdefault(unit_key(rec), rec)
    position = {k: i for i, k in enumerate(order)}
    keys = sorted(by_key, key=lambda k: (position.get(k, len(position)), str(k)))
    records = [by_key[k] for k in keys]
    payload = "".join(json.dumps(r, sort_keys=True, default=json_default) + "\n" for r in records)
    atomic_write(out_dir / RESULTS, payload.encode())
    for path in ranks:
        path.unlink()
    return records


