"""erasekit bench perf on SD3 (issue #25, "Real-size shapes"): the SD3-medium-shaped pipeline, and each benchmark's
SD3 code path on the tiny random SD3 pipeline; FLUX.1-dev's edit check on a tiny FLUX configuration."""

import copy

import pytest
import torch

from erasekit.testing import tiny_pipeline


@pytest.fixture(scope="module")
def sd3():
    return tiny_pipeline("sd3")


def test_sd3_medium_pipeline_has_the_real_shapes():
    from erasekit.core import sd
    from erasekit.methods import text
    from erasekit.testing import real_shape_pipeline, sd3_inputs

    with torch.device("meta"):
        pipe = real_shape_pipeline("sd3")
    assert sd.is_mmdit(pipe) and pipe.text_encoder_3 is None
    assert 2.0e9 < sum(p.numel() for p in pipe.transformer.parameters()) < 2.1e9  # SD3-medium: 2 B
    assert pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size == 2048
    assert pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim == \
        pipe.transformer.config.pooled_projection_dim == 2048
    assert text.context_dim(pipe) == 4096 and pipe.vae.config.latent_channels == 16
    assert sd.default_size(pipe) == (1024, 1024)
    inputs = sd3_inputs(pipe.transformer, 2, "meta", torch.float32, size=32)
    assert inputs["hidden_states"].shape == (2, 16, 32, 32) and inputs["encoder_hidden_states"].shape == (2, 333, 4096)


def test_closed_form_sd3_times_both_solves_and_checks_the_one_pass_keys(sd3, tmp_path):
    from erasekit.bench.perf import closed_form

    report = closed_form.main(["--model", "sd3", "--repeats", "1", "--two-pass-sample", "0.1",
                               "--out", str(tmp_path / "cf.json")], pipe=sd3)
    results = report["results"]
    assert set(results) == {"uce_1_concept", "uce_100_concepts_500_preserve"}  # the others refuse MMDiT
    many = results["uce_100_concepts_500_preserve"]
    assert many["erase_keys"] == 100 and many["preserve_keys"] == 500 and many["rank"] >= 1
    assert {"encode_prompts_s", "solve_s", "pooled_solve_s"} <= set(many["breakdown"])
    check = many["two_pass_check"]
    assert "61 of the 601 distinct prompts" in check["sample"]
    diff = check["max_abs_diff"]
    assert diff["context_keys"] < 1e-5 * diff["context_key_scale"] and diff["pooled_keys"] < 1e-5 * diff["pooled_key_scale"]
    assert (tmp_path / "cf.json").is_file()


def test_compose_overhead_sd3_loads_static_and_gated_adapters_on_the_transformer(sd3):
    from erasekit import compose
    from erasekit.bench.perf import compose_overhead
    from erasekit.methods.spm import transformer_modules

    rows = compose_overhead.run("sd3", repeats=1, counts=(4,), sd3_size=8, pipe=sd3)
    assert {"plain", "static_4", "fused_4", "gated_4"} <= set(rows) and rows["steps_per_image"] == 28
    assert rows["static_4"]["modules_per_adapter"] == len(compose_overhead.MMDIT_STATIC)
    assert rows["gated_4"]["modules_per_adapter"] == len(transformer_modules(sd3.transformer))
    assert rows["inputs"]["context"] == [333, 32]
    assert not compose.list_erasures(sd3)  # all unloaded
    # the timed hooks do run: a gated adapter for the prompt's concept changes the prediction, disabled it does not
    inputs = compose_overhead.model_inputs(sd3, 8)
    with torch.no_grad():
        plain = sd3.transformer(**inputs).sample
        name = compose.load(sd3, compose_overhead.make_adapter(sd3, "gated", 1, scale=0.3))
        try:
            edited = sd3.transformer(**inputs).sample
            with compose.disabled(sd3):
                again = sd3.transformer(**inputs).sample
        finally:
            compose.unload(sd3, name)
    assert not torch.allclose(edited[1], plain[1]) and torch.equal(again, plain)


def test_train_memory_sd3_step_trains_the_esd_x_modules_on_the_collapsed_context(sd3):
    from erasekit.bench.perf import train_memory
    from erasekit.methods import esd

    ours = train_memory.child("ours", 4, True, "sd3", resolution=64, net=copy.deepcopy(sd3.transformer))
    full = train_memory.child("two_unet", 4, False, "sd3", resolution=64, net=copy.deepcopy(sd3.transformer))
    assert ours["adapted_modules"] == full["adapted_modules"] == len(esd.select(sd3, "esd-x"))
    assert ours["context"] == [78, 32] and ours["context_stands_for_rows"] == 333 and ours["latent"] == [4, 8, 8]
    assert ours["trainable_parameters"] < full["trainable_parameters"]
    assert ours["loss"] == pytest.approx(full["loss"], rel=1e-5)  # zero-initialised deltas: the same first step


def test_flux_shapes_edit_matches_eq7_and_flux_dev_does_not_fit(tmp_path):
    from erasekit.bench.perf import flux_shapes

    tiny = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                axes_dims_rope=(2, 2, 4))
    report = flux_shapes.run(tmp_path / "flux.json", config=tiny)
    for case in report["cases"].values():
        for part in ("context_embedder", "pooled_text_embedder", "text_stream_kv_block_0"):
            for row in case[part]["modules"].values():
                assert row["eq7_max_rel_diff"] < 1e-6
    one = report["cases"]["1_concept"]["context_embedder"]["modules"]["context_embedder"]
    assert one["rank"] == 1 and one["erase_residual"] < 0.05 and one["weight_shape"] == [16, 32]
    flux = sum(p.numel() for p in flux_shapes.meta_flux().parameters())
    assert 11.8e9 < flux < 12.0e9 and flux * 2 > 23e9  # bf16 alone fills this 24 GB machine
