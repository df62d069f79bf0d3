"""ANT (``erasekit.methods.ant``): the trajectory-aware loss's terms, the split rollout, saliency-selected weights,
SD 1.5 shapes, and one judged tinyworld erasure."""

from __future__ import annotations

import pytest
import torch

from erasekit.core import lora
from erasekit.errors import ConfigError
from erasekit.methods import METHODS, ant, trainer
from erasekit.testing import tiny_pipeline

FAST = dict(train_method="esd-x-strict", num_inference_steps=4, early_steps=1, iterations=2, batch_size=2,
            saliency_batches=1, progress=False)


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


def test_paper_defaults_and_bad_input():
    config = ant.AntConfig(concepts=("nudity",))
    # the authors' train_ant.py: the whole UNet, 250 iterations at 5e-4, 7 early steps of 50, α₁ = 1, α₂ = 0.5
    assert (config.train_method, config.iterations, config.lr, config.early_steps, config.num_inference_steps,
            config.alpha_early, config.alpha_uncond, config.rank, config.batch_size) == (
        "esd-all", 250, 5e-4, 7, 50, 1.0, 0.5, 0, 1)
    assert config.saliency == 0.5 and config.preserve_weight == 0.0
    with pytest.raises(ConfigError, match=r"early_steps must be in \[1, num_inference_steps\)"):
        ant.AntConfig(concepts=("cat",), early_steps=50)
    with pytest.raises(ConfigError, match="early_steps"):
        ant.AntConfig(concepts=("cat",), early_steps=0)
    with pytest.raises(ConfigError, match="preserve_weight > 0"):
        ant.AntConfig(concepts=("cat",), preserve_related=True)
    with pytest.raises(ConfigError, match="alpha_uncond must be ≥ 0"):
        ant.AntConfig(concepts=("cat",), alpha_uncond=-1.0)
    with pytest.raises(ConfigError, match="needs full deltas"):
        ant.AntConfig(concepts=("cat",), rank=4)  # saliency (on by default) masks single weights
    assert ant.AntConfig(concepts=("cat",), rank=4, saliency=0.0).rank == 4
    tiny = METHODS["ant"].make_config("circle", tinyworld=True)
    assert tiny.train_method == "esd-x" and tiny.early_steps == 1 and tiny.num_inference_steps == 10
    assert "square" in tiny.preserve and tiny.templates  # the siblings held, tinyworld's caption templates


def test_split_rollout_is_the_whole_rollout(sd1):
    """ANT's x_t⁺ and x_t⁻ lie on one trajectory: rolling out to t⁺ and continuing to t⁻ (``guided_steps(...,
    start=t⁺)``) gives what one rollout to t⁻ gives, bit for bit."""
    scheduler = trainer.ddim_scheduler(sd1, 5)
    conds, uncond = trainer.encode(sd1, ["a cat"])
    both = trainer.Cond.cat([uncond, conds[0]])
    eps = lambda x2, t: trainer.predict(sd1.unet, x2, t, both)  # noqa: E731
    x = torch.randn(trainer.latent_shape(sd1, 1), generator=torch.Generator().manual_seed(0))
    whole, t_whole = trainer.guided_steps(eps, scheduler, x, 3.0, 4)
    part, _ = trainer.guided_steps(eps, scheduler, x, 3.0, 2)
    rest, t_rest = trainer.guided_steps(eps, scheduler, part, 3.0, 4, start=2)
    assert torch.equal(rest, whole) and t_rest == t_whole


