"""Text-encoder methods: AdvUnlearn and few-shot erasing (``erasekit.methods.advunlearn`` / ``fewshot``)."""

from __future__ import annotations

import copy

import pytest
import torch

from erasekit import compose
from erasekit.core import sd
from erasekit.attacks.unlearndiffatk import soft_prompt_attack
from erasekit.errors import ConfigError
from erasekit.methods import METHODS, advunlearn, fewshot
from erasekit.methods.presets import for_model, on_tinyworld
from erasekit.methods import te as _te
from erasekit.testing import tiny_pipeline

# a few steps of everything: warm-up, attack rounds (with warm start), retain loss
SHORT = dict(iterations=4, warmup=1, attack_steps=2, attack_every=1, num_inference_steps=4, batch_size=1,
             retain_batch=1, progress=False)


def _state(pipe):
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}


def _untouched(pipe, before) -> bool:
    for c, state in before.items():
        module = getattr(pipe, c)
        if not all(torch.equal(state[k], v) for k, v in module.state_dict().items()):
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
            return False
    return True


def _embeds(pipe, prompt: str) -> torch.Tensor:
    return sd.encode(pipe, [prompt]).embeds


@pytest.fixture(scope="module")
def adv(tinyworld_pipe):
    torch.set_num_threads(1)
    before = _state(tinyworld_pipe)
    grads = {n: p.requires_grad for n, p in tinyworld_pipe.text_encoder.named_parameters()}
    adapter = METHODS["advunlearn"].erase(tinyworld_pipe, advunlearn.AdvUnlearnConfig(concepts=("circle",), **SHORT))
    assert _untouched(tinyworld_pipe, before)
    assert grads == {n: p.requires_grad for n, p in tinyworld_pipe.text_encoder.named_parameters()}
    return adapter


def test_advunlearn_touches_only_the_text_encoder(adv, tinyworld_pipe):
    assert adv.method == "advunlearn" and adv.components == ("text_encoder",)
    assert set(adv.fingerprint) == {"text_encoder"}  # no UNet binding: plug-and-play across UNets
    layers = tinyworld_pipe.text_encoder.config.num_hidden_layers
    expected = {f"text_encoder.encoder.layers.{i}.{m}" for i in range(layers)
                for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                          "mlp.fc1", "mlp.fc2")}
    assert set(adv.deltas) == expected
    assert all(d.delta is not None and torch.isfinite(d.delta).all() for d in adv.deltas.values())
    assert any(d.delta.abs().sum() > 0 for d in adv.deltas.values())
    assert adv.info["training"]["steps"] == SHORT["iterations"]


def test_adapter_changes_the_concepts_encoding_and_unloads_bitwise(adv, tinyworld_pipe, tmp_path):
    path = adv.save(tmp_path / "circle.advunlearn.safetensors")
    base = _embeds(tinyworld_pipe, "a red circle")
    name = compose.load(tinyworld_pipe, path)
    try:
        erased = _embeds(tinyworld_pipe, "a red circle")
    finally:
        compose.unload(tinyworld_pipe, name)
    assert (erased - base).abs().max() > 1e-4
    assert torch.equal(_embeds(tinyworld_pipe, "a red circle"), base)


