"""TRCE (``erasekit.methods.trce``): stage 1's closed-form [EoT] remap, stage 2's contrastive early-step training,
the one adapter holding both, the tinyworld data, and one judged tinyworld erasure."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from erasekit.core import lora
from erasekit.errors import ConfigError
from erasekit.methods import METHODS, text, trainer, trce, uce
from erasekit.methods.presets import for_model, on_tinyworld
from erasekit.testing import tiny_pipeline

F64 = torch.float64
#: stage 2 in a few steps on the tiny pipelines
FAST = dict(iterations=2, num_inference_steps=4, max_early_step=1, regularization_batch_size=1, progress=False)
STAGE1 = ("cross_attention",)
STAGE2 = ("early_steps",)


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


def _untouched(pipe, before) -> bool:
    same = all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    no_hooks = not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.unet.modules())
    return same and no_hooks


def _weight(pipe, key):
    return pipe.unet.get_submodule(key.split(".", 1)[1]).weight.detach().to(F64)


# ------------------------------------------------------------------------------------------------ config, data
def test_paper_defaults_and_bad_input():
    config = trce.TrceConfig(concepts=("nudity",))
    assert config.stages == trce.STAGES and config.key_tokens == "eot" and config.targets == uce.DEFAULT_TARGETS
    assert (config.target_guidance, config.margin, config.beta, config.max_early_step, config.num_inference_steps,
            config.regularization_weight, config.regularization_batch_size, config.preserve_scale) == \
        (15.0, 0.01, 1.0, 25, 50, 100.0, 4, 0.01)
    for bad, match in ((dict(stages=("early",)), "stages"), (dict(stages=()), "stages"),
                       (dict(stages=STAGE1 * 2), "stages"), (dict(safe=("a", "b")), "safe concept"),
                       (dict(max_early_step=50), "max_early_step"), (dict(margin=-1.0), "margin"),
                       (dict(beta=0.0), "beta"), (dict(lam=-0.1), "lam"), (dict(key_tokens="all"), "key_tokens"),
                       (dict(train_modules=()), "train_modules"), (dict(templates=("no slot",)), "templates"),
                       (dict(preserve_weight=-1.0), "preserve_weight")):
        with pytest.raises(ConfigError, match=match):
            trce.TrceConfig(concepts=("nudity",), **bad)


def test_prompt_pairs_put_every_term_and_its_safe_concept_in_the_same_template():
    config = trce.TrceConfig(concepts=("nudity",), implied=("naked",), safe=("a person wearing clothes",),
                             templates=("a photo of {}", "{} in a painting"))
    assert trce.prompt_pairs(config) == [
        ("a photo of nudity", "a photo of a person wearing clothes"),
        ("nudity in a painting", "a person wearing clothes in a painting"),
        ("a photo of naked", "a photo of a person wearing clothes"),
        ("naked in a painting", "a person wearing clothes in a painting")]
    assert len(trce.prompt_pairs(trce.TrceConfig(concepts=("nudity",)))) == len(trce.PAPER_TEMPLATES) == 15


def test_tinyworld_data_holds_the_last_synonym_out(sd1, tinyworld_pipe):
    spec = METHODS["trce"]
    config = for_model(spec.make_config(("circle",), tinyworld=True), on_tinyworld(tinyworld_pipe))
    assert config.implied == ("disc",)  # "round shape" is held out of training
    assert config.safe == ("square",) and "square" in config.preserve and len(config.templates) == 64
    pairs = trce.prompt_pairs(config)
    assert all("round shape" not in p for p, _ in pairs) and all("disc" not in t for t in config.templates)
    two = for_model(spec.make_config(("circle", "square"), tinyworld=True), on_tinyworld(tinyworld_pipe))
    assert two.safe == ("triangle", "triangle") and two.implied == ("disc", "box")  # never an erased concept
    plain = for_model(spec.make_config(("circle",), implied_synonyms=True, preserve_related=True), on_tinyworld(sd1))
    assert plain.implied == () and plain.safe == () and plain.templates == ()  # the data is tinyworld's


# ------------------------------------------------------------------------------------------------ stage 1
def test_stage1_keys_are_the_first_eot_token(sd1):
    config = trce.TrceConfig(concepts=("cat",), safe=("dog",), templates=("a photo of {}", "{}"), stages=STAGE1)
    pairs = trce.prompt_pairs(config)
    keys, w_erase, w_preserve = trce.stage1_keys(sd1, config, pairs)
    full = text.encode_prompts(sd1, [e for e, _ in pairs] + [s for _, s in pairs])
    eot = text.tokenize(sd1, [e for e, _ in pairs] + [s for _, s in pairs]).attention_mask.sum(1) - 1
    expected = full[torch.arange(len(full)), eot]
    torch.testing.assert_close(torch.cat([keys.erase, keys.guide]), expected, rtol=1e-5, atol=1e-5)
    assert w_erase.tolist() == [0.5, 0.5] and len(keys.preserve) == len(w_preserve) == 0


@pytest.mark.parametrize("key_tokens", ["eot", "aligned"])
def test_stage1_solves_the_normal_equations(sd1, key_tokens):
    """∂/∂W of stage 1's objective is zero at W': Σ w_e (W'c_e − W c_s) c_eᵀ + Σ w_p (W' − W) c_p c_pᵀ + λ(W' − W)."""
    config = trce.TrceConfig(concepts=("cat",), implied=("kitten",), safe=("dog",), preserve=("a red car",),
                             templates=("a photo of {}", "{} on grass"), key_tokens=key_tokens, stages=STAGE1)
    adapter = trce.erase(sd1, config)
    assert {k.rsplit(".", 1)[1] for k in adapter.deltas} == {"to_k", "to_v"}
    keys, w_e, w_p = trce.stage1_keys(sd1, config, trce.prompt_pairs(config))
    c_e, c_s, c_p = (k.to(F64) for k in (keys.erase, keys.guide, keys.preserve))
    for key, delta in adapter.deltas.items():
        W = _weight(sd1, key)
        D = delta.dense().to(F64)
        grad = ((c_e @ (W + D).T - c_s @ W.T) * w_e[:, None]).T @ c_e + ((c_p @ D.T) * w_p[:, None]).T @ c_p \
            + config.lam * D
        scale = ((c_e @ W.T - c_s @ W.T) * w_e[:, None]).T.abs() @ c_e.abs()
        assert float(grad.abs().max()) < 1e-4 * float(scale.max())


def test_stage1_maps_concept_keys_to_safe_values_and_holds_preserved_keys(sd1):
    templates = ("a photo of {}", "{} on grass", "a painting of {}")
    free = trce.TrceConfig(concepts=("cat",), safe=("dog",), templates=templates, lam=1e-6, stages=STAGE1)
    pairs = trce.prompt_pairs(free)
    keys, _, _ = trce.stage1_keys(sd1, free, pairs)
    adapter = trce.erase(sd1, free)
    for key, delta in adapter.deltas.items():  # 3 independent keys, nothing else asked: mapped exactly
        W = _weight(sd1, key)
        mapped = keys.erase.to(F64) @ (W + delta.dense().to(F64)).T
        assert float((mapped - keys.guide.to(F64) @ W.T).norm() / (keys.guide.to(F64) @ W.T).norm()) < 1e-4
    # preserved prompts (every token; here they span the 24-wide context): their values move 5× less than
    # without preservation, the concept's keys still move
    held = dataclasses.replace(free, preserve=("a red car", "a blue bird"), preserve_scale=1.0, lam=0.1)
    keys, _, _ = trce.stage1_keys(sd1, held, pairs)
    unheld = trce.erase(sd1, dataclasses.replace(held, preserve=()))
    for key, delta in trce.erase(sd1, held).deltas.items():
        W = _weight(sd1, key)
        moved = lambda c, d: float((c.to(F64) @ d.dense().to(F64).T).norm() / (c.to(F64) @ W.T).norm())  # noqa: E731
        assert moved(keys.preserve, delta) < 0.2 * moved(keys.preserve, unheld.deltas[key])
        assert moved(keys.erase, delta) > 0.1


def test_stage1_on_sd15_shapes():
    """SD 1.5's UNet (only attn2 k/v random, the rest zero, as in test_uce) with a 768-wide text encoder of one
    layer: stage 1 reads nothing of the text encoder but its output width."""
    from erasekit.testing import sd15_shapes_pipeline, sd15_unet

    with torch.device("meta"):
        unet = sd15_unet()
    unet = unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn2.to_k." in name or ".attn2.to_v." in name:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            else:
                p.zero_()
    pipe = sd15_shapes_pipeline(unet)
    config = trce.TrceConfig(concepts=("cat",), implied=("kitten",), safe=("dog",), preserve=("a red car",),
                             stages=STAGE1)
    adapter = trce.erase(pipe, config)
    assert len(adapter.deltas) == 32 and adapter.info["cross_attention"]["erase_keys"] == 30
    keys, w_e, w_p = trce.stage1_keys(pipe, config, trce.prompt_pairs(config))
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    W, D = _weight(pipe, key), adapter.deltas[key].dense().to(F64)
    assert D.shape == (1280, 768)
    c_e, c_s, c_p = (k.to(F64) for k in (keys.erase, keys.guide, keys.preserve))
    grad = ((c_e @ (W + D).T - c_s @ W.T) * w_e[:, None]).T @ c_e + ((c_p @ D.T) * w_p[:, None]).T @ c_p \
        + config.lam * D
    assert float(grad.abs().max()) < 1e-4 * float((((c_e - c_s) @ W.T) * w_e[:, None]).T.abs().max() * c_e.abs().max())


# ------------------------------------------------------------------------------------------------ stage 2
def test_stage2_loss_decreases(sd1):
    config = trce.TrceConfig(concepts=("dog",), safe=("cat",), templates=("a photo of {}",), stages=STAGE2,
                             iterations=8, lr=2e-2, num_inference_steps=4, max_early_step=1, batch_size=2,
                             regularization_weight=1.0, regularization_batch_size=1, progress=False)
    adapter = trce.erase(sd1, config)
    loss_for = trce.objective(sd1, config, trce.prompt_pairs(config), [])

    def held_out_loss(weight):  # the loss on fixed held-out draws, with the trained deltas scaled by weight
        with torch.no_grad(), lora.applied(sd1.unet, adapter.deltas, weight=weight) as deltas:
            fn = loss_for(deltas)
            return sum(fn(i, trainer.step_generator(1234, i)).item() for i in range(6))

    assert held_out_loss(0.0) > 0.01 and held_out_loss(1.0) < 0.7 * held_out_loss(0.0)


def test_preserve_weight_adds_the_preserved_prompts_term(sd1):
    """Not in the paper (the tinyworld preset's): preserve prompts' predictions held to the stage-1 model's on the
    regularisation's latents. Zero for the model stage 2 starts from; positive once its deltas are non-zero."""
    config = trce.TrceConfig(concepts=("dog",), safe=("cat",), templates=("a photo of {}",), stages=STAGE2,
                             preserve=("a red car",), **{**FAST, "iterations": 3}, lr=5e-2, rank=2)
    adapter = trce.erase(sd1, config)
    pairs = trce.prompt_pairs(config)

    def losses(scale):  # the loss with preserve_weight 0, 2, 4 on the same draws
        with torch.no_grad(), lora.applied(sd1.unet, adapter.deltas, weight=scale) as deltas:
            return [sum(float(trce.objective(sd1, dataclasses.replace(config, preserve_weight=w), pairs, [])(deltas)(
                i, trainer.step_generator(7, i))) for i in range(3)) for w in (0.0, 2.0, 4.0)]

    plain, two, four = losses(0.0)
    assert two == pytest.approx(plain, rel=1e-6) and four == pytest.approx(plain, rel=1e-6)
    plain, two, four = losses(1.0)
    assert two > plain and four - plain == pytest.approx(2 * (two - plain), rel=0.05)


def test_stage2_samples_only_early_timesteps(sd1):
    """Without the regularisation every UNet call (rollout, teacher, student) is at t ≥ the max_early_step-th
    timestep; the regularisation's unconditional trajectories reach the late ones."""
    seen = []
    handle = sd1.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1].flatten()[0])))
    try:
        config = trce.TrceConfig(concepts=("cat",), safe=("dog",), stages=STAGE2, **{**FAST, "iterations": 12},
                                 regularization_weight=0.0)
        trce.erase(sd1, config)
        early = set(seen)
        seen.clear()
        trce.erase(sd1, dataclasses.replace(config, regularization_weight=1.0))
    finally:
        handle.remove()
    timesteps = trainer.ddim_scheduler(sd1, 4).timesteps.tolist()
    assert early and min(early) >= timesteps[1] and early <= set(timesteps[:2])
    assert min(seen) < timesteps[1]


