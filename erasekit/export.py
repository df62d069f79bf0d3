"""Export erasures to the LoRA layouts other tools load, and bake them into a standalone pipeline
(docs/design.md §2-§3).

- ``to_diffusers(adapter, path)``: a LoRA file that stock ``pipe.load_lora_weights(path)`` loads (PEFT backend):
  keys ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.text_model.…``, ``text_encoder_2.…``;
  SD3 and FLUX: ``transformer.transformer_blocks.0.attn.to_k.lora_A.weight``, as ``SD3LoraLoaderMixin`` /
  ``FluxLoraLoaderMixin`` read them) and a ``lora_adapter_metadata`` record with ``lora_alpha == r`` for every
  module, so the scale is exactly 1. FLUX's T5 encoder takes no LoRA in stock diffusers: such deltas are refused.
- ``to_kohya(adapter, path)``: the kohya / A1111 layout (``lora_unet_<module with _>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` = rank; ``lora_te_…``, SDXL ``lora_te1_…`` / ``lora_te2_…``). UNet models only:
  kohya's SD3/FLUX layouts name the original MMDiT checkpoint's fused modules, not diffusers' (refused).
- ``bake(pipe, adapters, out_dir)``: fuse static erasures and ``save_pretrained`` a stock pipeline folder with a
  model card.

A full delta ``ΔW`` [out, in(·kh·kw)] is exported exactly at full rank ``r = min(out, in·kh·kw)``: ``lora_B = ΔW``,
``lora_A = I`` when the input side is the smaller, else ``lora_B = I``, ``lora_A = ΔW``, so ``lora_B @ lora_A`` is
``ΔW`` again (a warning says so; the file is larger than the adapter). ``svd_rank`` asks for a smaller rank-r
approximation instead (the relative error is reported). A gated adapter (SPM) loses its prompt gate — it is
exported with a warning.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .adapter import COMPONENTS, DENOISERS, Adapter, ModuleDelta, write_safetensors
from .core import sd
from .core.files import umask
from .errors import AdapterError

logger = logging.getLogger(__name__)

__all__ = ["to_diffusers", "to_kohya", "bake"]

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_PREFIXES_SDXL = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


# --------------------------------------------------------------------------------------------------------------
# LoRA factors
# --------------------------------------------------------------------------------------------------------------


#: the top-level modules of a CLIP text model without its ``text_model.`` wrapper (transformers ≥ 5)
_CLIP_TOP = ("embeddings.", "encoder.layers.", "final_layer_norm")
#: a T5 encoder's module paths (FLUX's ``text_encoder_2``)
_T5_TOP = ("shared", "encoder.block.", "encoder.final_layer_norm")


def _canonical_path(component: str, path: str) -> str:
    """CLIP module paths with transformers' ``text_model.`` prefix (the layout LoRA files and web UIs use); denoiser
    and T5 paths unchanged."""
    if component in DENOISERS or path.startswith("text_model.") or not path.startswith(_CLIP_TOP):
        return path
    return "text_model." + path


def _svd(key: str, delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(down, up)`` of a full delta (Eckart–Young); logs the relative error."""
    matrix = delta.float().flatten(1)  # (out, in·kh·kw)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = min(rank, s.numel())
    error = float(s[rank:].norm() / s.norm().clamp_min(1e-30))
    logger.info("%s: rank-%d SVD of a full delta, relative Frobenius error %.3g", key, rank, error)
    down = (s[:rank, None] * vh[:rank]).reshape(rank, *delta.shape[1:])
    up = u[:, :rank].reshape(delta.shape[0], rank, *([1] * (delta.ndim - 2)))
    return down.contiguous(), up.contiguous()


