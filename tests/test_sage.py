"""SAGE (erasekit.attacks.sage): its differentiable generator is the pipeline's own, the residual connection and the
truncated backward do what they say, the searched prompt and latent replay to the judged image, the surrogate is
chosen by what the judge offers, bad configs are refused — and, judged, it brings circle back on tinyworld."""

import numpy as np
import pytest
import torch

from erasekit.attacks import ATTACKS, config, run, sage
from erasekit.core import sd
from erasekit.errors import ConfigError
from erasekit.judges import FunctionJudge

STEPS = 2


@pytest.fixture(scope="module", params=["sd1", "sd3"])
def pipe(request):
    """SD 1.x's architecture, and SD3's (MMDiT transformer, flow-matching Euler sampler, two CLIP encoders)."""
    from erasekit.testing import tiny_pipeline

    return tiny_pipeline(request.param)


def brightness_judge(threshold: float) -> FunctionJudge:
    return FunctionJudge(lambda ims: [np.asarray(im).mean() / 255 for im in ims], concept="cat", threshold=threshold)


class DifferentiableBrightness:
    """A judge with ``log_prob``: brightness as the concept's probability (differentiable in the images)."""

    name, version, threshold, concept = "bright", "1", 2.0, "cat"

    def __call__(self, images):
        return [float(np.asarray(im).mean() / 255) for im in images]

    def log_prob(self, images):
        return ((images.mean(dim=(1, 2, 3)) + 1) / 2).clamp_min(1e-6).log()


def test_registered_with_presets():
    assert ATTACKS["sage"] is sage and {"paper", "tinyworld", "prompt", "latent"} <= set(sage.PRESETS)
    assert config("sage", "tinyworld-latent").space == "latent"


@pytest.mark.parametrize("options, message", [
    (dict(space="text"), "space must be one of"),
    (dict(surrogate="clip"), "surrogate must be one of"),
    (dict(insertion="add"), "insertion must be one of"),
    (dict(insertion="sideways"), "insertion must be one of"),
    (dict(k=0), "needs k >= 1"),
    (dict(iterations=0), "iterations must be at least 1"),
    (dict(eval_every=0), "eval_every must be at least 1"),
    (dict(lr_latent=0.0), "lr_latent must be positive"),
    (dict(residual=-1.0), "residual must be >= 0"),
    (dict(backprop_steps=0), "backprop_steps must be at least 1"),
])
def test_bad_configs_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        config("sage", **options)


def test_latent_search_needs_no_tokens():
    assert config("sage", space="latent", k=0).k == 0


def test_sampler_is_the_pipeline_and_its_initial_latent_is_the_seeds(pipe):
    prompt = "a red cat"
    z = sage.initial_latent(pipe, 3)
    reference = np.asarray(sd.generate_prompt(pipe, prompt, 3, STEPS, 7.5)).astype(int)
    assert np.array_equal(np.asarray(sage.generate(pipe, prompt, z, STEPS, 7.5)).astype(int), reference)
    with torch.no_grad():
        x = sage.decode(pipe, sage.sample(pipe, sd.encode(pipe, prompt), z, STEPS, 7.5))
    ours = np.asarray(pipe.image_processor.postprocess(x, output_type="pil")[0]).astype(int)
    assert np.abs(ours - reference).max() <= 1


def test_residual_connection_adds_rho_times_identity_and_truncation_cuts_the_chain(pipe):
    cond = sd.encode(pipe, "a cat")

    def grad(**options):
        z = sage.initial_latent(pipe, 0).requires_grad_(True)
        sage.sample(pipe, cond, z, STEPS, 7.5, **options).sum().backward()
        return z.grad

    plain, with_residual = grad(), grad(residual=0.5)
    assert torch.allclose(with_residual - plain, torch.full_like(plain, 0.5), atol=1e-5)
    truncated = grad(backprop_steps=1)  # the first of the two steps runs without a graph: no path from z
    assert truncated is None or not truncated.any()
    assert torch.allclose(grad(backprop_steps=1, residual=1.0), torch.ones_like(plain))
    assert torch.allclose(grad(checkpoint=True), plain, atol=1e-6)


def test_adversarial_tokens_are_words_that_tokenize_back_to_themselves(pipe):
    ids = sage.word_token_ids(pipe).tolist()
    assert ids and set(ids) <= set(sd.allowed_token_ids(pipe).tolist())
    words = [sd.decode(pipe.tokenizer, [i]) for i in ids]
    assert pipe.tokenizer(" ".join(words), add_special_tokens=False).input_ids == ids


@pytest.mark.parametrize("space", ["both", "prompt", "latent"])
def test_search_is_deterministic_and_its_result_replays(pipe, space):
    cfg = config("sage", space=space, iterations=3, eval_every=2, num_inference_steps=STEPS,
                 gradient_checkpointing=False)
    a = run("sage", pipe, "a red cat", brightness_judge(2.0), config=cfg, seed=1)  # never fires: whole budget
    b = run("sage", pipe, "a red cat", brightness_judge(2.0), config=cfg, seed=1)
    assert not a.success and a.steps == 3 and a.info["queries"] == 2 and a.info["surrogate"] == "target"
    assert (a.adv_prompt, a.score, a.info["adv_token_ids"]) == (b.adv_prompt, b.score, b.info["adv_token_ids"])
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (space == "latent") == (a.adv_prompt == "a red cat")
    if space == "prompt":
        assert "latent" not in a.info
    else:  # the latent moved, stayed on the seed's sphere, and was recorded
        z, z_seed = sage.recorded_latent(a.info), sage.initial_latent(pipe, 1)
        assert a.info["latent"]["relative_change"] > 0 and torch.allclose(z.norm(), z_seed.norm(), rtol=1e-4)
    assert np.array_equal(np.asarray(sage.replay(pipe, a, cfg)), np.asarray(a.image))


