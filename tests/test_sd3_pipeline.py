"""Erasures on an MMDiT pipeline (issue #25): adapters that change ``StableDiffusion3Pipeline.transformer`` load,
weigh, gate, fuse, unfuse and unload exactly as on a UNet; fingerprints, files and family mismatches; the erasure SD3
pipeline and its diffusers custom pipeline; export to diffusers' SD3 LoRA layout (stock ``load_lora_weights``
reproduces erasekit's output); loading an SD3 folder and ``erasekit generate`` on it. All on
``erasekit.testing.tiny_pipeline("sd3")`` (random weights, two CLIP encoders, no T5)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from erasekit import compose
from erasekit.adapter import (Adapter, ModuleDelta, check_compatible, denoiser_component, fingerprint, load_adapter,
                              save_adapter)
from erasekit.errors import AdapterError, AdapterMismatchError
from erasekit.testing import tiny_pipeline

#: joint attention's text-stream key/value (what UCE edits on MMDiT), image-stream projections, and an MLP
LOW_RANK = ("attn.add_k_proj", "attn.add_v_proj", "attn.to_q", "ff.net.2")
FULL = ("attn.to_k", "context_embedder")


def transformer_adapter(pipe, suffixes=LOW_RANK, *, full=(), rank=2, seed=0, scale=0.3, text_encoder=(),
                        gating=None, concepts=("cat",)) -> Adapter:
    """Random rank-``rank`` deltas on the transformer's modules ending in ``suffixes``, full deltas on ``full``, and
    low-rank deltas on ``text_encoder`` module suffixes of both CLIP encoders."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    targets = [("transformer", suffixes + tuple(full))] + [(c, tuple(text_encoder)) for c in
                                                           ("text_encoder", "text_encoder_2") if text_encoder]
    for component, ends in targets:
        for path, module in getattr(pipe, component).named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not path.endswith(ends):
                continue
            w = module.weight
            if path.endswith(tuple(full)):
                deltas[f"{component}.{path}"] = ModuleDelta(delta=torch.randn(w.shape, generator=g) * scale / 4)
            else:
                deltas[f"{component}.{path}"] = ModuleDelta(
                    down=torch.randn(rank, *w.shape[1:], generator=g) * scale,
                    up=torch.randn(w.shape[0], rank, *[1] * (w.ndim - 2), generator=g) * scale)
    return Adapter(method="test", concepts=concepts, config={}, deltas=deltas, gating=gating or {"rule": "static"})


def generate(pipe, prompt="a cat", seed=0):
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(seed)).images


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(module, saved):
    return all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())


GATED = {"rule": "prompt_similarity", "prompts": ["cat"], "metric": "clipcos_tokenuni", "facilitate_factor": 1.0}


# ---------------------------------------------------------------------------------------------- compose


def test_compose_verbs_on_the_transformer_are_exact():
    pipe = tiny_pipeline("sd3")
    assert denoiser_component(pipe) == "transformer"
    base, saved = generate(pipe), state(pipe.transformer)
    low = transformer_adapter(pipe, seed=1, text_encoder=("layers.0.self_attn.q_proj",))
    full = transformer_adapter(pipe, (), full=FULL, seed=2)
    assert {k.partition(".")[0] for k in low.deltas} == {"transformer", "text_encoder", "text_encoder_2"}
    assert any(k.endswith("attn.add_k_proj") for k in low.deltas) and low.components[0] == "transformer"

    compose.load(pipe, low, name="low")
    only_low = generate(pipe)
    assert np.abs(only_low - base).max() > 1e-3
    compose.load(pipe, full, name="full", weight=0.5)
    both = generate(pipe)
    assert np.abs(both - only_low).max() > 1e-3

    compose.set_weights(pipe, ["low", "full"], [0.0, 0.0])  # weight 0 skips the term: the base, bit for bit
    assert np.array_equal(generate(pipe), base)
    compose.set_weights(pipe, ["low", "full"], [1.0, 0.5])
    compose.disable(pipe, "full")
    assert np.array_equal(generate(pipe), only_low)
    compose.enable(pipe, "full")
    with compose.disabled(pipe):
        assert np.array_equal(generate(pipe), base)
    assert np.array_equal(generate(pipe), both)

    assert compose.fuse(pipe) == ["low", "full"]
    assert not same_state(pipe.transformer, saved)
    np.testing.assert_allclose(generate(pipe), both, atol=1e-5)
    compose.unfuse(pipe)
    assert same_state(pipe.transformer, saved)  # bit-exact restore
    assert np.array_equal(generate(pipe), both)

    compose.fuse(pipe, "full")
    compose.unload(pipe, "full")  # unloading a fused erasure restores its weights
    assert np.array_equal(generate(pipe), only_low)
    compose.unload(pipe)
    assert compose.list_erasures(pipe) == []
    assert same_state(pipe.transformer, saved) and np.array_equal(generate(pipe), base)


