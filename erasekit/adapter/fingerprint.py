"""Which model an adapter fits: :func:`fingerprint` of a pipeline's weights, :func:`resolve_module`,
:func:`find_module` and :func:`check_compatible`."""

from __future__ import annotations

import hashlib
import json
import warnings

import torch

from ..errors import AdapterMismatchError, BaseModelMismatchWarning, ConfigError
from .model import COMPONENTS, DENOISERS, Adapter
from .spec import split_key

#: how many elements of each parameter the "weights" digest of :func:`fingerprint` reads, at most
FINGERPRINT_SAMPLE = 8192  # elements read per parameter
FINGERPRINT_BLOCKS = 16  # contiguous blocks they are read in
_TEXT_MODEL_PREFIX = "text_model."  # transformers < 5 nests CLIPTextModel under .text_model; >= 5 does not


def _canonical_name(name: str) -> str:
    # transformers >= 5 flattened CLIPTextModel (no .text_model); the same checkpoint must fingerprint the same
    return name.removeprefix(_TEXT_MODEL_PREFIX)


def _pipeline_components(pipe) -> tuple[str, ...]:
    return tuple(c for c in COMPONENTS if getattr(pipe, c, None) is not None)


def denoiser_component(pipe) -> str | None:
    """The name of a pipeline's denoiser component: ``"unet"`` (SD 1.x, 2.x, SDXL) or ``"transformer"`` (SD3, FLUX);
    None when it has neither."""
    return next((c for c in DENOISERS if isinstance(getattr(pipe, c, None), torch.nn.Module)), None)


def fingerprint_module(module: torch.nn.Module, sample: int = FINGERPRINT_SAMPLE) -> dict[str, str]:
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

    For each component (by default every one of ``unet`` or ``transformer`` (SD3, FLUX), ``text_encoder``,
    ``text_encoder_2`` the pipeline has): ``"architecture"`` is the sha256 of the sorted (parameter name, shape) list,
    and ``"weights"`` the sha256 of a sample of each parameter, cast to fp16: all of it up to ``FINGERPRINT_SAMPLE``
    elements, else ``FINGERPRINT_BLOCKS`` contiguous blocks of ``FINGERPRINT_SAMPLE // FINGERPRINT_BLOCKS`` elements
    starting at ``i * (numel - block) // (FINGERPRINT_BLOCKS - 1)`` (the exact recipe: ``adapters/README.md`` §4), so
    fp32 and fp16 loads of one checkpoint, on any device, give the same digests. Parameter names drop a leading
    ``text_model.`` so that transformers 4 and 5 agree. Cost: a read of ≤ ``FINGERPRINT_SAMPLE`` elements per
    parameter.

    Args:
        pipe: a diffusers pipeline (anything with ``unet`` or ``transformer``, ``text_encoder``, ``text_encoder_2``
            attributes).
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
        out[name] = fingerprint_module(module)
    return out


def find_module(root: torch.nn.Module, module_path: str) -> torch.nn.Module | None:
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
    """The module a delta key ("unet.<path>", "transformer.<path>", "text_encoder.<path>" ...) names in ``pipe``.

    Text-encoder paths resolve with or without the ``text_model.`` prefix, since transformers 5 dropped it
    from ``CLIPTextModel``.

    Raises:
        AdapterMismatchError: the component or the module does not exist.
    """
    split = split_key(key)
    if split is None:
        raise AdapterMismatchError(f"{key!r} is not '<component>.<module path>' (component one of {', '.join(COMPONENTS)})")
    component, module_path = split
    root = getattr(pipe, component, None)
    if root is None:
        raise AdapterMismatchError(f"the pipeline has no {component}; it has "
                                   f"{', '.join(_pipeline_components(pipe)) or 'none'}")
    module = find_module(root, module_path)
    if module is None:
        raise AdapterMismatchError(f"the pipeline's {component} has no module {module_path!r}")
    return module


_DENOISER_NAMES = {"unet": "a UNet (SD 1.x, 2.x, SDXL)", "transformer": "an MMDiT transformer (SD3, FLUX)"}


def _family_mismatch(component: str, pipe) -> str:
    """Why a denoiser component is missing: the adapter was made for the other denoiser family ('' otherwise)."""
    present = denoiser_component(pipe)
    if component in _DENOISER_NAMES and present:
        return (f"; it was made for a model whose denoiser is {_DENOISER_NAMES[component]}, and this pipeline's "
                f"is {_DENOISER_NAMES[present]}")
    return ""


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
            family = _family_mismatch(component, pipe) or "; it was made for another model family"
            raise AdapterMismatchError(f"{what} changes the {component}, but this {type(pipe).__name__} has no "
                                       f"{component} (it has {', '.join(_pipeline_components(pipe)) or 'none'})"
                                       f"{family}{base}")
        expected = adapter.fingerprint.get(component) or {}
        if not (expected.get("architecture") or expected.get("weights")):
            continue
        found = fingerprint_module(root)
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
            module = find_module(root, module_path)
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