def test_at_the_start_only_the_reversed_late_term_is_nonzero(sd1):
    """With ΔW = 0 the student is the teacher: the unconditional terms L₂, L₄ vanish, and with η = 1 so does the kept
    early direction L₁ (ε₀(∅) + (ε₀(c) − ε₀(∅)) = ε₀(c)); only L₃ = ‖2 (ε₀(c) − ε₀(∅))‖² at x_t⁻ is left, so the
    weights α₁ and α₂ do not change the first loss, and the late term is positive."""
    losses = []
    for alpha_early, alpha_uncond in ((0.0, 0.0), (5.0, 3.0)):
        config = ant.AntConfig(concepts=("cat",), negative_guidance=1.0, alpha_early=alpha_early,
                               alpha_uncond=alpha_uncond, rank=2, saliency=0.0, **{**FAST, "saliency_batches": 8})
        with lora.attach(sd1.unet, lora.select(sd1.unet, ant.PRESETS[config.train_method]), 2) as deltas:
            loss_fn = ant.objective(sd1, config)(deltas)
            with torch.no_grad():
                losses.append([trainer.total(loss_fn(step, trainer.step_generator(0, step))).item() for step in range(3)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert min(losses[0]) > 0


def test_loss_decreases_and_saliency_keeps_half_the_weights(sd1):
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    config = ant.AntConfig(concepts=("cat",), lr=3e-4, **{**FAST, "iterations": 12})
    adapter = ant.erase(sd1, config)
    total = sum(d.delta.numel() for d in adapter.deltas.values())
    changed = sum(int(torch.count_nonzero(d.delta)) for d in adapter.deltas.values())
    assert 0.3 * total < changed <= 0.5 * total + 1  # the saliency map's half, and (nearly) all of it moved
    assert adapter.method == "ant" and all(k.endswith(("attn2.to_k", "attn2.to_v")) for k in adapter.deltas)
    loss_for = ant.objective(sd1, config)

    def held_out(weight):  # the ANT loss on fixed held-out draws, the trained delta scaled by weight
        with torch.no_grad(), lora.applied(sd1.unet, adapter.deltas, weight=weight) as deltas:
            fn = loss_for(deltas)
            return sum(trainer.total(fn(i, trainer.step_generator(99, i))).item() for i in range(6))

    assert held_out(1.0) < 0.9 * held_out(0.0)
    assert all(torch.equal(before[k], v) for k, v in sd1.unet.state_dict().items())
    assert not any(m._forward_hooks for m in sd1.unet.modules())


def test_sd15_shapes():
    """One step on SD 1.5's UNet (its exact configuration, random weights) at a 64-pixel resolution: the deltas
    have the real modules' shapes and at most half of their weights move."""
    from erasekit.testing import sd15_shapes_pipeline, sd15_unet

    torch.manual_seed(0)
    unet = sd15_unet()
    pipe = sd15_shapes_pipeline(unet)
    adapter = ant.erase(pipe, ant.AntConfig(concepts=("cat",), resolution=64, lr=1e-3,
                                            **{**FAST, "iterations": 1, "batch_size": 1, "num_inference_steps": 2}))
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    assert len(adapter.deltas) == 32 and adapter.deltas[key].delta.shape == (1280, 768)
    nonzero = sum(int(torch.count_nonzero(d.delta)) for d in adapter.deltas.values())
    assert 0 < nonzero <= 0.5 * sum(d.delta.numel() for d in adapter.deltas.values()) + 1


def test_tinyworld_circle_is_gone_and_other_shapes_stay(tinyworld_pipe, judge):
    """Judged on tinyworld: with a quarter of the preset's 400 steps circle is already rare under its name and its
    synonyms, and the other shapes are still drawn (the full preset on 4 seeds × the grid, 7.3 % / 5.7 % / 0.2 pts:
    benchmarks/saliency_tinyworld.json). 8 of the grid's 24 circle scenes are judged per name to keep the test short."""
    from erasekit import erase
    from erasekit.testing import judged_circle_shapes

    adapter = erase(tinyworld_pipe, "ant", ["circle"], iterations=100, progress=False)
    named, others = judged_circle_shapes(tinyworld_pipe, judge, adapter)
    circles = [label for labels in named.values() for label in labels]
    assert circles.count("circle") <= 6, named  # the base model: 24 of 24
    assert sum(label == shape for label, shape in others) >= len(others) - 1, others