def _exact_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact full-rank factors ``(down, up)`` of a full delta: ``up @ down == ΔW`` (a product with the identity).

    ``r = min(out, in·kh·kw)``: ``up = ΔW, down = I`` when the input side is the smaller, else ``up = I, down = ΔW``.
    """
    out, fan_in = delta.shape[0], delta[0].numel()
    ones = [1] * (delta.ndim - 2)  # a Conv2d's lora_B is a 1×1 convolution
    if fan_in <= out:
        eye = torch.eye(fan_in, dtype=delta.dtype)
        return eye.reshape(fan_in, *delta.shape[1:]), delta.reshape(out, fan_in, *ones)
    return delta, torch.eye(out, dtype=delta.dtype).reshape(out, out, *ones)


def _factors(adapter: Adapter, svd_rank: int | None) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """``(component, module path) -> (down, up)`` for every delta; full deltas exactly, or by SVD at ``svd_rank``."""
    if adapter.is_guard:
        raise AdapterError(f"adapter {adapter.method!r} ({', '.join(adapter.concepts)}) is an inference-time guard "
                           f"({adapter.guard.get('rule')}): it changes no weights, so there is no LoRA to export; load "
                           "it with erasekit.compose.load")
    if not adapter.is_static:
        warnings.warn(
            f"adapter {adapter.method!r} ({', '.join(adapter.concepts)}) is gated "
            f"({adapter.gating.get('rule')}); a LoRA file cannot carry the gate, so the export applies it to every "
            "prompt (γ = 1)", UserWarning, stacklevel=3)
    factors = {}
    if svd_rank is not None and svd_rank < 1:
        raise AdapterError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    errors, exact_ranks = [], []
    for key, delta in adapter.deltas.items():
        component, _, path = key.partition(".")
        if component not in COMPONENTS:
            raise AdapterError(f"adapter key {key!r} names no component of {COMPONENTS}")
        if delta.delta is not None and svd_rank is None:
            down, up = _exact_factors(delta.delta)
            exact_ranks.append(int(down.shape[0]))
        elif delta.delta is not None:
            down, up = _svd(key, delta.delta, svd_rank)
            approx = ModuleDelta(down=down, up=up).dense()
            errors.append(float((approx - delta.dense()).norm() / delta.dense().norm().clamp_min(1e-30)))
        else:
            down, up = delta.down, delta.up
        factors[(component, path)] = (down.contiguous(), up.contiguous())
    if exact_ranks:
        ranks = "–".join(map(str, sorted({min(exact_ranks), max(exact_ranks)})))
        warnings.warn(f"{len(exact_ranks)} full delta(s) exported exactly at full rank {ranks} (lora_B = ΔW, lora_A = "
                      "the identity, or the other way round): no approximation, but a larger file; svd_rank=<r> "
                      "gives a smaller rank-r approximation", UserWarning, stacklevel=3)
    if errors:
        warnings.warn(f"full deltas exported as rank-{svd_rank} SVD approximations: max relative error "
                      f"{max(errors):.3g}", UserWarning, stacklevel=3)
    return factors


def _source_record(adapter: Adapter) -> str:
    return json.dumps({"method": adapter.method, "concepts": list(adapter.concepts),
                       "base_model": adapter.base_model, "gating": adapter.gating}, sort_keys=True, default=str)


def _save_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """``safetensors`` write to a temporary file beside ``path``, then renamed over it (the adapter writer's)."""
    path = Path(path)
    write_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# diffusers / PEFT layout
# --------------------------------------------------------------------------------------------------------------


def to_diffusers(adapter: Adapter, path: str | Path, *, svd_rank: int | None = None) -> Path:
    """Write ``adapter`` as a diffusers LoRA file; ``pipe.load_lora_weights(path)`` then applies ``W + B A``.

    Keys are ``<component>.<module>.lora_A.weight`` ``[r, in(, kh, kw)]`` and ``.lora_B.weight`` ``[out, r(, 1, 1)]``
    (component ``unet``, or ``transformer`` for SD3 and FLUX, and the text encoders); the ``lora_adapter_metadata``
    record gives PEFT ``r``, ``lora_alpha`` and per-module ``rank_pattern`` / ``alpha_pattern`` with ``alpha == rank``
    everywhere (scale exactly 1).

    Args:
        adapter: a static adapter (gated: exported with a warning; full deltas: exact full-rank factors, with a
            warning, or see ``svd_rank``).
        path: the ``.safetensors`` file to write (atomically, with the user's umask).
        svd_rank: approximate full deltas by their best rank-``svd_rank`` factors (smaller, not exact).

    Raises:
        AdapterError: ``svd_rank`` is not a positive integer; a FLUX adapter changes the T5 encoder.
        AdapterFileError: the file system refused the write.
    """
    t5 = sorted(k for k in adapter.deltas
                if k.startswith("text_encoder_2.") and k.partition(".")[2].startswith(_T5_TOP))
    if t5:
        raise AdapterError(f"adapter {adapter.method!r} changes FLUX's T5 encoder ({len(t5)} module(s), {t5[0]!r} "
                           "first), which stock FluxPipeline.load_lora_weights does not load (it reads transformer and "
                           "text_encoder LoRAs); export an adapter without text_encoder_2 deltas, or load this one "
                           "with erasekit")
    factors = _factors(adapter, svd_rank)
    tensors, by_component = {}, {}
    for (component, path_), (down, up) in factors.items():
        module = _canonical_path(component, path_)
        tensors[f"{component}.{module}.lora_A.weight"] = down
        tensors[f"{component}.{module}.lora_B.weight"] = up
        # PEFT matches target modules by suffix: the path without CLIP's `text_model.` fits both layouts.
        target = module[len("text_model."):] if module.startswith("text_model.") else module
        by_component.setdefault(component, {})[target] = int(down.shape[0])
    lora_metadata = {}
    for component, ranks in by_component.items():
        r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
        pattern = {m: k for m, k in ranks.items() if k != r}
        config = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                  "target_modules": sorted(ranks), "use_dora": False, "lora_bias": False}
        lora_metadata.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(lora_metadata, sort_keys=True),
                "erasekit.source": _source_record(adapter)}
    return _save_atomic(tensors, path, metadata)


