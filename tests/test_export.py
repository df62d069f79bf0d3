"""Exports (docs/design.md §2-§3): stock diffusers ``load_lora_weights`` reproduces erasekit's composition from
``to_diffusers`` (and ``to_kohya``) files; kohya key names; full deltas and gates; ``bake`` → stock
``from_pretrained`` gives the fused output and leaves the pipeline untouched."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from erasekit import compose, export
from erasekit.adapter import Adapter, ModuleDelta
from erasekit.errors import AdapterError
from erasekit.testing import tiny_pipeline

pytest.importorskip("peft")  # stock diffusers LoRA loading needs the PEFT backend

TARGETS = {  # unet + every text encoder, a Conv2d on sd1, mixed ranks
    "sd1": ("attn2.to_k", "attn2.to_v", "down_blocks.0.attentions.0.proj_in", "layers.0.self_attn.q_proj",
            "layers.1.mlp.fc1"),
    "sdxl": ("attn2.to_k", "attn2.to_v", "mid_block.attentions.0.proj_in", "layers.0.self_attn.q_proj",
             "layers.1.mlp.fc1"),
}


def random_adapter(pipe, suffixes, *, seed=0, scale=0.3, components=("unet", "text_encoder", "text_encoder_2"),
                   gating=None, full=()) -> Adapter:
    """Rank 2 on ``to_v`` modules and rank 3 elsewhere (a mixed-rank file), full deltas for ``full`` suffixes."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for component in components:
        root = getattr(pipe, component, None)
        for path, module in (root.named_modules() if root is not None else ()):
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not path.endswith(suffixes):
                continue
            w = module.weight
            if path.endswith(tuple(full)):
                deltas[f"{component}.{path}"] = ModuleDelta(delta=torch.randn(w.shape, generator=g) * scale / 4)
                continue
            rank = 2 if path.endswith("to_v") else 3
            deltas[f"{component}.{path}"] = ModuleDelta(
                down=torch.randn(rank, *w.shape[1:], generator=g) * scale,
                up=torch.randn(w.shape[0], rank, *[1] * (w.ndim - 2), generator=g) * scale)
    return Adapter(method="test", concepts=("cat",), config={}, deltas=deltas, gating=gating or {"rule": "static"})


def generate(pipe, prompt="a cat"):
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def composed(pipe, adapter):
    compose.load(pipe, adapter, name="x")
    try:
        return generate(pipe)
    finally:
        compose.unload(pipe)


def keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_export_loads_in_stock_diffusers_and_matches_compose(family, tmp_path):
    pipe = tiny_pipeline(family)
    base = generate(pipe)
    adapter = random_adapter(pipe, TARGETS[family])
    assert {k.partition(".")[0] for k in adapter.deltas} >= {"unet", "text_encoder"}
    expected = composed(pipe, adapter)
    assert np.abs(expected - base).max() > 1e-3

    path = export.to_diffusers(adapter, tmp_path / "cat.lora.safetensors")
    names, metadata = keys(path)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in names)
    record = json.loads(metadata["lora_adapter_metadata"])
    assert record["unet.lora_alpha"] == record["unet.r"] and record["unet.alpha_pattern"] == record["unet.rank_pattern"]
    assert [p.name for p in tmp_path.iterdir()] == ["cat.lora.safetensors"]  # no temporary file left

    pipe.load_lora_weights(str(path), adapter_name="cat")
    try:
        np.testing.assert_allclose(generate(pipe), expected, atol=1e-5)
    finally:
        pipe.unload_lora_weights()
    assert np.array_equal(generate(pipe), base)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_export_key_names_and_unet_roundtrip(family, tmp_path):
    pipe = tiny_pipeline(family)
    adapter = random_adapter(pipe, TARGETS[family])
    names, metadata = keys(export.to_kohya(adapter, tmp_path / "k.safetensors"))
    te = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
    assert all(k.startswith(("lora_unet_",) + te) for k in names)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in names)
    stem = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= names
    assert f"{te[0]}text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in names
    if family == "sdxl":
        assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha" in names
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        for stem in {k.rsplit(".", 2)[0] if k.endswith(".weight") else k[: -len(".alpha")] for k in names}:
            assert float(f.get_tensor(f"{stem}.alpha")) == f.get_tensor(f"{stem}.lora_down.weight").shape[0]

    # stock diffusers reads kohya UNet keys (uniform rank; its kohya text-encoder path is exercised upstream)
    unet_only = Adapter(method="test", concepts=(), config={}, deltas={
        k: ModuleDelta(down=d.down[:2], up=d.up[:, :2]) for k, d in adapter.deltas.items() if k.startswith("unet.")})
    expected = composed(pipe, unet_only)
    export.to_kohya(unet_only, tmp_path / "unet.safetensors")
    pipe.load_lora_weights(str(tmp_path / "unet.safetensors"), adapter_name="kohya")
    try:
        np.testing.assert_allclose(generate(pipe), expected, atol=1e-5)
    finally:
        pipe.unload_lora_weights()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_deltas_export_exactly_and_load_in_stock_diffusers(family, tmp_path):
    """Full deltas (UCE on tinyworld) need no --svd-rank: exact full-rank factors, stock diffusers reproduces them."""
    pipe = tiny_pipeline(family)
    conv = "down_blocks.0.resnets.0.conv1" if family == "sd1" else "mid_block.resnets.0.conv1"  # 3×3: in·9 > out
    adapter = random_adapter(pipe, TARGETS[family] + (conv,), full=("attn2.to_k", "proj_in", "q_proj", conv))
    full = {k: d.delta for k, d in adapter.deltas.items() if d.delta is not None}
    assert any(k.endswith(conv) for k in full) and any(k.startswith("text_encoder.") for k in full)
    expected = composed(pipe, adapter)

    with pytest.warns(UserWarning, match=rf"{len(full)} full delta\(s\) exported exactly at full rank"):
        path = export.to_diffusers(adapter, tmp_path / "full.safetensors")
    with safe_open(str(path), "pt") as f:
        for key, delta in full.items():
            component, _, module = key.partition(".")
            prefix = "" if component == "unet" or module.startswith("text_model.") else "text_model."
            stem = f"{component}.{prefix}{module}"
            up, down = f.get_tensor(f"{stem}.lora_B.weight"), f.get_tensor(f"{stem}.lora_A.weight")
            assert down.shape[0] == min(delta.shape[0], delta[0].numel())
            assert torch.equal((up.flatten(1) @ down.flatten(1)).reshape(delta.shape), delta)  # bit-exact
    pipe.load_lora_weights(str(path), adapter_name="full")
    try:
        np.testing.assert_allclose(generate(pipe), expected, atol=1e-5)
    finally:
        pipe.unload_lora_weights()
    with pytest.warns(UserWarning, match="exported exactly"):
        export.to_kohya(adapter, tmp_path / "full-kohya.safetensors")


def test_svd_rank_and_gated_warns(tmp_path):
    pipe = tiny_pipeline("sd1")
    full = random_adapter(pipe, ("attn2.to_k",), components=("unet",), full=("attn2.to_k",))
    with pytest.raises(AdapterError, match="svd_rank must be a positive integer"):
        export.to_diffusers(full, tmp_path / "f.safetensors", svd_rank=0)
    assert not list(tmp_path.iterdir())

    # a full delta that is exactly rank 3 comes back exactly through a rank-3 SVD
    low = random_adapter(pipe, ("attn2.to_k",), components=("unet",))
    as_full = Adapter(method="t", concepts=(), config={}, deltas={k: ModuleDelta(delta=d.dense())
                                                                  for k, d in low.deltas.items()})
    with pytest.warns(UserWarning, match="SVD approximations: max relative error"):
        path = export.to_diffusers(as_full, tmp_path / "svd.safetensors", svd_rank=3)
    with safe_open(str(path), "pt") as f:
        for key, delta in low.deltas.items():
            up, down = f.get_tensor(f"{key}.lora_B.weight"), f.get_tensor(f"{key}.lora_A.weight")
            torch.testing.assert_close(up @ down, delta.dense(), atol=1e-5, rtol=1e-4)

    gated = random_adapter(pipe, ("attn2.to_k",), components=("unet",), gating={
        "rule": "prompt_similarity", "prompts": ["cat"], "metric": "clipcos_tokenuni", "facilitate_factor": 1.0})
    with pytest.warns(UserWarning, match="gate"):
        export.to_kohya(gated, tmp_path / "gated.safetensors")