def test_one_adapter_holds_the_stages_asked_for(sd1):
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    kinds = {}
    for stages, modules in ((STAGE1, ()), (STAGE2, ()), (trce.STAGES, ()), (trce.STAGES, ("attn2.to_q",))):
        options = dict(train_modules=modules) if modules else {}
        adapter = trce.erase(sd1, trce.TrceConfig(concepts=("cat",), safe=("dog",), stages=stages, rank=2,
                                                  **FAST, **options))
        assert adapter.method == "trce" and adapter.info["stages"] == list(stages)
        kinds[stages, modules] = {k.split(".transformer_blocks.0.", 1)[1] for k in adapter.deltas}
    assert kinds[STAGE1, ()] == {"attn2.to_k", "attn2.to_v"}
    assert kinds[STAGE2, ()] == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q"}
    assert kinds[trce.STAGES, ()] == kinds[STAGE1, ()] | kinds[STAGE2, ()]
    assert kinds[trce.STAGES, ("attn2.to_q",)] == {"attn2.to_k", "attn2.to_v", "attn2.to_q"}
    with pytest.raises(ConfigError, match="stage 2 cannot train a layer stage 1 edits"):
        trce.erase(sd1, trce.TrceConfig(concepts=("cat",), train_modules=("attn2.to_k",), **FAST))
    with pytest.raises(ConfigError, match="match no Linear"):
        trce.erase(sd1, trce.TrceConfig(concepts=("cat",), train_modules=("attn3",), stages=STAGE2, **FAST))
    assert _untouched(sd1, before)


