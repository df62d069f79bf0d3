"""DUGE continual unlearning (``erasekit.methods.duge``): config, the previous step's adapter, cumulative deltas, the
recorded sequence, the loss's algebra, the CLI flag, SD 1.5 shapes, and (slow) circle then red on tinyworld."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import erasekit
from erasekit.core import lora
from erasekit.errors import ConfigError
from erasekit.methods import METHODS, duge, trainer
from erasekit.testing import tiny_pipeline

FAST = dict(iterations=2, num_inference_steps=4, batch_size=1, rank=2, progress=False)


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def first(sd1, tmp_path_factory):
    """Step 1 (cat), saved."""
    adapter = duge.erase(sd1, duge.DugeConfig(concepts=("cat",), templates=("a photo of {}", "{} on grass"),
                                              preserve=("a dog",), lr=1e-2, **FAST))
    path = tmp_path_factory.mktemp("duge") / "cat.safetensors"
    adapter.save(path)
    return adapter, str(path)


def _untouched(pipe) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.unet.modules())


# ------------------------------------------------------------------------------------------------ config
def test_config_validation():
    for bad in (dict(concepts=()), dict(concepts="cat"), dict(concepts=("cat",), train_method="esd-q"),
                dict(concepts=("cat",), negative_guidance=-1.0), dict(concepts=("cat",), prior_weight=-0.1),
                dict(concepts=("cat",), regularization_weight=float("nan")), dict(concepts=("cat",), anchor="cat"),
                dict(concepts=("cat",), preserve="a dog"), dict(concepts=("cat",), resume=True)):
        with pytest.raises(ConfigError):
            duge.DugeConfig(**bad)


def test_registry_and_presets():
    spec = METHODS["duge"]
    assert "continue_from" in spec.options
    tiny = spec.make_config(("circle",), tinyworld=True)
    assert tiny.negative_guidance == 2.0 and tiny.templates and set(tiny.preserve) >= {"square", "triangle"}
    paper = spec.make_config(("circle",))
    assert paper.negative_guidance == 0.0 and paper.templates == () and paper.preserve == ()


# ------------------------------------------------------------------------------------- the previous step
def test_first_step_records_its_sequence(sd1, first):
    adapter, _ = first
    assert adapter.method == "duge" and adapter.concepts == ("cat",)
    assert all(".attn2." in k and d.rank == 2 for k, d in adapter.deltas.items())
    (step,) = adapter.info["sequence"]
    assert step["concepts"] == ["cat"] and step["preserve"] == ["a dog"] and step["iterations"] == 2
    assert set(step["memory"]) == {"a photo of cat", "cat on grass"}
    assert _untouched(sd1)


def test_continue_from_stacks_the_deltas_and_the_sequence(sd1, first):
    adapter1, path = first
    adapter2 = duge.erase(sd1, duge.DugeConfig(concepts=("dog",), continue_from=path, templates=("a photo of {}",),
                                               lr=1e-2, **FAST))
    assert adapter2.concepts == ("cat", "dog")
    assert [s["concepts"] for s in adapter2.info["sequence"]] == [["cat"], ["dog"]]
    assert adapter2.config["continue_from"] == path
    assert adapter2.deltas.keys() == adapter1.deltas.keys()
    for key, d in adapter2.deltas.items():  # the first step's factors, then the new ones: ΔW = ΔW₁ + ΔW₂
        assert d.rank == 4
        torch.testing.assert_close(d.down[:2], adapter1.deltas[key].down.float())
        torch.testing.assert_close(d.up[:, :2], adapter1.deltas[key].up.float())
    assert any(float(d.up[:, 2:].abs().sum()) > 0 for d in adapter2.deltas.values())
    assert _untouched(sd1)


def test_cumulative_sums_the_deltas():
    g = torch.Generator().manual_seed(0)
    low = lambda r: lora.ModuleDelta(down=torch.randn(r, 5, generator=g), up=torch.randn(3, r, generator=g))  # noqa
    full = lora.ModuleDelta(delta=torch.randn(3, 5, generator=g))
    prev, new = {"unet.a": low(2), "unet.b": low(1), "unet.c": full}, {"unet.a": low(3), "unet.b": full}
    out = duge.cumulative(prev, new)
    assert out["unet.a"].rank == 5 and out["unet.b"].delta is not None and out["unet.c"] is full
    for key in ("unet.a", "unet.b"):
        torch.testing.assert_close(out[key].dense(), prev[key].dense() + new[key].dense())


def test_teacher_of_a_continued_step_is_the_previous_model(sd1, first):
    """φ_n (deltas disabled) = the base UNet with step 1's adapter applied; the student starts there too."""
    adapter1, path = first
    config = duge.DugeConfig(concepts=("dog",), continue_from=path, templates=("a photo of {}",), **FAST)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond, _ = trainer.encode(sd1, ["a photo of dog"])
    with torch.no_grad():
        with lora.applied(sd1.unet, adapter1.deltas):
            expected = trainer.predict(sd1.unet, x, torch.tensor([500]), cond[0])
        base = trainer.predict(sd1.unet, x, torch.tensor([500]), cond[0])
        with duge.applied(sd1.unet, duge.previous_step(sd1, config.continue_from).deltas), \
                lora.attach(sd1.unet, lora.select(sd1.unet, duge.PRESETS["esd-x"]), 2) as deltas:
            student = trainer.predict(sd1.unet, x, torch.tensor([500]), cond[0])
            with deltas.disabled():
                teacher = trainer.predict(sd1.unet, x, torch.tensor([500]), cond[0])
    torch.testing.assert_close(teacher, expected)
    torch.testing.assert_close(student, expected)  # new up factors start at zero
    assert not torch.allclose(expected, base)
    assert _untouched(sd1)