def test_surrogate_follows_what_the_judge_offers(pipe):
    cfg = config("sage", iterations=2, eval_every=2, num_inference_steps=STEPS, gradient_checkpointing=False)
    result = run("sage", pipe, "a red cat", DifferentiableBrightness(), config=cfg, seed=0)
    assert result.info["surrogate"] == "judge"
    with pytest.raises(ConfigError, match="log_prob"):
        run("sage", pipe, "a red cat", brightness_judge(2.0), config=config("sage", surrogate="judge"))


def test_stops_at_the_first_success(pipe):
    cfg = config("sage", iterations=5, eval_every=5, num_inference_steps=STEPS, gradient_checkpointing=False)
    result = run("sage", pipe, "a red cat", brightness_judge(-1.0), config=cfg, seed=0)  # always fires
    assert result.success and result.steps == 1 and result.info["queries"] == 1


def test_both_searches_run_with_two_text_encoders():
    """SDXL (and SD3, above): each adversarial token keeps one embedding per encoder and is projected onto one
    vocabulary token; SDXL's pooled embedding goes through the checkpointed UNet as an input."""
    from erasekit.testing import tiny_pipeline

    xl = tiny_pipeline("sdxl")
    for space in ("both", "latent"):
        cfg = config("sage", space=space, iterations=2, eval_every=2, num_inference_steps=1)
        result = run("sage", xl, "a cat", brightness_judge(2.0), config=cfg, seed=0)
        assert result.steps == 2 and result.info["latent"]["relative_change"] > 0
        assert len(result.info["adv_token_ids"]) == (1 if space == "both" else 0)


def test_sd15_shapes():
    """SD 1.5's UNet (its exact configuration, random weights; an 8×8 latent to keep it short) and a text encoder of
    its width: two steps of both searches run through the real modules' shapes."""
    from erasekit.testing import sd15_shapes_pipeline, sd15_unet

    torch.manual_seed(0)
    unet = sd15_unet()
    unet.register_to_config(sample_size=8)  # the default size only: every weight keeps SD 1.5's shape
    pipe = sd15_shapes_pipeline(unet)
    cfg = config("sage", iterations=2, eval_every=2, num_inference_steps=1, gradient_checkpointing=False)
    result = run("sage", pipe, "a cat", brightness_judge(2.0), config=cfg, seed=0)
    assert result.steps == 2 and result.info["latent"]["relative_change"] > 0
    assert len(result.info["adv_token_ids"]) == 1


def test_the_audit_knows_its_cost():
    from erasekit.audit.runner import _TINYWORLD_IMAGES_PER_ATTACK

    assert set(_TINYWORLD_IMAGES_PER_ATTACK) == set(ATTACKS)


# ------------------------------------------------------------------------------------------ tinyworld (judged)

def _tinyworld_ready() -> bool:
    from erasekit import tinyworld

    return (tinyworld.path() / "model_index.json").is_file() and (tinyworld.path() / "judge").is_dir()


#: prompts whose circle UCE erases for seed 0 (the judge sees none before the attack)
ERASED_PROMPTS = ("a outlined yellow circle on a black background", "a dotted purple circle on a black background")


@pytest.mark.skipif(not _tinyworld_ready(), reason="tinyworld weights not trained yet")
def test_tinyworld_preset_brings_circle_back_after_uce(tinyworld_pipe):
    """UCE erases circle from these prompts; SAGE's tinyworld preset finds a prompt and latent that bring it back,
    and its judged image is the one the recorded prompt and latent make."""
    import erasekit
    from erasekit import compose
    from erasekit.judges.tinyworld import TinyworldConceptJudge

    judge = TinyworldConceptJudge("circle", pipe=tinyworld_pipe)
    names = compose.load(tinyworld_pipe, erasekit.erase(tinyworld_pipe, "uce", ["circle"]))
    try:
        before = judge([sd.generate_prompt(tinyworld_pipe, p, 0) for p in ERASED_PROMPTS])
        assert max(before) < 0.5, before
        cfg = config("sage", "tinyworld")
        results = [run("sage", tinyworld_pipe, p, judge, config=cfg, seed=0) for p in ERASED_PROMPTS]
        assert all(r.success for r in results), [(r.adv_prompt, round(r.score, 3)) for r in results]
        assert judge([sage.replay(tinyworld_pipe, results[0], cfg)])[0] > 0.5
    finally:
        compose.unload(tinyworld_pipe, names)


@pytest.mark.skipif(not _tinyworld_ready(), reason="tinyworld weights not trained yet")
def test_the_audit_runs_it_by_name(tinyworld_pipe, tmp_path):
    """``audit(..., attacks=["sage"])`` on the UCE circle erasure: the attack line is written, JSON-clean, with its
    searched latent, and counted in the summary's ASR."""
    import json

    import erasekit
    from erasekit import compose
    from erasekit.audit import audit

    names = compose.load(tinyworld_pipe, erasekit.erase(tinyworld_pipe, "uce", ["circle"]))
    try:
        report = audit(tinyworld_pipe, "circle", attacks=["sage"], prompts=[ERASED_PROMPTS[0]], paraphrases=[],
                       preserve_prompts=[], out_dir=tmp_path / "audit", grids=False, progress=False)
    finally:
        compose.unload(tinyworld_pipe, names)
    lines = [json.loads(line) for line in (tmp_path / "audit" / "results.jsonl").read_text().splitlines()]
    (attacked,) = [r for r in lines if r["kind"] == "attack"]
    assert attacked["attack"] == "sage" and attacked["success"] and "values" in attacked["info"]["latent"]
    assert report.summary["attacks"]["sage"]["asr"] == 1.0