def test_bake_saves_a_stock_pipeline_with_the_fused_output(tmp_path):
    from diffusers import StableDiffusionPipeline

    from erasekit.pipelines import ErasureStableDiffusionPipeline

    pipe = ErasureStableDiffusionPipeline.from_pipe(tiny_pipeline("sd1"))
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    first = random_adapter(pipe, TARGETS["sd1"], seed=1)
    second = random_adapter(pipe, ("attn2.to_v",), seed=2, components=("unet",), full=("attn2.to_v",))
    other = random_adapter(pipe, ("attn2.to_k",), seed=3, components=("unet",))
    pipe.load_erasure(other, name="other")  # an erasure already loaded is off while baking, on again after
    with_other = generate(pipe)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export.bake(pipe, [first, (second, 0.5)], tmp_path / "baked")
    assert np.array_equal(generate(pipe), with_other) and pipe.erasures[0]["name"] == "other"
    pipe.unload_erasures()
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())

    pipe.load_erasure(first, name="first")
    pipe.load_erasure(second, name="second", weight=0.5)
    pipe.fuse_erasures()
    fused = generate(pipe)
    pipe.unload_erasures()
    assert np.array_equal(generate(pipe), base)

    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    card = (out / "README.md").read_text()
    assert "| test-cat | test | cat | 1 |" in card and "| test-cat | test | cat | 0.5 |" in card
    assert len([p for p in tmp_path.iterdir()]) == 1  # the temporary folder was renamed
    baked = StableDiffusionPipeline.from_pretrained(out)
    baked.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate(baked), fused, atol=1e-6)

    gated = random_adapter(pipe, ("attn2.to_k",), components=("unet",), gating={
        "rule": "prompt_similarity", "prompts": ["cat"], "metric": "clipcos_tokenuni", "facilitate_factor": 1.0})
    with pytest.raises(AdapterError, match="gating"):
        export.bake(pipe, [gated], tmp_path / "gated")
    with pytest.raises(FileExistsError):
        export.bake(pipe, [first], out)


def test_bake_keeps_each_components_dtype_and_the_pipeline_as_it_was(tmp_path):
    """diffusers' ``from_pipe`` casts every shared component to one dtype (float32 by default): baking an fp16
    pipeline must neither save it in fp32 nor leave the user's pipeline in fp32, and a VAE kept in fp32 stays so."""
    from erasekit.pipelines import ErasureStableDiffusionPipeline

    pipe = ErasureStableDiffusionPipeline.from_pipe(tiny_pipeline("sd1"))
    pipe.unet.half()
    pipe.text_encoder.half()
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    adapter = random_adapter(pipe, ("attn2.to_k",), components=("unet",), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export.bake(pipe, [adapter], tmp_path / "baked")
    assert (pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype) == (torch.float16, torch.float16, torch.float32)
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
    saved = {}
    for component in ("unet", "text_encoder", "vae"):
        [weights] = (out / component).glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            saved[component] = {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}
    assert saved == {"unet": {torch.float16}, "text_encoder": {torch.float16}, "vae": {torch.float32}}


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_exported_files_and_baked_folder_follow_the_umask(tmp_path, mask, mode):
    import os

    pipe = tiny_pipeline("sd1")
    adapter = random_adapter(pipe, ("attn2.to_k",), components=("unet",))
    old = os.umask(mask)
    try:
        lora = export.to_diffusers(adapter, tmp_path / "a.lora.safetensors")
        kohya = export.to_kohya(adapter, tmp_path / "a.kohya.safetensors")
        baked = export.bake(pipe, [adapter], tmp_path / "baked")
    finally:
        os.umask(old)
    assert lora.stat().st_mode & 0o777 == mode and kohya.stat().st_mode & 0o777 == mode
    assert baked.stat().st_mode & 0o777 == mode | (mode & 0o444) >> 2  # rwx where the files have rw
    assert (baked / "README.md").stat().st_mode & 0o777 == mode