def test_continue_from_errors(sd1, first, tmp_path):
    _, path = first
    config = lambda p: duge.DugeConfig(concepts=("dog",), continue_from=str(p), **FAST)  # noqa: E731
    with pytest.raises(ConfigError, match="continue_from.*does not exist"):
        duge.erase(sd1, config(tmp_path / "missing.safetensors"))
    broken = tmp_path / "broken.safetensors"
    data = bytearray(open(path, "rb").read())
    data[-8:] = b"\x00" * 8  # the tensor payload changed after writing
    broken.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="continue_from.*corrupt"):
        duge.erase(sd1, config(broken))
    other = tiny_pipeline("sd1", seed=1)  # the same architecture, other weights: another model
    with pytest.raises(ConfigError, match="continue_from"):
        duge.erase(other, config(path))
    guard_less = tmp_path / "te.safetensors"
    adapter, _ = first
    dataclasses.replace(adapter, deltas={"text_encoder." + k[5:]: d for k, d in adapter.deltas.items()}).save(guard_less)
    with pytest.raises(ConfigError, match="continue_from"):
        duge.erase(sd1, config(guard_less))
    assert _untouched(sd1) and _untouched(other)


def test_memory_holds_earlier_prompts_but_not_the_new_concept():
    sequence = [{"concepts": ["circle"], "memory": ["a red circle", "a blue circle"]}, {"concepts": ["square"]}]
    memory = duge.memory_prompts(sequence)
    assert memory == ["a red circle", "a blue circle", "square"]
    assert [m for m in memory if not duge.mentions(m, ("red",))] == ["a blue circle", "square"]
    assert not duge.mentions("a reddish circle", ("red",))


# ------------------------------------------------------------------------------------------------ loss
def test_loss_terms(sd1, first):
    """At the start (new deltas zero) the regularization and prior terms vanish and L = L_U; once the deltas move,
    they add to it."""
    _, path = first
    config = duge.DugeConfig(concepts=("dog",), continue_from=path, templates=("a photo of {}",),
                             preserve=("a bird",), **FAST)
    previous = duge.previous_step(sd1, path)
    memory = duge.memory_prompts(duge.sequence_of(previous))
    only_u = dataclasses.replace(config, prior_weight=0.0, regularization_weight=0.0)
    with duge.applied(sd1.unet, previous.deltas), \
            lora.attach(sd1.unet, lora.select(sd1.unet, duge.PRESETS["esd-x"]), 2) as deltas, torch.no_grad():
        full = duge.objective(sd1, config, memory)(deltas)(0, trainer.step_generator(0, 0))
        bare = duge.objective(sd1, only_u, memory)(deltas)(0, trainer.step_generator(0, 0))
        torch.testing.assert_close(full, bare)
        for p in deltas.params.values():
            if p.shape[-1] == 2:
                p.normal_(0, 0.5)
        full = duge.objective(sd1, config, memory)(deltas)(0, trainer.step_generator(0, 0))
        bare = duge.objective(sd1, only_u, memory)(deltas)(0, trainer.step_generator(0, 0))
    assert float(full) > float(bare) > 0


