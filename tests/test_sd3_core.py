"""SD3 / MMDiT plumbing (issue #25): erasekit's conditioning, predictions and sampler agree with a stock
``StableDiffusion3Pipeline``, and the collapsed-padding attention used in training equals the full 256 T5 rows."""

import numpy as np
import pytest
import torch

from erasekit.core import sd
from erasekit.core.mmdit import collapsed_padding
from erasekit.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd3")


def test_the_denoiser_and_the_family(pipe):
    assert sd.is_mmdit(pipe) and not sd.is_sdxl(pipe)
    assert sd.denoiser(pipe) is pipe.transformer
    sd1 = tiny_pipeline("sd1")
    assert not sd.is_mmdit(sd1) and sd.denoiser(sd1) is sd1.unet
    assert sd.is_sdxl(tiny_pipeline("sdxl"))


def test_encode_matches_the_pipelines_encode_prompt(pipe):
    prompts = ["a cat", "a red dog on a blue car"]
    ours = sd.encode(pipe, prompts)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                          do_classifier_free_guidance=True)
    assert ours.embeds.shape == (2, 77 + sd.SD3_T5_ROWS, 32)
    assert torch.equal(ours.embeds, embeds) and torch.equal(ours.pooled, pooled)
    un = sd.uncond(pipe, 2)
    assert torch.equal(un.embeds, neg) and torch.allclose(un.pooled, neg_pooled, atol=1e-6)  # batch 1 vs 2


def test_embedding_override_reaches_both_encoders(pipe):
    ids = sd.ids_per_encoder(pipe, sd.token_ids(pipe.tokenizer, "a cat"))
    plain = sd.encode_ids(pipe, ids)
    changed = sd.encode_ids(pipe, ids, [lambda e: e * 0, None])
    assert not torch.equal(plain.embeds, changed.embeds)
    assert torch.equal(plain.embeds[..., 16:], changed.embeds[..., 16:])  # the second encoder's columns


def test_prediction_is_the_transformers_output(pipe):
    cond = sd.encode(pipe, ["a cat", "a dog"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 100.0])
    v = sd.unet_eps(pipe, x, t, cond)
    ref = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled).sample
    assert torch.equal(v, ref)
    x0, noise = torch.randn_like(x), torch.randn_like(x)
    xt = sd.add_noise(pipe, x0, noise, torch.tensor([250, 750]))
    assert torch.allclose(xt[0], 0.75 * x0[0] + 0.25 * noise[0]) and torch.allclose(xt[1], 0.25 * x0[1] + 0.75 * noise[1])
    assert torch.allclose(sd.denoised(pipe, xt, noise - x0, torch.tensor([250, 750])), x0, atol=1e-6)


def test_composed_sampler_with_one_term_equals_the_pipeline(pipe):
    ref = np.asarray(sd.generate_prompt(pipe, "a cat", 3, 3, 5.0)).astype(int)
    ours = np.asarray(sd.sample_composed(pipe, [(sd.encode(pipe, "a cat"), 5.0)], 3, 3)).astype(int)
    assert np.abs(ref - ours).max() <= 1


def test_one_zero_row_stands_exactly_for_the_t5_rows(pipe):
    cond = sd.encode(pipe, ["a cat", "a dog"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0, 20.0])
    full = sd.unet_eps(pipe, x, t, cond)
    with collapsed_padding(pipe.transformer, sd.SD3_T5_ROWS):
        short = sd.unet_eps(pipe, x, t, sd.Cond(cond.embeds[:, :78], cond.pooled))
    assert torch.allclose(full, short, atol=1e-5)
    assert torch.equal(sd.unet_eps(pipe, x, t, cond), full)  # the stock processors are back


def test_generation_with_the_collapsed_t5_rows_is_the_stock_pipelines(pipe):
    from erasekit.generate import generate

    prompts, seeds = ["a cat", "a red dog", "a car"], [0, 1, 2]
    ours = generate(pipe, prompts, seeds, num_inference_steps=3, guidance_scale=4.0, output_type="np")
    stock = pipe(prompts, num_inference_steps=3, guidance_scale=4.0, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert np.abs(ours - stock).max() < 1e-4
    processors = {type(p).__name__ for p in pipe.transformer.attn_processors.values()}
    assert processors == {"JointAttnProcessor2_0"}  # restored
    with pytest.raises(ValueError):  # restored on error too
        from erasekit.core.mmdit import collapsed_generation

        with collapsed_generation(pipe.transformer):
            raise ValueError
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