def test_stage2_trains_on_top_of_stage1_against_the_original():
    """One UNet plays three models: the rollouts and the targets are the original's, the regularisation's target is
    the stage-1 model's, the student has both stages. Each call of the second step is replayed on a twin."""
    pipe, twin = tiny_pipeline("sd1"), tiny_pipeline("sd1")  # same seed: the same weights
    calls = []

    def spy(module, args, kwargs, output):
        kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
        calls.append((torch.is_grad_enabled(), args, kwargs, output[0].detach().clone()))

    handle = pipe.unet.register_forward_hook(spy, with_kwargs=True)
    try:
        adapter = trce.erase(pipe, trce.TrceConfig(concepts=("cat",), safe=("dog",), rank=2, lr=1e-1, **FAST))
    finally:
        handle.remove()
    graded = [i for i, c in enumerate(calls) if c[0]]
    assert len(graded) == 4  # per step: the contrastive student and the regularised one
    stage1 = {k: d for k, d in adapter.deltas.items() if k.endswith(("attn2.to_k", "attn2.to_v"))}
    original, first_stage = [], []
    with torch.no_grad(), trce.applied(twin.unet, stage1) as hooks:
        for grad, args, kwargs, output in calls[graded[1] + 1:]:  # the second step
            with trce.disabled(*hooks):
                original.append(torch.equal(twin.unet(*args, **kwargs, return_dict=False)[0], output))
            first_stage.append(torch.allclose(twin.unet(*args, **kwargs, return_dict=False)[0], output, atol=1e-6))
    grads = [c[0] for c in calls[graded[1] + 1:]]
    teacher = [(o, f) for g, o, f in zip(grads, original, first_stage) if not g]
    assert sum(o for o, _ in teacher) == len(teacher) - 1 and sum(f and not o for o, f in teacher) == 1
    assert not any(o or f for g, o, f in zip(grads, original, first_stage) if g)  # the student: stage 2 too


