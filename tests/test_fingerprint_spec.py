"""adapters/README.md §4, implemented a second time from the spec's text alone (numpy and hashlib, none of
erasekit's fingerprint code), must give erasekit's digests: on tinyworld and on a small random model whose
parameters span the sampling cases (whole, barely sampled, and large enough that a float32 linspace of the block
starts rounds differently)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from erasekit.adapter import fingerprint


def spec_digests(named_arrays) -> dict[str, str]:
    """§4: ``named_arrays`` is (name, numpy array) per parameter, as ``named_parameters()`` lists them."""
    params = sorted(((name[len("text_model."):] if name.startswith("text_model.") else name, array)
                     for name, array in named_arrays), key=lambda item: item[0])
    architecture, weights = hashlib.sha256(), hashlib.sha256()
    for name, array in params:
        architecture.update(json.dumps([name, list(array.shape)]).encode("utf-8") + b"\n")
        flat = array.reshape(-1)
        n = flat.size
        if n > 8192:
            flat = np.concatenate([flat[i * (n - 512) // 15:][:512] for i in range(16)])
        weights.update(name.encode("utf-8") + b"\n")
        weights.update(flat.astype("<f2").tobytes())
    return {"architecture": architecture.hexdigest(), "weights": weights.hexdigest()}


def as_numpy(module: torch.nn.Module):
    return [(name, p.detach().float().cpu().numpy()) for name, p in module.named_parameters()]


class Holder:
    """Anything with a ``unet`` / ``text_encoder`` attribute can be fingerprinted."""

    def __init__(self, **components):
        self.__dict__.update(components)


def random_model(seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    # whole (≤ 8192), just sampled, overlapping blocks, and 1,210,420 elements: the smallest size where
    # erasekit 0.1.0's float32 linspace put a block start one element off the spec's floor
    for name, shape in {"a": (8192,), "b": (8193,), "c": (3, 5, 7, 91), "d": (1, 1_210_420), "e": (77,)}.items():
        model.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=g) * 3))
    inner = torch.nn.Module()
    inner.register_parameter("weight", torch.nn.Parameter(torch.randn(40, 300, generator=g)))
    text_model = torch.nn.Module()
    text_model.add_module("layer", inner)
    model.add_module("text_model", text_model)  # names lose their leading `text_model.`
    model.register_parameter("a_after", torch.nn.Parameter(torch.full((2,), 70000.0)))  # fp16 overflow → inf
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_spec_fingerprint_of_a_random_model(seed):
    model = random_model(seed)
    assert fingerprint(Holder(unet=model), ["unet"])["unet"] == spec_digests(as_numpy(model))


def test_spec_fingerprint_of_fp16_weights_is_the_fp32_one():
    model = random_model(2)
    expected = spec_digests(as_numpy(model))
    assert fingerprint(Holder(unet=model.half()), ["unet"])["unet"] == expected


def test_spec_fingerprint_of_tinyworld():
    import erasekit

    pipe = erasekit.load_pipeline()
    found = fingerprint(pipe)
    assert set(found) == {"unet", "text_encoder"}
    for component, digests in found.items():
        assert digests == spec_digests(as_numpy(getattr(pipe, component))), component