# --------------------------------------------------------------------------------------------------------------
# kohya / A1111 layout
# --------------------------------------------------------------------------------------------------------------


def _is_sdxl(adapter: Adapter) -> bool:
    return "text_encoder_2" in adapter.components or "text_encoder_2" in (adapter.fingerprint or {})


def to_kohya(adapter: Adapter, path: str | Path, *, sdxl: bool | None = None, svd_rank: int | None = None) -> Path:
    """Write ``adapter`` in the kohya / A1111 LoRA layout (``alpha = rank``, so the scale is exactly 1).

    Keys: ``lora_unet_<diffusers module path, dots as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
    text encoders ``lora_te_text_model_…`` (SDXL: ``lora_te1_…`` and ``lora_te2_…``).

    Args:
        adapter: a static adapter (gated: exported with a warning; full deltas: exact full-rank factors, with a
            warning, or see ``svd_rank``).
        path: the ``.safetensors`` file to write (atomically, with the user's umask).
        sdxl: use SDXL's text-encoder prefixes; default: the adapter touches or was fingerprinted on
            ``text_encoder_2``.
        svd_rank: approximate full deltas by their best rank-``svd_rank`` factors (smaller, not exact).
    """
    if "transformer" in adapter.components:
        raise AdapterError(f"adapter {adapter.method!r} changes an MMDiT transformer (SD3, FLUX); the kohya layout "
                           "names the original checkpoint's fused attention modules, not diffusers' ones, so erasekit "
                           "exports it in the diffusers layout only (to_diffusers, `erasekit export --to "
                           "diffusers`)")
    factors = _factors(adapter, svd_rank)
    prefixes = KOHYA_PREFIXES_SDXL if (_is_sdxl(adapter) if sdxl is None else sdxl) else KOHYA_PREFIXES
    tensors = {}
    ranks = set()
    for (component, path_), (down, up) in factors.items():
        stem = f"{prefixes[component]}_{_canonical_path(component, path_).replace('.', '_')}"
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.alpha"] = torch.tensor(float(down.shape[0]))
        ranks.add(int(down.shape[0]))
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "erasekit.source": _source_record(adapter)}
    if len(ranks) == 1:
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = str(ranks.pop())
    return _save_atomic(tensors, path, metadata)


# --------------------------------------------------------------------------------------------------------------
# bake
# --------------------------------------------------------------------------------------------------------------


