"""DoCo (``erasekit.methods.doco``): the discriminator's update, the clean-latent prediction, the concept-preserving
gradient on, an exact resume with the discriminator checkpointed, tinyworld's anchor, one judged tinyworld erasure."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from erasekit.errors import ConfigError
from erasekit.methods import METHODS, doco, trainer
from erasekit.testing import tiny_pipeline

FAST = dict(anchor="dog", num_inference_steps=4, iterations=4, batch_size=2, discriminator_warmup=1, lr=1e-3,
            rank=2, progress=False)


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


def test_defaults_and_bad_input():
    config = doco.DocoConfig(concepts=("nudity",), anchor="a person, dressed")
    assert (config.train_method, config.gradient_surgery, config.align_weight, config.rank) == (
        "esd-x-strict", True, 0.0, 0)  # the authors' cross-attention k/v, full weights, their gradient
    with pytest.raises(ConfigError, match="anchor 'cat' is one of the concepts"):
        doco.DocoConfig(concepts=("cat",), anchor="cat")
    with pytest.raises(ConfigError, match="needs a retaining loss"):
        doco.DocoConfig(concepts=("cat",), preserve_weight=0.0)
    assert not doco.DocoConfig(concepts=("cat",), preserve_weight=0.0, gradient_surgery=False).gradient_surgery
    with pytest.raises(ConfigError, match="discriminator_lr"):
        doco.DocoConfig(concepts=("cat",), discriminator_lr=0.0)
    tiny = METHODS["doco"].make_config("circle", tinyworld=True)
    assert tiny.anchor == "square" and "triangle" in tiny.preserve and tiny.templates


def test_discriminator_step_is_adam_with_the_authors_betas():
    """The discriminator's own update (its tensors are plain, checkpointed tensors) equals torch's Adam."""
    disc = doco.Discriminator(4, 8, 1e-3, seed=0, device="cpu")
    twin = doco.PatchDiscriminator(4, 8)
    twin.load_state_dict({k: v.clone() for k, v in disc.weights.items()})
    opt = torch.optim.Adam(twin.parameters(), lr=1e-3, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        real, fake = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) + 1
        disc.update(real, fake)
        opt.zero_grad()
        out_r, out_f = twin(real), twin(fake)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(out_r, torch.zeros_like(out_r))
                + torch.nn.functional.binary_cross_entropy_with_logits(out_f, torch.ones_like(out_f)))
        loss.backward()
        opt.step()
    for k, v in twin.named_parameters():
        torch.testing.assert_close(disc.weights[k], v.detach(), rtol=1e-5, atol=1e-6)
    assert not any(v.requires_grad for v in disc.state().values()) and float(disc.count) == 3


def test_clean_latent_inverts_the_forward_noising(sd1):
    scheduler = trainer.ddim_scheduler(sd1, 10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[3]
    x_t = scheduler.add_noise(x0, noise, t.reshape(1))
    torch.testing.assert_close(doco.clean_latent(scheduler, x_t, t, noise), x0, rtol=1e-4, atol=1e-4)


def test_trains_with_the_preserving_gradient_and_resumes_exactly(sd1, tmp_path):
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    config = doco.DocoConfig(concepts=("cat",), **FAST)
    full = doco.erase(sd1, config)
    assert full.method == "doco" and all(k.endswith(("attn2.to_k", "attn2.to_v")) for k in full.deltas)
    assert float(sum(d.up.abs().sum() for d in full.deltas.values())) > 0
    assert not any(k.startswith("discriminator") for k in full.deltas)  # the discriminator is not in the adapter
    doco.erase(sd1, dataclasses.replace(config, iterations=2, checkpoint_dir=str(tmp_path)))  # "killed" after 2
    resumed = doco.erase(sd1, dataclasses.replace(config, checkpoint_dir=str(tmp_path), resume=True))
    for key, d in full.deltas.items():  # the discriminator's state came back from the checkpoint too
        torch.testing.assert_close(resumed.deltas[key].up, d.up, rtol=0, atol=1e-6)
    plain = doco.erase(sd1, dataclasses.replace(config, gradient_surgery=False))
    assert any(not torch.equal(plain.deltas[k].up, d.up) for k, d in full.deltas.items())
    assert all(torch.equal(before[k], v) for k, v in sd1.unet.state_dict().items())
    assert not any(m._forward_hooks for m in sd1.unet.modules())


def test_sdxl_shapes():
    pipe = tiny_pipeline("sdxl")
    adapter = doco.erase(pipe, doco.DocoConfig(concepts=("cat",), **FAST))
    assert adapter.deltas and all(torch.isfinite(d.dense()).all() for d in adapter.deltas.values())
    assert set(adapter.fingerprint) == {"unet"}


def test_tinyworld_circle_is_gone_and_other_shapes_stay(tinyworld_pipe, judge):
    """Judged on tinyworld with a third of the preset's 200 steps (the full preset on 4 seeds × the grid: 0 % seen,
    synonyms 0 %, 0.8 points lost: benchmarks/saliency_tinyworld.json): circle is rare under its name and synonyms,
    the other shapes are still drawn. 8 of the grid's 24 circle scenes are judged per name."""
    from erasekit import erase
    from erasekit.testing import judged_circle_shapes

    adapter = erase(tinyworld_pipe, "doco", ["circle"], iterations=70, progress=False)
    named, others = judged_circle_shapes(tinyworld_pipe, judge, adapter)
    circles = [label for labels in named.values() for label in labels]
    assert circles.count("circle") <= 3, named  # the base model: 24 of 24
    assert sum(label == shape for label, shape in others) >= len(others) - 1, others