def test_adapter_transfers_to_another_unet_sharing_the_encoder(adv, tinyworld_pipe, recwarn):
    """A second pipeline (another UNet, the same text encoder) takes the adapter without a mismatch warning."""
    from diffusers import StableDiffusionPipeline

    unet = copy.deepcopy(tinyworld_pipe.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    other = StableDiffusionPipeline(**{**tinyworld_pipe.components, "unet": unet})
    base = _embeds(other, "a circle")
    name = compose.load(other, adv, strict=True)
    try:
        assert (_embeds(other, "a circle") - base).abs().max() > 1e-4
    finally:
        compose.unload(other, name)
    assert not [w for w in recwarn if "BaseModelMismatch" in type(w.message).__name__]


def test_advunlearn_loss_decreases(tinyworld_pipe):
    """The defender's objective, evaluated on fixed draws, is lower with the trained deltas than without."""
    config = for_model(advunlearn.AdvUnlearnConfig(concepts=("circle",), iterations=12, warmup=12, retain_weight=0.0,
                                                   num_inference_steps=4, batch_size=2, lr=3e-3, progress=False),
                       on_tinyworld(tinyworld_pipe))
    adapter = advunlearn.erase(tinyworld_pipe, config)
    names = _te.select(tinyworld_pipe, advunlearn.module_selection("all", ()))
    with _te.attached(tinyworld_pipe, names, 0, 0) as deltas:
        loss_fn = advunlearn.objective(tinyworld_pipe, config)(deltas)
        draws = [torch.Generator().manual_seed(s) for s in range(4)]

        def mean_loss():
            with torch.no_grad():
                return sum(float(loss_fn(0, copy.deepcopy(g))) for g in draws) / len(draws)

        before = mean_loss()
        deltas.parts["text_encoder"].load(adapter.deltas, "text_encoder")
        after = mean_loss()
    assert after < 0.8 * before, (before, after)
    assert adapter.info["training"]["loss_last"] < adapter.info["training"]["loss_first"]


def test_inner_attack_is_the_audits_and_fast_at_runs(tinyworld_pipe):
    assert advunlearn.soft_prompt_attack is soft_prompt_attack  # one implementation, shared with the audit
    config = advunlearn.AdvUnlearnConfig(concepts=("circle",), attack_method="fast_at", attack_init="random",
                                         **{**SHORT, "iterations": 2})
    sp = config.soft_prompt_config(tinyworld_pipe)
    assert (sp.space, sp.method, sp.k, sp.weight_decay) == ("word_embedding", "fast_at", 3, 0.0)
    adapter = METHODS["advunlearn-fast"].erase(tinyworld_pipe, METHODS["advunlearn-fast"].make_config(
        "circle", **{k: v for k, v in config.__dict__.items() if k not in ("concepts", "attack_method")}))
    assert adapter.config["attack_method"] == "fast_at"


def test_attack_state_is_checkpointed_and_resume_matches(tinyworld_pipe, tmp_path):
    config = advunlearn.AdvUnlearnConfig(concepts=("circle",), **{**SHORT, "iterations": 3},
                                         checkpoint_dir=str(tmp_path), checkpoint_every=2)
    full = METHODS["advunlearn"].erase(tinyworld_pipe, config)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        delta = f.get_tensor("param.attack.delta")
    assert delta.shape == (config.attack_tokens, tinyworld_pipe.text_encoder.config.hidden_size)
    assert delta.abs().sum() > 0
    # continuing the finished run is a no-op that returns the same deltas
    again = METHODS["advunlearn"].erase(tinyworld_pipe, advunlearn.AdvUnlearnConfig(**{**config.__dict__, "resume": True}))
    for key, d in full.deltas.items():
        torch.testing.assert_close(again.deltas[key].delta, d.delta, rtol=0, atol=0)


def test_retain_prompts():
    prompts = advunlearn.retain_prompts(advunlearn.AdvUnlearnConfig(concepts=("dog",)))
    assert "a photo of a cat" in prompts and not any("dog" in p for p in prompts) and len(prompts) == 78


def test_tinyworld_retain_prompts(tinyworld_pipe):
    prompts = advunlearn.retain_prompts(for_model(advunlearn.AdvUnlearnConfig(concepts=("circle",)), on_tinyworld(tinyworld_pipe)))
    assert prompts and not any("circle" in p for p in prompts) and any("square" in p for p in prompts)


# ---------------------------------------------------------------------------------------------- few-shot
def test_fewshot_on_tinyworld(tinyworld_pipe):
    before = _state(tinyworld_pipe)
    config = fewshot.FewShotConfig(concepts=("circle",), num_images=4, epochs=2, batch_size=2, progress=False)
    adapter = METHODS["fewshot"].erase(tinyworld_pipe, config)
    assert _untouched(tinyworld_pipe, before)
    last = tinyworld_pipe.text_encoder.config.num_hidden_layers - 1
    assert adapter.method == "fewshot" and adapter.components == ("text_encoder",)
    for key in adapter.deltas:
        assert ".mlp.fc" in key or f"layers.{last}.self_attn." in key, key
    assert any(f"layers.{last}.self_attn.q_proj" in k for k in adapter.deltas)
    assert adapter.info["training"]["steps"] == 4
    assert adapter.info["training"]["loss_last"] < adapter.info["training"]["loss_first"]  # −MSE: ascent


def test_fewshot_from_an_image_folder(tinyworld_pipe, tmp_path):
    from PIL import Image

    from erasekit.tinyworld import Scene, render

    for i, colour in enumerate(("red", "blue")):
        Image.fromarray(render(Scene("circle", colour, "solid", "black"))).save(tmp_path / f"{i}.png")
    images, captions = fewshot.folder_examples(fewshot.FewShotConfig(concepts=("circle",), images=str(tmp_path)))
    assert len(images) == 2 and all("circle" in c for c in captions)
    adapter = fewshot.erase(tinyworld_pipe, fewshot.FewShotConfig(concepts=("circle",), images=str(tmp_path),
                                                                  epochs=1, progress=False))
    assert adapter.deltas
    with pytest.raises(ConfigError):
        fewshot.erase(tinyworld_pipe, fewshot.FewShotConfig(concepts=("circle",), images=str(tmp_path / "none")))


def test_sdxl_both_text_encoders():
    pipe = tiny_pipeline("sdxl")
    few = fewshot.erase(pipe, fewshot.FewShotConfig(concepts=("cat",), zero_shot=True, num_images=2, epochs=1,
                                                    progress=False))
    adv = advunlearn.erase(pipe, advunlearn.AdvUnlearnConfig(concepts=("cat",), **{**SHORT, "iterations": 2}))
    for adapter in (few, adv):
        assert adapter.components == ("text_encoder", "text_encoder_2")
        name = compose.load(pipe, adapter)
        compose.unload(pipe, name)
    assert advunlearn.AdvUnlearnConfig(concepts=("cat",)).soft_prompt_config(pipe).space == "one_hot"


def test_config_validation_and_registry():
    with pytest.raises(ConfigError):
        advunlearn.AdvUnlearnConfig(concepts=())
    with pytest.raises(ConfigError):
        advunlearn.AdvUnlearnConfig(concepts=("cat",), component="mlp")
    with pytest.raises(ConfigError):
        advunlearn.AdvUnlearnConfig(concepts=("cat",), attack_insertion="middle")
    with pytest.raises(ConfigError):
        advunlearn.AdvUnlearnConfig(concepts=("cat",), resume=True)
    with pytest.raises(ConfigError):
        fewshot.FewShotConfig(concepts=("cat",), train_method="ffn")
    assert METHODS["advunlearn"].make_config("cat").attack_method == "pgd"
    assert METHODS["advunlearn-fast"].make_config("cat").attack_method == "fast_at"
    assert METHODS["fewshot"].make_config("cat", epochs=2).epochs == 2
    assert advunlearn.module_selection("ffn", (0,))("encoder.layers.0.mlp.fc1", 0, 3)
    assert not advunlearn.module_selection("ffn", (0,))("encoder.layers.1.mlp.fc1", 1, 3)
    assert not advunlearn.module_selection("attn", ())("encoder.layers.1.mlp.fc1", 1, 3)


def test_replace_with_targets_the_anchors_original_prediction(tinyworld_pipe):
    """With ``replace_with`` the defender's target is ε₀(x_t, anchor in the same template): an anchor that encodes
    exactly as the concept ("Circle": CLIP lower-cases) leaves nothing to learn at zero deltas; another does."""
    common = dict(iterations=1, warmup=1, retain_weight=0.0, num_inference_steps=4, batch_size=1, progress=False)
    names = _te.select(tinyworld_pipe, advunlearn.module_selection("all", ()))

    def loss(replace_with):
        config = advunlearn.AdvUnlearnConfig(concepts=("circle",), replace_with=replace_with, **common)
        with _te.attached(tinyworld_pipe, names, 0, 0) as deltas, torch.no_grad():
            return float(advunlearn.objective(tinyworld_pipe, config)(deltas)(0, torch.Generator().manual_seed(0)))

    assert loss("Circle") < 1e-10
    assert loss("square") > 1e-4 and loss("") > 1e-4
    with pytest.raises(ConfigError, match="replace_with"):
        advunlearn.AdvUnlearnConfig(concepts=("circle",), replace_with="circle")


def test_divergence_guard_covers_the_text_encoder(tinyworld_pipe):
    """The shared loop's guard checks text-encoder deltas after every update (the last one too) and the pipeline
    is left as it was."""
    from erasekit.errors import TrainingDivergedError

    before = _state(tinyworld_pipe)
    config = advunlearn.AdvUnlearnConfig(concepts=("circle",), **{**SHORT, "iterations": 1, "num_inference_steps": 2, "lr": 1e6})
    with pytest.raises(TrainingDivergedError, match=r"step 1 of 1: the delta of module text_encoder\..* times its base"):
        advunlearn.erase(tinyworld_pipe, config)
    assert _untouched(tinyworld_pipe, before)