def test_loss_decreases(sd1):
    """L_U is minimised (without the regularization: on this random tiny model ∅'s and the prompt's predictions
    move together, so holding ∅ would hold the prompt too)."""
    config = duge.DugeConfig(concepts=("cat",), iterations=10, num_inference_steps=6, batch_size=2, lr=1e-2,
                             negative_guidance=1.0, regularization_weight=0.0, progress=False)
    adapter = duge.erase(sd1, config)
    loss_for = duge.objective(sd1, config)

    def held_out(weight):
        with torch.no_grad(), lora.applied(sd1.unet, adapter.deltas, weight=weight) as deltas:
            fn = loss_for(deltas)
            return sum(fn(i, trainer.step_generator(99, i)).item() for i in range(6))

    assert held_out(1.0) < 0.8 * held_out(0.0)


def test_python_and_cli_entries(sd1, first, tmp_path):
    _, path = first
    adapter = erasekit.erase(sd1, "duge", ["dog"], continue_from=path, **FAST)
    assert adapter.concepts == ("cat", "dog")
    from erasekit.cli import erase_config, erase_parser

    parser, spec = erase_parser("duge")
    args = parser.parse_args(["--method", "duge", "--concept", "red", "--continue-from", path,
                              "--out", str(tmp_path / "red.safetensors")])
    assert erase_config(args, spec) == spec.make_config(("red",), tinyworld=True, continue_from=path)


# ------------------------------------------------------------------------------------------ SD 1.5 shapes
def test_sd15_shapes(tmp_path):
    """One DUGE step on SD 1.5's UNet (random weights, 8×8 latents) and a 768-wide one-layer text encoder (≈ 30 s:
    the UNet's 860 M parameters): 64 cross-attention modules; its file passes the next step's checks, and the
    cumulative deltas apply."""
    from erasekit.testing import sd15_shapes_pipeline, sd15_unet

    with torch.device("meta"):
        unet = sd15_unet()
    unet = unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():  # random weights, unit norms, zero biases
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    pipe = sd15_shapes_pipeline(unet)
    base = dict(iterations=1, num_inference_steps=1, batch_size=1, rank=1, resolution=64, progress=False)
    one = duge.erase(pipe, duge.DugeConfig(concepts=("cat",), **base))
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    assert len(one.deltas) == 64 and one.deltas[key].weight_shape == (1280, 768)
    path = str(tmp_path / "cat.safetensors")
    one.save(path)
    previous = duge.previous_step(pipe, path)  # the next step's check of the file against this model
    assert previous.concepts == ("cat",) and duge.memory_prompts(duge.sequence_of(previous)) == ["cat"]
    two = duge.cumulative(previous.deltas, one.deltas)
    assert all(d.rank == 2 and d.weight_shape == one.deltas[k].weight_shape for k, d in two.items())
    with duge.applied(pipe.unet, two):  # both steps' factors on the UNet at once
        assert sum(len(m._forward_hooks) for m in pipe.unet.modules()) == 64
    assert not any(m._forward_hooks for m in pipe.unet.modules())


# ------------------------------------------------------------------------------------------ tinyworld
@pytest.mark.slow
def test_tinyworld_circle_then_red(tinyworld_pipe, judge, tmp_path):
    """Circle, then red on top: both stay erased (≤ 10 % of canonical prompts), the other shapes and colours lose
    ≤ 5 points (benchmarks/continual_tinyworld.py has the four-step sequence)."""
    from erasekit.tinyworld.eval import erasure

    seeds = (0,)
    base = {c: erasure(tinyworld_pipe, judge, c, seeds=seeds) for c in ("circle", "red")}
    path = ""
    for concept in ("circle", "red"):
        adapter = erasekit.erase(tinyworld_pipe, "duge", [concept], continue_from=path, progress=False)
        path = str(tmp_path / f"{concept}.safetensors")
        adapter.save(path)
    assert adapter.concepts == ("circle", "red")
    with duge.applied(tinyworld_pipe.unet, adapter.deltas):
        for concept in ("circle", "red"):
            erased = erasure(tinyworld_pipe, judge, concept, seeds=seeds)
            assert erased.canonical_rate <= 0.10, concept
            assert base[concept].other_accuracy - erased.other_accuracy <= 0.05, concept
