"""SPM membranes: rank-1 deltas on the transformer blocks only, the training loss goes down, the gating record and
gate tensors survive a save/load, Facilitated Transport's "sum" (Σ γ_i U_i D_i) differs from the reference's factor
summing, and a membrane made on one checkpoint loads on another of the same architecture with a warning."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from erasekit import compose
from erasekit.core import lora
from erasekit.methods import trainer
from erasekit.adapter import Adapter, ModuleDelta, load_adapter
from erasekit.errors import AdapterMismatchError, BaseModelMismatchWarning, ConfigError
from erasekit.methods import METHODS, spm
from erasekit.testing import tiny_pipeline

FAST = dict(iterations=6, num_inference_steps=4, batch_size=1, num_anchors=2, lr=1e-2, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core CPU, two threads per op contend and training runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def membrane(sd1):
    return spm.erase(sd1, METHODS["spm"].make_config("cat", **FAST))


def _unet_out(pipe, prompt: str) -> torch.Tensor:
    """One UNet call on ``prompt``'s context (no CFG), so the compose gate hooks see exactly one row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        context = pipe.encode_prompt([prompt], "cpu", 1, False)[0]
        return pipe.unet(x, 500, context).sample


def test_config_defaults_and_validation(sd1):
    config = spm.SpmConfig(concepts=("cat",))
    assert config.resolved(sd1).iterations == spm.PAPER_SD["iterations"]  # not tinyworld: the authors' values
    assert config.resolved(sd1).la_strength == 1000.0 and config.rank == 1
    assert config.resolved(sd1).gate_metric == "clipcos_tokenuni"  # the reference's Facilitated Transport
    with pytest.raises(ConfigError, match="gate_combine"):
        spm.SpmConfig(concepts=("cat",), gate_combine="product")
    with pytest.raises(ConfigError, match="concepts"):
        spm.SpmConfig(concepts=())


def test_tinyworld_gets_tinyworld_defaults(tinyworld_pipe):
    resolved = spm.SpmConfig(concepts=("circle",)).resolved(tinyworld_pipe)
    assert {k: getattr(resolved, k) for k in spm.TINYWORLD} == spm.TINYWORLD


def test_tinyworld_gate_separates_prompts(tinyworld_pipe):
    """On tinyworld the default gate (tokencos) opens for the concept, mostly for its synonyms, barely for others;
    the reference's flattened clipcos would open ~0.8 for every prompt."""
    pipe = tinyworld_pipe
    config = spm.SpmConfig(concepts=("red",)).resolved(pipe)
    assert config.gate_metric == "tokencos"
    module = next(m for m in spm.transformer_modules(pipe.unet) if m.endswith("attn2.to_k"))
    weight = dict(pipe.unet.named_modules())[module].weight
    membrane = Adapter(method="spm", concepts=("red",), config={}, gating=spm.gating_record(config), deltas={
        f"unet.{module}": ModuleDelta(down=torch.zeros(1, weight.shape[1]), up=torch.zeros(weight.shape[0], 1))})
    prompts = ["a red circle on a black background", "a crimson circle", "a blue striped square", ""]
    compose.load(pipe, membrane, name="red")
    compose.load(pipe, spm.with_gate(membrane, metric="clipcos_tokenuni"), name="reference")
    try:
        gates = compose.gates(pipe, prompts)
    finally:
        compose.unload(pipe)
    red, crimson, blue, empty = (g["red"] for g in gates)
    assert red == pytest.approx(1.0) and crimson > 0.5 and blue < 0.3 and empty == 0.0
    assert min(g["reference"] for g in gates[2:]) > 0.7  # why tinyworld does not use it


def test_only_transformer_modules_get_rank_one_deltas(sd1, membrane):
    from diffusers import Transformer2DModel

    blocks = [n for n, m in sd1.unet.named_modules() if isinstance(m, Transformer2DModel)]
    expected = {f"unet.{n}" for n, m in sd1.unet.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.startswith(b + ".") for b in blocks)}
    assert set(membrane.deltas) == expected
    assert any(k.endswith("proj_in") for k in expected) and any(k.endswith("attn1.to_q") for k in expected)
    assert all(d.rank == 1 and d.delta is None for d in membrane.deltas.values())
    assert membrane.components == ("unet",) and membrane.method == "spm"
    assert any(float(d.up.abs().max()) > 0 for d in membrane.deltas.values())  # trained (up starts at zero)


def test_loss_decreases(tinyworld_pipe):
    """L_erase + la_strength·L_LA through rank-1 membranes, on one fixed draw (x_t, t, anchors): a short run fits it
    (random draws make a short run's loss curve too noisy to compare)."""
    pipe = tinyworld_pipe  # 8×8 latents: cheap, and a base model whose prompts matter
    config = spm.SpmConfig(concepts=("circle",), num_inference_steps=4, num_anchors=2).resolved(pipe)
    loss_for = spm.objective(pipe, config)
    with lora.frozen(pipe.unet), lora.attach(pipe.unet, spm.transformer_modules(pipe.unet), rank=1) as deltas:
        loss_fn = loss_for(deltas)
        losses = trainer.fit(deltas.params, lambda step, gen: loss_fn(0, trainer.step_generator(7, 0)), steps=15,
                            lr=config.lr, progress=False)
    assert losses[-1] < 0.7 * losses[0]
    assert not any(m._forward_hooks for m in pipe.unet.modules())