def test_from_pipe_siblings_share_the_transformers_erasures():
    from diffusers import StableDiffusion3Pipeline

    pipe = tiny_pipeline("sd3")
    sibling = StableDiffusion3Pipeline.from_pipe(pipe)
    compose.load(pipe, transformer_adapter(pipe), name="a")
    assert [e["name"] for e in compose.list_erasures(sibling)] == ["a"]  # one composer per transformer
    compose.unload(sibling)
    assert compose.list_erasures(pipe) == []


def test_gated_adapter_reads_the_transformers_context():
    """SPM-style gating on SD3: γ per row of the (B, 77 + 256, D) context, tokens found in its CLIP block."""
    pipe = tiny_pipeline("sd3")
    base_cat, base_dog = generate(pipe, "a cat"), generate(pipe, "a dog")
    # tokenuni alone: 1 on a row whose prompt holds "cat", 0 on the unconditional row, only if the row's tokens are
    # recognised (unknown tokens fall back to clipcos, ~1 for every prompt of this random encoder)
    gated = transformer_adapter(pipe, ("attn.add_k_proj", "attn.add_v_proj"), gating={**GATED, "metric": "tokenuni"})
    compose.load(pipe, gated, name="gated")
    values = compose.gates(pipe, ["a cat", "cat", "a dog"])
    assert [v["gated"] for v in values] == [1.0, 1.0, 0.0]

    # inside generation: tokenuni from the token memory (the prompt's CLIP rows are recognised in the context)
    seen = []
    composer = compose.Composer.of(pipe)
    handle = pipe.transformer.register_forward_pre_hook(  # runs after the composer's own pre-hook
        lambda module, args: seen.append(composer._current_gates["gated"].clone()))
    try:
        gated_cat = generate(pipe, "a cat")
    finally:
        handle.remove()
    assert seen and seen[0].shape == (2,)  # [uncond, cond]: a gate per row
    assert seen[0].tolist() == [0.0, 1.0]  # tokenuni("", "cat") = 0, tokenuni("a cat", "cat") = 1
    assert np.abs(gated_cat - base_cat).max() > 1e-3
    with pytest.raises(AdapterError, match="gated by prompt similarity"):
        compose.fuse(pipe, "gated")
    assert compose.fuse(pipe) == []  # fuse() leaves gated erasures on their hooks

    # a direct call passing the context positionally (forward(hidden_states, encoder_hidden_states, pooled, t)) is
    # gated like the pipeline's keyword call
    from erasekit.core import sd

    cond = sd.encode(pipe, ["a cat", "a dog"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        by_keyword = pipe.transformer(hidden_states=latents, encoder_hidden_states=cond.embeds,
                                      pooled_projections=cond.pooled, timestep=t).sample
        by_position = pipe.transformer(latents, cond.embeds, cond.pooled, t).sample
        with compose.disabled(pipe):
            plain = pipe.transformer(latents, cond.embeds, cond.pooled, t).sample
    assert torch.equal(by_keyword, by_position)
    assert not torch.equal(by_position[0], plain[0]) and torch.equal(by_position[1], plain[1])  # γ = 1, 0

    compose.set_weights(pipe, "gated", 0.0)
    assert np.array_equal(generate(pipe, "a dog"), base_dog)
    compose.unload(pipe)
    assert np.array_equal(generate(pipe, "a cat"), base_cat)


def test_gated_deltas_must_be_on_the_transformer():
    pipe = tiny_pipeline("sd3")
    wrong = transformer_adapter(pipe, (), text_encoder=("layers.0.self_attn.q_proj",), gating=GATED)
    with pytest.raises(AdapterError, match="gated deltas must be on the transformer only"):
        compose.load(pipe, wrong)
    assert compose.list_erasures(pipe) == []


def test_guard_is_refused_on_an_mmdit_pipeline():
    pipe = tiny_pipeline("sd3")
    guard = Adapter(method="safree", concepts=("cat",), config={}, deltas={}, guard={"rule": "safree"})
    with pytest.raises(AdapterMismatchError, match=r"guard \(safree\).*MMDiT transformer \(SD3, FLUX\)"):
        compose.load(pipe, guard, name="g")
    assert compose.list_erasures(pipe) == []


# ------------------------------------------------------------------------------------ files, fingerprints


def test_fingerprint_file_roundtrip_and_compatibility(tmp_path):
    pipe = tiny_pipeline("sd3")
    digests = fingerprint(pipe)
    assert list(digests) == ["transformer", "text_encoder", "text_encoder_2"]
    adapter = transformer_adapter(pipe, full=FULL, text_encoder=("mlp.fc1",))
    adapter = Adapter(**{**adapter.__dict__, "fingerprint": digests, "base_model": "tiny-sd3"})
    path = save_adapter(adapter, tmp_path / "cat.test.safetensors")
    back = load_adapter(path)
    assert back.components == ("transformer", "text_encoder", "text_encoder_2")
    assert set(back.deltas) == set(adapter.deltas)
    assert all(torch.equal(back.deltas[k].dense(), d.dense()) for k, d in adapter.deltas.items())
    check_compatible(back, pipe)  # same model: silent

    with compose.disabled(pipe):
        base = generate(pipe)
    compose.load(pipe, path)
    assert [e["name"] for e in compose.list_erasures(pipe)] == ["cat.test"]
    assert np.abs(generate(pipe) - base).max() > 1e-3
    compose.unload(pipe)

    other = tiny_pipeline("sd3", seed=1)  # same architecture, other weights: a warning, strict refuses
    with pytest.warns(UserWarning, match="another checkpoint of the same architecture"):
        check_compatible(back, other)
    with pytest.raises(AdapterMismatchError, match="strict=True"):
        check_compatible(back, other, strict=True)


def test_an_adapter_of_the_other_family_is_named_as_such():
    sd3, sd1 = tiny_pipeline("sd3"), tiny_pipeline("sd1")
    on_transformer = transformer_adapter(sd3)
    with pytest.raises(AdapterMismatchError, match=r"changes the transformer, but this StableDiffusionPipeline has no "
                                                   r"transformer .*denoiser is an MMDiT transformer \(SD3, FLUX\), "
                                                   r"and this pipeline's is a UNet"):
        compose.load(sd1, on_transformer)
    deltas = {f"unet.{p}": ModuleDelta(down=torch.zeros(1, m.weight.shape[1]), up=torch.zeros(m.weight.shape[0], 1))
              for p, m in sd1.unet.named_modules() if p.endswith("attn2.to_k")}
    on_unet = Adapter(method="test", concepts=("cat",), config={}, deltas=deltas)
    with pytest.raises(AdapterMismatchError, match=r"changes the unet, but this StableDiffusion3Pipeline has no unet "
                                                   r".*denoiser is a UNet .*and this pipeline's is an MMDiT"):
        compose.load(sd3, on_unet)
    # a text-encoder adapter of SD 1.x on SD3's encoders: another architecture, by fingerprint
    te = Adapter(method="test", concepts=("cat",), config={}, fingerprint=fingerprint(sd1, ["text_encoder"]),
                 deltas={"text_encoder.text_model.encoder.layers.0.mlp.fc1": ModuleDelta(
                     down=torch.zeros(1, 24), up=torch.zeros(48, 1))})
    with pytest.raises(AdapterMismatchError, match="computed on another architecture"):
        compose.load(sd3, te)
    assert compose.list_erasures(sd3) == [] and compose.list_erasures(sd1) == []


# ------------------------------------------------------------------------------------------------ pipelines


def test_erasure_sd3_pipeline_matches_stock_and_its_verbs_work():
    import erasekit
    from erasekit.pipelines import ErasureStableDiffusion3Pipeline

    assert erasekit.ErasureStableDiffusion3Pipeline is ErasureStableDiffusion3Pipeline

    stock = tiny_pipeline("sd3")
    pipe = ErasureStableDiffusion3Pipeline.from_pipe(stock)
    pipe.set_progress_bar_config(disable=True)
    base, saved = generate(stock), state(pipe.transformer)
    assert np.array_equal(generate(pipe), base)  # parity: the parent's __call__, unchanged

    pipe.load_erasure(transformer_adapter(pipe, seed=1), name="a")
    pipe.load_erasure(transformer_adapter(pipe, ("attn.add_v_proj",), full=("attn.to_k",), seed=2), name="b",
                      weight=0.5)
    assert [(e["name"], e["weight"], e["enabled"]) for e in pipe.erasures] == [("a", 1.0, True), ("b", 0.5, True)]
    assert compose.list_erasures(stock) == pipe.erasures
    both = generate(pipe)
    assert np.abs(both - base).max() > 1e-3
    pipe.set_erasures(["a"])
    only_a = generate(pipe)
    pipe.set_erasures(["a", "b"], weights=[1.0, 0.5])
    assert np.array_equal(generate(pipe), both)
    with pipe.erasures_disabled():
        assert np.array_equal(generate(pipe), base)
    assert pipe.fuse_erasures() == ["a", "b"]
    np.testing.assert_allclose(generate(pipe), both, atol=1e-5)
    pipe.unfuse_erasures()
    assert same_state(pipe.transformer, saved) and np.array_equal(generate(pipe), both)
    pipe.unload_erasures("b")
    assert np.array_equal(generate(pipe), only_a)
    pipe.unload_erasures()
    assert np.array_equal(generate(pipe), base) and same_state(pipe.transformer, saved)

    on_unet = Adapter(method="test", concepts=(), config={}, deltas={
        "unet.mid_block.attentions.0.proj_in": ModuleDelta(delta=torch.zeros(4, 4))})
    with pytest.raises(AdapterMismatchError, match=r"loads erasures of \['transformer', 'text_encoder', "
                                                   r"'text_encoder_2'\], but adapter 'x' changes \['unet'\]"):
        pipe.load_erasure(on_unet, name="x")


@pytest.mark.parametrize("where", ["package", "checkout"])
def test_sd3_custom_pipeline_loads_from_folder(tmp_path, monkeypatch, where):
    import sys
    from pathlib import Path

    from diffusers import DiffusionPipeline
    from diffusers.utils import dynamic_modules_utils

    from erasekit.pipelines import ErasureStableDiffusion3Pipeline, custom_pipeline_path

    cache = tmp_path / "modules"  # diffusers' dynamic-module cache, inside tmp_path
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    stock = tiny_pipeline("sd3")
    stock.save_pretrained(tmp_path / "model")
    if where == "package":
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        custom = custom_pipeline_path("erasekit_sd3")
    else:
        monkeypatch.chdir(Path(__file__).resolve().parents[1])
        custom = "pipelines/erasekit_sd3"
    try:
        pipe = DiffusionPipeline.from_pretrained(tmp_path / "model", custom_pipeline=custom, trust_remote_code=True,
                                                 text_encoder_3=None, tokenizer_3=None)
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("diffusers_modules"):
                del sys.modules[name]
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "ErasureStableDiffusion3Pipeline"
    assert isinstance(pipe, ErasureStableDiffusion3Pipeline) and any(cache.rglob("pipeline.py"))
    base = generate(stock)
    assert np.array_equal(generate(pipe), base)
    pipe.load_erasure(transformer_adapter(pipe), name="a")
    assert np.abs(generate(pipe) - base).max() > 1e-3
    pipe.unload_erasures()
    assert np.array_equal(generate(pipe), base)


def test_load_pipeline_and_generate_cli_on_an_sd3_folder(tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    from erasekit.cli import main
    from erasekit.loading import load_pipeline

    stock = tiny_pipeline("sd3")
    stock.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    pipe = load_pipeline(tmp_path / "model", device="cpu")
    assert type(pipe) is StableDiffusion3Pipeline and pipe.text_encoder_3 is None
    assert np.array_equal(generate(pipe), generate(stock))

    adapter = transformer_adapter(stock)
    save_adapter(adapter, tmp_path / "cat.test.safetensors")
    def stock_image():
        return np.asarray(stock(["a cat"], num_inference_steps=2, guidance_scale=3.0, output_type="pil",
                                generator=[torch.Generator().manual_seed(0)]).images[0], dtype=int)

    base = stock_image()
    compose.load(stock, adapter)
    expected = stock_image()
    compose.unload(stock)
    code = main(["generate", "--model", str(tmp_path / "model"), "--device", "cpu", "--prompt", "a cat",
                 "--seed", "0", "--steps", "2", "--guidance", "3", "--adapter", str(tmp_path / "cat.test.safetensors"),
                 "--out", str(tmp_path / "cat.png")])
    assert code == 0
    from PIL import Image

    # erasekit generate runs SD3 without T5 on one zero row standing for the 256 (core.mmdit): the stock pipeline's
    # image to float rounding, so to one 8-bit level; the adapter moves it by more
    image = np.asarray(Image.open(tmp_path / "cat.png"), dtype=int)
    assert np.abs(image - expected).max() <= 1 < np.abs(expected - base).max()


# --------------------------------------------------------------------------------------------------- export


def composed(pipe, adapter, **call):
    compose.load(pipe, adapter, name="x")
    try:
        return generate(pipe, **call)
    finally:
        compose.unload(pipe)


def test_diffusers_export_loads_in_stock_sd3_and_matches_compose(tmp_path):
    from safetensors import safe_open

    from erasekit import export

    pytest.importorskip("peft")
    pipe = tiny_pipeline("sd3")
    base = generate(pipe)
    # mixed ranks (2 on the transformer, 3 on the encoders), full deltas (a Linear wider than tall: ΔW = I·ΔW), both
    # CLIP encoders
    adapter = transformer_adapter(pipe, full=FULL, text_encoder=("layers.0.self_attn.q_proj", "layers.1.mlp.fc1"))
    adapter = Adapter(**{**adapter.__dict__, "deltas": {
        k: (ModuleDelta(down=torch.cat([d.down, d.down[:1]]), up=torch.cat([d.up, d.up[:, :1] * 0.5], 1))
            if k.startswith("text_encoder") else d) for k, d in adapter.deltas.items()}})
    full = {k: d.delta for k, d in adapter.deltas.items() if d.delta is not None}
    assert len(full) == 3 and {k.partition(".")[0] for k in adapter.deltas} == {"transformer", "text_encoder",
                                                                              "text_encoder_2"}
    expected = composed(pipe, adapter)
    assert np.abs(expected - base).max() > 1e-3

    with pytest.warns(UserWarning, match=r"3 full delta\(s\) exported exactly"):
        path = export.to_diffusers(adapter, tmp_path / "cat.lora.safetensors")
    with safe_open(str(path), "pt") as f:
        names, metadata = set(f.keys()), f.metadata()
        for key, delta in full.items():
            up, down = f.get_tensor(f"{key}.lora_B.weight"), f.get_tensor(f"{key}.lora_A.weight")
            assert torch.equal(up @ down, delta)  # exact
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight" in names  # diffusers' SD3 key layout
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_B.weight" in names
    record = json.loads(metadata["lora_adapter_metadata"])
    assert record["transformer.r"] == record["transformer.lora_alpha"] == 2
    assert record["text_encoder.rank_pattern"] == {} and record["text_encoder.r"] == 3

    pipe.load_lora_weights(str(path), adapter_name="cat")  # stock SD3LoraLoaderMixin
    try:
        loaded = {n.split(".lora_A")[0] for n, _ in pipe.transformer.named_modules() if ".lora_A" in n}
        assert any(n.endswith("attn.add_v_proj") for n in loaded)
        np.testing.assert_allclose(generate(pipe), expected, atol=1e-5)
    finally:
        pipe.unload_lora_weights()
    assert np.array_equal(generate(pipe), base)

    with pytest.raises(AdapterError, match="kohya layout names the original checkpoint"):
        export.to_kohya(adapter, tmp_path / "k.safetensors")


def test_bake_an_sd3_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from erasekit import export

    pipe = tiny_pipeline("sd3")
    base, saved = generate(pipe), state(pipe.transformer)
    adapter = transformer_adapter(pipe, full=("attn.to_k",))
    compose.load(pipe, adapter, name="a")
    compose.fuse(pipe)
    fused = generate(pipe)
    compose.unload(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export.bake(pipe, [adapter], tmp_path / "baked")
    assert same_state(pipe.transformer, saved) and np.array_equal(generate(pipe), base)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    baked = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    baked.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate(baked), fused, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- FLUX


def flux_generate(pipe, prompt="a cat", seed=0):
    return pipe(prompt, height=16, width=16, num_inference_steps=2, max_sequence_length=77, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def test_flux_pipeline_verbs_and_diffusers_export(tmp_path):
    """The same mixin on FluxPipeline: static erasures on the double- and single-stream blocks and the CLIP encoder,
    fuse/unfuse/unload exact; stock FluxPipeline.load_lora_weights reproduces the export; gates and T5 exports are
    refused with the reason."""
    from erasekit import export
    from erasekit.pipelines import ErasureFluxPipeline
    from erasekit.testing import tiny_flux_pipeline

    pytest.importorskip("peft")
    stock = tiny_flux_pipeline()
    pipe = ErasureFluxPipeline.from_pipe(stock)
    pipe.set_progress_bar_config(disable=True)
    base, saved = flux_generate(stock), state(pipe.transformer)
    assert np.array_equal(flux_generate(pipe), base)
    adapter = transformer_adapter(pipe, ("attn.add_k_proj", "attn.to_v", "proj_mlp"), full=("attn.to_k",))
    te = Adapter(method="test", concepts=("cat",), config={}, deltas={**adapter.deltas, **{
        f"text_encoder.{p}": ModuleDelta(down=torch.randn(2, m.weight.shape[1]) * 0.3,
                                         up=torch.randn(m.weight.shape[0], 2) * 0.3)
        for p, m in pipe.text_encoder.named_modules() if p.endswith("layers.0.self_attn.q_proj")}})
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in te.deltas)
    pipe.load_erasure(te, name="a")
    erased = flux_generate(pipe)
    assert np.abs(erased - base).max() > 1e-3
    pipe.fuse_erasures()
    np.testing.assert_allclose(flux_generate(pipe), erased, atol=1e-5)
    pipe.unfuse_erasures()
    assert same_state(pipe.transformer, saved) and np.array_equal(flux_generate(pipe), erased)
    pipe.unload_erasures()
    assert np.array_equal(flux_generate(pipe), base)

    with pytest.warns(UserWarning, match="exported exactly"):
        path = export.to_diffusers(te, tmp_path / "flux.lora.safetensors")
    stock.load_lora_weights(str(path), adapter_name="cat")
    try:
        np.testing.assert_allclose(flux_generate(stock), erased, atol=1e-5)
    finally:
        stock.unload_lora_weights()
    assert np.array_equal(flux_generate(stock), base)

    t5 = Adapter(method="test", concepts=("cat",), config={}, deltas={
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": ModuleDelta(delta=torch.zeros(16, 32))})
    with pytest.raises(AdapterError, match="T5 encoder"):
        export.to_diffusers(t5, tmp_path / "t5.safetensors")
    gated = transformer_adapter(pipe, ("attn.add_k_proj",), gating=GATED)
    with pytest.raises(AdapterMismatchError, match="FLUX's transformer reads T5 rows alone"):
        pipe.load_erasure(gated, name="g")
    assert pipe.erasures == []


def test_load_pipeline_reads_a_flux_folder(tmp_path):
    from diffusers import FluxPipeline

    from erasekit.loading import load_pipeline
    from erasekit.testing import tiny_flux_pipeline

    stock = tiny_flux_pipeline()
    stock.save_pretrained(tmp_path / "flux")
    pipe = load_pipeline(tmp_path / "flux", device="cpu")
    assert type(pipe) is FluxPipeline
    # ~1e-7 apart: the FLUX pipeline built in code and its stock from_pretrained reload differ by float rounding
    np.testing.assert_allclose(flux_generate(pipe), flux_generate(stock), atol=1e-5)


def test_transformer_adapters_are_format_1_3_files(tmp_path):
    """The transformer component came in format 1.3: a file naming it (deltas or fingerprint) declares 1.3, UNet and
    text-encoder files keep their versions, and a file naming it under an earlier version is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from erasekit.adapter import FORMAT_KEY, METADATA_KEY, read_record
    from erasekit.errors import AdapterFileError

    pipe = tiny_pipeline("sd3")
    on_transformer = transformer_adapter(pipe)
    encoder_only = transformer_adapter(pipe, (), text_encoder=("mlp.fc1",))
    recorded = Adapter(**{**encoder_only.__dict__, "fingerprint": fingerprint(pipe)})  # names the transformer
    for adapter, version in ((on_transformer, "1.3"), (encoder_only, "1.0"), (recorded, "1.3")):
        path = save_adapter(adapter, tmp_path / f"{version}-{len(adapter.fingerprint)}.safetensors")
        assert read_record(path)["format_version"] == version
        with safe_open(str(path), "pt") as f:  # two text encoders and a transformer: no SDXL model-spec claimed
            assert ("modelspec.architecture" in f.metadata()) == (version == "1.0")  # (without a fingerprint: SDXL)

    path = save_adapter(on_transformer, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    record = json.loads(metadata[METADATA_KEY])
    record.pop("tensor_sha256")
    record["format_version"] = "1.2"
    save_file(tensors, str(tmp_path / "old.safetensors"),
              {**metadata, FORMAT_KEY: "1.2", METADATA_KEY: json.dumps(record, sort_keys=True)})
    with pytest.raises(AdapterFileError, match=r"module 'transformer\.transformer_blocks\.0\.attn\.add_k_proj' "
                                               r"names the transformer component .*came in format 1\.3, but the "
                                               r"file says 1\.2"):
        load_adapter(tmp_path / "old.safetensors")


def test_a_uce_adapter_made_on_sd3_loads_fuses_and_exports(tmp_path):
    """End to end with a real method: UCE on the SD3 pipeline → a 1.3 file → the erasure pipeline's verbs → a LoRA
    file stock diffusers reproduces."""
    import erasekit
    from erasekit import export
    from erasekit.adapter import read_record
    from erasekit.pipelines import ErasureStableDiffusion3Pipeline

    pytest.importorskip("peft")
    pipe = ErasureStableDiffusion3Pipeline.from_pipe(tiny_pipeline("sd3"))
    pipe.set_progress_bar_config(disable=True)
    base, saved = generate(pipe), state(pipe.transformer)
    path = erasekit.erase(pipe, "uce", ["cat"]).save(tmp_path / "cat.uce.safetensors")
    record = read_record(path)
    assert record["format_version"] == "1.3" and record["components"] == ["transformer"]
    assert "transformer" in record["fingerprint"]
    assert pipe.load_erasure(path) == "cat.uce"
    erased = generate(pipe)
    assert np.abs(erased - base).max() > 1e-3
    pipe.fuse_erasures()
    np.testing.assert_allclose(generate(pipe), erased, atol=1e-5)
    pipe.unload_erasures()
    assert same_state(pipe.transformer, saved) and np.array_equal(generate(pipe), base)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full deltas: exported exactly at full rank
        lora = export.to_diffusers(load_adapter(path), tmp_path / "cat.lora.safetensors")
    pipe.load_lora_weights(str(lora), adapter_name="cat")
    try:
        np.testing.assert_allclose(generate(pipe), erased, atol=1e-5)
    finally:
        pipe.unload_lora_weights()


def test_erasekit_generate_collapsed_rows_keep_gates_and_deltas():
    """erasekit.generate runs SD3 without T5 on one zero row standing for the 256 (core.mmdit.collapsed_generation);
    with a static and a gated erasure loaded it still gives the stock pipeline's images (to float rounding)."""
    from erasekit.generate import generate as erasekit_generate

    pipe = tiny_pipeline("sd3")
    compose.load(pipe, transformer_adapter(pipe, full=FULL, seed=1), name="static")
    compose.load(pipe, transformer_adapter(pipe, ("attn.add_k_proj", "attn.add_v_proj"), seed=2,
                                           gating={**GATED, "metric": "tokenuni"}), name="gated")
    prompts = ["a cat", "a dog"]

    def stock(prompt):
        return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    expected = np.stack([stock(p) for p in prompts])
    ours = erasekit_generate(pipe, prompts, [0, 0], num_inference_steps=2, guidance_scale=3.0, output_type="np")
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    compose.disable(pipe, "gated")
    assert np.abs(stock("a cat") - expected[0]).max() > 1e-3  # the gate was open on "a cat"
    np.testing.assert_allclose(stock("a dog"), expected[1], atol=1e-6)  # and shut on "a dog"
    compose.unload(pipe)