def _adapter_sha256(adapter: Adapter, path: Path | None) -> str:
    """sha256 of the adapter file, or of its tensors (sorted keys, fp32 bytes) for an in-memory adapter."""
    digest = hashlib.sha256()
    if path is not None:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    for key in sorted(adapter.deltas):
        delta = adapter.deltas[key]
        for part, tensor in (("lora_A", delta.down), ("lora_B", delta.up), ("delta", delta.delta)):
            if tensor is not None:
                digest.update(f"{key}.{part}{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _model_card(pipe, rows: list[dict]) -> str:
    base = sd.model_id(pipe, "(in-memory pipeline)")
    lines = [
        "---", "library_name: diffusers", "tags:", "- erasekit", "- concept-erasure", "---", "",
        "# Concept-erased pipeline", "",
        f"Base model: `{base}`. The erasures below were fused into the weights with erasekit "
        "(`erasekit.export.bake`); the folder loads with stock `DiffusionPipeline.from_pretrained`.", "",
        "| erasure | method | concepts | weight | adapter sha256 |", "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['name']} | {row['method']} | {', '.join(row['concepts'])} | {row['weight']:g} "
                     f"| `{row['sha256']}` |")
    return "\n".join(lines) + "\n"


def bake(pipe, adapters: Sequence, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Fuse static erasures into ``pipe``'s weights in place, ``save_pretrained(out_dir)``, then restore ``pipe``.

    No copy of the model is made: the adapters are loaded and fused on ``pipe`` itself (any erasure already loaded
    is switched off meanwhile), the folder is written to a temporary directory beside ``out_dir`` and renamed, and
    ``pipe`` is returned bit-exactly to its previous state. The folder's ``model_index.json`` names the stock
    diffusers class, and ``README.md`` lists each erasure: method, concepts, weight, adapter sha256.

    Args:
        pipe: the pipeline to bake from.
        adapters: ``Adapter`` objects or adapter file paths, or ``(adapter_or_path, weight)`` pairs.
        out_dir: the folder to create.
        overwrite: replace an existing ``out_dir``.

    Raises:
        AdapterError: a gated adapter (its gating would be lost) or an adapter that does not fit ``pipe``.
    """
    from . import compose

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    entries = []
    for item in adapters:
        source, weight = item if isinstance(item, tuple) else (item, 1.0)
        adapter, default_name = compose.as_adapter(source)
        if adapter.is_guard:
            raise AdapterError(f"cannot bake guard {default_name!r} ({adapter.guard.get('rule')}): it changes no "
                               "weights; it acts at generation time (erasekit.compose.load)")
        if not adapter.is_static:
            raise AdapterError(f"cannot bake gated adapter {default_name!r} ({adapter.gating.get('rule')}): fusing "
                               "it into the weights would lose the gating")
        path = Path(source) if isinstance(source, (str, Path)) else None
        entries.append((adapter, default_name, float(weight), path))

    stock = _stock_pipeline(pipe)
    loaded, rows = [], []
    with compose.disabled(pipe):
        try:
            for i, (adapter, default_name, weight, path) in enumerate(entries):
                name = compose.load(pipe, adapter, name=f"_bake{i}:{default_name}", weight=weight)
                loaded.append(name)
                rows.append(dict(name=default_name, method=adapter.method, concepts=list(adapter.concepts),
                                 weight=weight, sha256=_adapter_sha256(adapter, path)))
            compose.fuse(pipe, loaded)
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
            try:
                tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700; the folder gets the user's umask
                stock.save_pretrained(tmp)
                (tmp / "README.md").write_text(_model_card(pipe, rows), encoding="utf-8")
                if out_dir.exists():
                    old = out_dir.with_name(f".{out_dir.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(out_dir, old)
                    os.replace(tmp, out_dir)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, out_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            if loaded:
                compose.unload(pipe, loaded)
    return out_dir


def _stock_pipeline(pipe):
    """``pipe`` as its nearest diffusers class (sharing components), so ``model_index.json`` names a stock class.

    Built from ``pipe``'s components and config rather than with ``from_pipe``, which casts every shared component
    to one dtype (float32 unless told otherwise): an fp16 pipeline would leave ``bake`` in fp32, and one with its
    VAE kept in fp32 would lose that."""
    for cls in type(pipe).__mro__:
        if cls.__module__.split(".")[0] == "diffusers" and hasattr(cls, "from_pipe"):
            if cls is type(pipe):
                return pipe
            accepted = inspect.signature(cls.__init__).parameters
            given = {**{k: v for k, v in pipe.config.items() if not k.startswith("_")}, **pipe.components}
            return cls(**{k: v for k, v in given.items() if k in accepted})
    raise AdapterError(f"{type(pipe).__name__} has no diffusers pipeline class to save as")