def test_sdxl_shapes():
    pipe = tiny_pipeline("sdxl")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    adapter = trce.erase(pipe, trce.TrceConfig(concepts=("cat",), safe=("dog",), rank=2, **FAST))
    assert {"attn2.to_v", "attn1.to_q"} <= {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in adapter.deltas}
    assert all(torch.isfinite(d.dense()).all() for d in adapter.deltas.values())
    assert set(adapter.fingerprint) == {"unet", "text_encoder", "text_encoder_2"}
    assert _untouched(pipe, before)


# ------------------------------------------------------------------------------------------------ tinyworld
def test_tinyworld_circle_is_gone_and_other_shapes_stay(tinyworld_pipe, judge):
    """Judged on tinyworld (each stage alone and both on 4 seeds × the grid: benchmarks/trce_tinyworld.py): circle is
    gone under its name, its trained synonym ("disc") and its held-out one ("round shape"); the other shapes are
    still drawn. Stage 2 runs 10 of the preset's 100 steps, and 8 of the grid's 24 circle scenes are judged, to keep
    the test short."""
    from erasekit import erase
    from erasekit.testing import judged_circle_shapes

    adapter = erase(tinyworld_pipe, "trce", ["circle"], iterations=10, progress=False)
    named, others = judged_circle_shapes(tinyworld_pipe, judge, adapter)
    for word, labels in named.items():
        assert labels.count("circle") <= 1, (word, labels)
    assert sum(label == shape for label, shape in others) >= len(others) - 1, others