def test_anchor_sampler_avoids_nothing_but_keeps_the_scale():
    target = torch.randn(7, 5)
    anchors = spm.sample_anchors(target, 16, torch.Generator().manual_seed(0))
    assert anchors.shape == (16, 7, 5)
    ratios = anchors.flatten(1).norm(dim=1) / target.norm()
    assert bool(((ratios >= 0.8 - 1e-6) & (ratios <= 1.2 + 1e-6)).all())


def test_gate_record_and_tensors_round_trip(sd1, membrane, tmp_path):
    path = membrane.save(tmp_path / "cat.spm.safetensors")
    loaded = load_adapter(path)
    assert loaded.gating == {"rule": "prompt_similarity", "prompts": ["cat"], "metric": "clipcos_tokenuni",
                             "facilitate_factor": 1.0, "combine": "sum"}
    for name in ("gate.embeds", "gate.token_ids"):
        assert torch.equal(loaded.stats[name], membrane.stats[name])
    ids = sd1.tokenizer("cat").input_ids
    assert loaded.stats["gate.token_ids"][0, 0].item() == ids[1]  # first non-special token
    # the file alone is enough to gate: compose reads the record and encodes the gate prompts itself
    compose.load(sd1, path, name="cat")
    try:
        gates = compose.gates(sd1, ["cat", "a dog"])
        assert gates[0]["cat"] == pytest.approx(1.0, abs=1e-5) and gates[1]["cat"] < 1.0
        torch.testing.assert_close(compose.Composer.of(sd1).adapters["cat"].gate.embeds.cpu(),
                                   loaded.stats["gate.embeds"])
    finally:
        compose.unload(sd1)


def _randomised(adapter: Adapter, seed: int) -> Adapter:
    """The membrane with random factors of a visible size (a few training steps leave them tiny)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {k: ModuleDelta(down=torch.randn(d.down.shape, generator=g) * 0.3,
                             up=torch.randn(d.up.shape, generator=g) * 0.3) for k, d in adapter.deltas.items()}
    return dataclasses.replace(adapter, deltas=deltas)


def test_sum_gates_differ_from_reference_factor_summing(sd1, membrane):
    first = spm.with_gate(_randomised(membrane, 1), metric="clipcos")
    second = spm.with_gate(_randomised(membrane, 2), metric="clipcos")
    prompt = "a dog"  # γ < 1 for both (clipcos to "cat")
    base = _unet_out(sd1, prompt)
    compose.load(sd1, first, name="first")
    gamma = compose.gates(sd1, prompt)[0]["first"]
    compose.unload(sd1)
    assert 0.0 < gamma < 0.999

    def run(combine):
        compose.load(sd1, spm.with_gate(first, combine=combine), name="first")
        compose.load(sd1, spm.with_gate(second, combine=combine), name="second")
        try:
            return _unet_out(sd1, prompt)
        finally:
            compose.unload(sd1)

    def static(deltas):
        compose.load(sd1, Adapter(method="test", concepts=(), config={}, deltas=deltas), name="static")
        try:
            return _unet_out(sd1, prompt)
        finally:
            compose.unload(sd1)

    summed, factored = run("sum"), run("factors")
    # default: Σ_i γ_i U_i D_i (both gates equal γ here: same prompts, same metric)
    intended = {k: ModuleDelta(delta=gamma * (first.deltas[k].dense() + second.deltas[k].dense())) for k in first.deltas}
    torch.testing.assert_close(summed, static(intended), atol=1e-4, rtol=1e-4)
    # reference: (γ U_1 + γ U_2)(γ D_1 + γ D_2), i.e. γ² and the cross terms U_1 D_2, U_2 D_1
    reference = {k: ModuleDelta(down=gamma * (first.deltas[k].down + second.deltas[k].down),
                                up=gamma * (first.deltas[k].up + second.deltas[k].up)) for k in first.deltas}
    torch.testing.assert_close(factored, static(reference), atol=1e-4, rtol=1e-4)
    assert (summed - factored).abs().max() > 1e-2 * (summed - base).abs().max()


def test_ft_off_is_static(membrane):
    static = spm.with_gate(membrane, static=True)
    assert static.gating == {"rule": "static"} and static.is_static and static.deltas is membrane.deltas
    with pytest.raises(ConfigError, match="no prompt-similarity gate"):
        spm.with_gate(static, combine="factors")


def test_transfer_to_another_checkpoint_warns(membrane):
    other = tiny_pipeline("sd1", seed=1)  # same architecture, other weights
    base = _unet_out(other, "cat")
    with pytest.warns(BaseModelMismatchWarning, match="same architecture"):
        compose.load(other, membrane, name="cat")
    try:
        assert (_unet_out(other, "cat") - base).abs().max() > 0  # applied
    finally:
        compose.unload(other)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BaseModelMismatchWarning)
        with pytest.raises(AdapterMismatchError, match="strict"):
            compose.load(other, membrane, name="cat", strict=True)
    assert compose.list_erasures(other) == []
    with pytest.raises(AdapterMismatchError, match="architecture"):
        compose.load(tiny_pipeline("sdxl"), membrane, name="cat")


def test_divergence_guard_covers_spm(tinyworld_pipe):
    from erasekit.errors import TrainingDivergedError

    config = spm.SpmConfig(concepts=("circle",), iterations=1, lr=1e6, num_inference_steps=2, batch_size=1,
                           num_anchors=2, progress=False)
    with pytest.raises(TrainingDivergedError, match=r"spm: training diverged in step 1 of 1: the delta of module"):
        spm.erase(tinyworld_pipe, config)
