"""Composition guarantees (docs/design.md §3) on the tiny SD 1.x and SDXL pipelines, with hand-made random adapters:
an adapter changes outputs; weight 0, disabled() and unload give the base bit for bit; fuse == hooks within atol and
unfuse is bit-exact; only the adapter's modules change; gates are per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasekit import compose
from erasekit.adapter import Adapter, ModuleDelta
from erasekit.core import sd
from erasekit.errors import AdapterError, AdapterMismatchError
from erasekit.testing import tiny_pipeline

STEPS = 2
TARGETS = {  # module-path suffixes an adapter touches, per family
    "sd1": ("attn2.to_k", "attn2.to_v", "down_blocks.0.attentions.0.proj_in", "encoder.layers.0.self_attn.q_proj"),
    "sdxl": ("attn2.to_k", "attn2.to_v", "mid_block.attentions.0.proj_in", "encoder.layers.0.self_attn.q_proj"),
}


def random_adapter(pipe, suffixes, *, rank=2, seed=0, scale=0.3, components=("unet", "text_encoder"), gating=None,
                   full=(), method="test", concepts=("cat",)) -> Adapter:
    """Random ``up @ down`` (or full ``delta`` for suffixes in ``full``) on every module whose path ends so."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for component in components:
        for path, module in getattr(pipe, component).named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not path.endswith(tuple(suffixes)):
                continue
            w = module.weight
            if path.endswith(tuple(full)):
                deltas[f"{component}.{path}"] = ModuleDelta(delta=torch.randn(w.shape, generator=g) * scale / 4)
            else:
                down = torch.randn(rank, *w.shape[1:], generator=g) * scale
                up = torch.randn(w.shape[0], rank, *[1] * (w.ndim - 2), generator=g) * scale
                deltas[f"{component}.{path}"] = ModuleDelta(down=down, up=up)
    return Adapter(method=method, concepts=concepts, config={}, deltas=deltas,
                   gating=gating or {"rule": "static"})


def gated(prompts, metric="tokenuni", combine=None):
    gating = {"rule": "prompt_similarity", "prompts": list(prompts), "metric": metric, "facilitate_factor": 1.0}
    if combine:
        gating["combine"] = combine
    return gating


def generate(pipe, prompt="a cat", seeds=(0,), **kwargs):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt, num_inference_steps=STEPS, output_type="np",
                generator=generators if len(generators) > 1 else generators[0], **kwargs).images


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pipes():
    return {}


@pytest.fixture
def pipe(family, pipes):
    """The tiny pipeline of ``family`` (built once), always returned to the base state after the test."""
    if family not in pipes:
        pipes[family] = (tiny_pipeline(family), None)
        pipes[family] = (pipes[family][0], generate(pipes[family][0]))
    yield pipes[family][0]
    compose.unload(pipes[family][0])


@pytest.fixture
def base(family, pipes, pipe):
    return pipes[family][1]


def test_adapter_changes_output_weight_zero_and_unload_are_bitwise(family, pipe, base):
    name = compose.load(pipe, random_adapter(pipe, TARGETS[family]), name="a")
    assert name == "a"
    out = generate(pipe)
    assert np.abs(out - base).max() > 1e-3
    compose.set_weights(pipe, "a", 0.0)
    assert np.array_equal(generate(pipe), base)
    compose.set_weights(pipe, ["a"], [1.0])
    assert np.array_equal(generate(pipe), out)
    compose.unload(pipe)
    assert np.array_equal(generate(pipe), base)
    assert compose.list_erasures(pipe) == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.unet.modules())


def test_disable_enable_and_disabled_context_restores(family, pipe, base):
    compose.load(pipe, random_adapter(pipe, TARGETS[family]), name="a")
    out = generate(pipe)
    compose.disable(pipe, "a")
    assert np.array_equal(generate(pipe), base)
    compose.enable(pipe, "a")
    with compose.disabled(pipe):
        assert np.array_equal(generate(pipe), base)
        assert not compose.list_erasures(pipe)[0]["enabled"]
    assert np.array_equal(generate(pipe), out)
    with pytest.raises(RuntimeError), compose.disabled(pipe):
        raise RuntimeError("boom")
    assert compose.list_erasures(pipe)[0]["enabled"]
    assert np.array_equal(generate(pipe), out)


def test_fuse_matches_hooks_only_adapter_modules_change_and_unfuse_is_bitexact(family, pipe, base):
    adapter = random_adapter(pipe, TARGETS[family], full=("attn2.to_v",))  # low-rank and full deltas
    before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}
    compose.load(pipe, adapter, name="a", weight=0.7)
    hooked = generate(pipe)
    # one hook per adapted module, none elsewhere
    adapted = {k.partition(".")[2] for k in adapter.deltas if k.startswith("unet.")}
    hooked_modules = {n for n, m in pipe.unet.named_modules() if m._forward_hooks}
    assert hooked_modules == adapted
    assert compose.fuse(pipe) == ["a"]
    assert compose.list_erasures(pipe)[0]["fused"]
    np.testing.assert_allclose(generate(pipe), hooked, atol=1e-5)
    for component, state in before.items():
        changed = {k for k, v in getattr(pipe, component).state_dict().items() if not torch.equal(v, state[k])}
        expected = {k.partition(".")[2] + ".weight" for k in adapter.deltas if k.startswith(component + ".")}
        assert changed == expected
    with compose.disabled(pipe):  # unfuses inside, refuses after
        assert np.array_equal(generate(pipe), base)
    np.testing.assert_allclose(generate(pipe), hooked, atol=1e-5)
    with pytest.raises(AdapterError, match="fused"):
        compose.set_weights(pipe, "a", 0.5)
    compose.unfuse(pipe)
    for component, state in before.items():
        assert all(torch.equal(v, state[k]) for k, v in getattr(pipe, component).state_dict().items())
    assert np.array_equal(generate(pipe), hooked)
    compose.fuse(pipe, ["a"])
    compose.unload(pipe)  # unloading a fused erasure restores the weights too
    for component, state in before.items():
        assert all(torch.equal(v, state[k]) for k, v in getattr(pipe, component).state_dict().items())
    assert np.array_equal(generate(pipe), base)


def test_two_adapters_compose_additively_and_unload_one(family, pipe, base):
    a = random_adapter(pipe, ("attn2.to_k",), seed=1, components=("unet",))
    b = random_adapter(pipe, ("attn2.to_k", "attn2.to_v"), seed=2, components=("unet",))
    compose.load(pipe, b, name="b")
    only_b = generate(pipe)
    compose.load(pipe, a, name="a", weight=0.5)
    both = generate(pipe)
    summed = Adapter(method="sum", concepts=(), config={}, deltas={
        k: ModuleDelta(delta=b.deltas[k].dense() + (0.5 * a.deltas[k].dense() if k in a.deltas else 0))
        for k in b.deltas})
    compose.unload(pipe, "a")
    assert np.array_equal(generate(pipe), only_b)
    compose.unload(pipe)
    compose.load(pipe, summed, name="summed")
    np.testing.assert_allclose(generate(pipe), both, atol=1e-5)


def test_per_sample_gates_in_one_batch_equal_separate_runs(family, pipe, base):
    adapter = random_adapter(pipe, TARGETS[family], components=("unet",), gating=gated(["a cat"]))
    compose.load(pipe, adapter, name="spm")
    assert [g["spm"] for g in compose.gates(pipe, ["a cat", "red car", ""])] == pytest.approx([1.0, 0.0, 0.0])
    batch = generate(pipe, ["a cat", "red car"], seeds=(0, 1))
    on, off = generate(pipe, "a cat", seeds=(0,)), generate(pipe, "red car", seeds=(1,))
    np.testing.assert_allclose(batch[0], on[0], atol=1e-5)
    np.testing.assert_allclose(batch[1], off[0], atol=1e-5)
    assert np.abs(on - base).max() > 1e-3  # gate 1: erased
    with compose.disabled(pipe):
        assert np.array_equal(generate(pipe, "red car", seeds=(1,)), off)  # gate 0: untouched
    with pytest.raises(AdapterError, match="would lose the gating"):
        compose.fuse(pipe, "spm")
    assert compose.fuse(pipe) == []  # names=None leaves gated erasures on their hooks


def test_gated_and_static_on_the_same_modules_stack_exactly(family, pipe, base):
    static = random_adapter(pipe, TARGETS[family], seed=5, components=("unet",))
    gate = random_adapter(pipe, TARGETS[family], seed=6, components=("unet",), gating=gated(["a cat"]))
    compose.load(pipe, static, name="static", weight=0.7)
    compose.load(pipe, gate, name="gated")
    batch = generate(pipe, ["a cat", "red car"], seeds=(0, 1))  # gates 1 and 0 in one batch
    np.testing.assert_allclose(batch[0], generate(pipe, "a cat", seeds=(0,))[0], atol=1e-5)
    np.testing.assert_allclose(batch[1], generate(pipe, "red car", seeds=(1,))[0], atol=1e-5)
    cat = generate(pipe, "a cat", guidance_scale=1.0)  # no CFG: the one row has gate 1
    unet = pipe.unet
    context = sd.encode(pipe, ["a cat", "red car"]).embeds
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(2, 24), "time_ids": torch.zeros(2, 6)}
    with torch.no_grad():  # in-place accumulation
        fast = unet(sample, 10, context, **kwargs).sample
    with torch.enable_grad():  # out-of-place (gradients recorded)
        recorded = unet(sample.clone().requires_grad_(), 10, context, **kwargs).sample
    torch.testing.assert_close(fast, recorded.detach(), atol=1e-5, rtol=1e-5)
    compose.unload(pipe)
    as_one = Adapter(method="sum", concepts=(), config={}, deltas={
        k: ModuleDelta(delta=0.7 * static.deltas[k].dense() + gate.deltas[k].dense()) for k in static.deltas})
    compose.load(pipe, as_one, name="as_one")
    np.testing.assert_allclose(generate(pipe, "a cat", guidance_scale=1.0), cat, atol=1e-5)


def test_a_gated_steps_cached_projection_follows_every_change(family, pipe, base):
    """The per-sample up-projection with the gates folded in is kept across the steps of one prompt batch (the same
    context tensor); a weight change, a disable or a new prompt batch must be seen at the very next step."""
    gate = random_adapter(pipe, TARGETS[family], seed=6, components=("unet",), gating=gated(["a cat"]))
    compose.load(pipe, gate, name="gated")
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(2, 24), "time_ids": torch.zeros(2, 6)}
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def step(context, recorded=False):
        with torch.set_grad_enabled(recorded):  # recorded: the uncached out-of-place path, the reference
            return pipe.unet(sample.clone().requires_grad_(recorded), 10, context, **kwargs).sample.detach()

    context = sd.encode(pipe, ["a cat", "red car"]).embeds
    other = sd.encode(pipe, ["red car", "a cat"]).embeds  # another batch: the gates swap rows
    first = step(context)
    torch.testing.assert_close(step(context), first, atol=0, rtol=0)  # the cached step is the same step
    torch.testing.assert_close(step(other), step(other, recorded=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step(context), first, atol=0, rtol=0)
    compose.set_weights(pipe, "gated", 0.5)
    torch.testing.assert_close(step(context), step(context, recorded=True), atol=1e-5, rtol=1e-5)
    assert (step(context) - first).abs().max() > 1e-4
    compose.disable(pipe, "gated")
    plain = step(context)
    compose.enable(pipe, "gated")
    with compose.disabled(pipe):
        torch.testing.assert_close(step(context), plain, atol=0, rtol=0)
    torch.testing.assert_close(step(context), step(context, recorded=True), atol=1e-5, rtol=1e-5)


def test_gated_gives_a_static_adapter_a_prompt_gate(family, pipe, base, tmp_path):
    """compose.gated: the same deltas, acting in full on the adapter's concept (γ = 1, the static adapter's images)
    and not at all on a prompt sharing none of its tokens (γ = 0, the base's images); the record survives a file."""
    static = random_adapter(pipe, TARGETS[family], seed=7, components=("unet",), concepts=("a cat",))
    gated_copy = compose.gated(static, metric="tokenuni")
    assert gated_copy.gating == {"rule": "prompt_similarity", "prompts": ["a cat"], "metric": "tokenuni",
                                 "facilitate_factor": 1.0, "combine": "sum"}
    assert static.gating == {"rule": "static"} and gated_copy.deltas is static.deltas  # a copy; deltas shared
    compose.load(pipe, static, name="static")
    want = generate(pipe, ["a cat", "red car"], seeds=(0, 1), guidance_scale=1.0)
    compose.unload(pipe)
    path = tmp_path / "gated.safetensors"
    gated_copy.save(path)
    compose.load(pipe, path, name="gated")
    assert [g["gated"] for g in compose.gates(pipe, ["a cat", "red car"])] == pytest.approx([1.0, 0.0])
    got = generate(pipe, ["a cat", "red car"], seeds=(0, 1), guidance_scale=1.0)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    compose.unload(pipe)
    plain = generate(pipe, ["a cat", "red car"], seeds=(0, 1), guidance_scale=1.0)
    assert np.array_equal(got[1], plain[1]) and np.abs(want[1] - plain[1]).max() > 1e-3
    assert compose.gated(static, prompts=["dog"]).gating["prompts"] == ["dog"]


def test_gated_refuses_what_it_cannot_gate(family, pipe):
    both = random_adapter(pipe, TARGETS[family], components=("unet", "text_encoder"))
    with pytest.raises(AdapterError, match="changes text_encoder"):
        compose.gated(both)
    unet = random_adapter(pipe, TARGETS[family], components=("unet",))
    with pytest.raises(AdapterError, match="unknown gate metric 'cosine'"):
        compose.gated(unet, metric="cosine")
    with pytest.raises(AdapterError, match="non-empty prompt"):
        compose.gated(unet, prompts=[" "])
    with pytest.raises(AdapterError, match="must be finite"):
        compose.gated(unet, facilitate_factor=float("nan"))
    guard = Adapter(method="safree", concepts=("cat",), config={}, deltas={}, guard={"rule": "safree"})
    with pytest.raises(AdapterError, match="inference-time guard"):
        compose.gated(guard)


def test_tokencos_gate_is_a_soft_tokenuni(family, pipe, base):
    """tokencos(p, q) = mean over q's tokens of max(0, the best cosine to one of p's token embeddings)."""
    adapter = random_adapter(pipe, ("attn2.to_k",), components=("unet",), gating=gated(["a cat"], metric="tokencos"))
    compose.load(pipe, adapter, name="soft")
    compose.load(pipe, random_adapter(pipe, ("attn2.to_v",), seed=2, components=("unet",), gating=gated(["a cat"])),
                 name="exact")
    prompts = ["a cat", "a big cat sat", "red car", "dog", ""]
    gates = compose.gates(pipe, prompts)
    special = set(pipe.tokenizer.all_special_ids)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()

    def tokens(prompt):
        return [i for i in pipe.tokenizer(prompt).input_ids if i not in special]

    for prompt, gate in zip(prompts, gates):
        if not tokens(prompt):
            expected = 0.0
        else:
            expected = np.mean([max(0.0, max(torch.cosine_similarity(table[j], table[i], dim=0).item()
                                              for i in tokens(prompt))) for j in tokens("a cat")])
        assert gate["soft"] == pytest.approx(expected, abs=1e-5), prompt
        assert gate["soft"] >= gate["exact"] - 1e-6, prompt  # soft overlap: never below the exact one
    assert gates[0]["soft"] == pytest.approx(1.0) and gates[1]["soft"] == pytest.approx(1.0)
    assert gates[2]["soft"] < 1.0 and gates[4]["soft"] == 0.0
    batch = generate(pipe, ["a cat", "red car"], seeds=(0, 1))  # the gates act per sample
    np.testing.assert_allclose(batch[1], generate(pipe, "red car", seeds=(1,))[0], atol=1e-5)
    assert np.abs(generate(pipe, "a cat") - base).max() > 1e-3


def test_clipcos_gate_and_factor_combine(family, pipe, base):
    prompt = "a cat"
    first = random_adapter(pipe, ("attn2.to_k",), seed=3, components=("unet",),
                           gating=gated([prompt], metric="clipcos", combine="factors"))
    second = random_adapter(pipe, ("attn2.to_k",), seed=4, components=("unet",),
                            gating=gated([prompt], metric="clipcos", combine="factors"))
    compose.load(pipe, first, name="first")
    compose.load(pipe, second, name="second")
    gate = compose.gates(pipe, prompt)[0]
    assert gate["first"] == pytest.approx(1.0, abs=1e-5) and gate["second"] == pytest.approx(1.0, abs=1e-5)
    factored = generate(pipe, prompt, guidance_scale=1.0)  # no CFG: the unconditional row would have γ < 1
    compose.unload(pipe)
    # SPM reference merge: (B1 + B2)(A1 + A2), cross terms included, as one static low-rank adapter
    cross = Adapter(method="merged", concepts=(), config={}, deltas={
        k: ModuleDelta(down=first.deltas[k].down + second.deltas[k].down, up=first.deltas[k].up + second.deltas[k].up)
        for k in first.deltas})
    compose.load(pipe, cross, name="cross")
    np.testing.assert_allclose(generate(pipe, prompt, guidance_scale=1.0), factored, atol=1e-4)


def test_errors_name_the_problem(family, pipe):
    adapter = random_adapter(pipe, ("attn2.to_k",), components=("unet",))
    compose.load(pipe, adapter, name="a")
    with pytest.raises(AdapterError, match="already loaded"):
        compose.load(pipe, adapter, name="a")
    with pytest.raises(AdapterError, match=r"unknown erasure 'nope'.*\['a'\]"):
        compose.set_weights(pipe, "nope", 1.0)
    with pytest.raises(AdapterError, match="unknown erasure"):
        compose.disable(pipe, "nope")
    with pytest.raises(AdapterError, match="must be a number"):
        compose.set_weights(pipe, "a", "heavy")
    key = next(iter(adapter.deltas))
    wrong = Adapter(method="test", concepts=(), config={}, deltas={key: ModuleDelta(delta=torch.zeros(3, 3))})
    with pytest.raises(AdapterMismatchError, match="shape"):
        compose.load(pipe, wrong, name="wrong")
    missing = Adapter(method="test", concepts=(), config={}, deltas={"unet.no.such.module": ModuleDelta(
        delta=torch.zeros(3, 3))})
    with pytest.raises(AdapterMismatchError, match="no.such.module"):
        compose.load(pipe, missing, name="missing")
    te_gated = random_adapter(pipe, ("encoder.layers.0.self_attn.q_proj",), components=("text_encoder",),
                              gating=gated(["a cat"]))
    with pytest.raises(AdapterError, match="unet only"):
        compose.load(pipe, te_gated, name="te")
    assert [e["name"] for e in compose.list_erasures(pipe)] == ["a"]  # failed loads leave nothing behind
    assert compose.list_erasures(pipe)[0] == dict(name="a", method="test", concepts=["cat"], weight=1.0,
                                                  enabled=True, fused=False, gated=False, kind="weights",
                                                  digest=adapter.digest)


def test_fp16_module_output_matches_fused(family):
    """Factors follow the module's dtype: fp16 hooks ≈ fp16 fused weights (one UNet call, fresh fp16 pipeline)."""
    pipe = tiny_pipeline(family)
    unet = pipe.unet.half()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g).half()
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).half()
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 24).half(), "time_ids": torch.zeros(2, 6).half()}
    compose.load(pipe, random_adapter(pipe, TARGETS[family], components=("unet",)), name="a")
    try:
        with torch.no_grad():
            hooked = unet(sample, 10, context, **kwargs).sample
            compose.fuse(pipe)
            fused = unet(sample, 10, context, **kwargs).sample
    except RuntimeError as err:  # builds without fp16 kernels on this device
        pytest.skip(f"fp16 on this device: {err}")
    assert hooked.dtype == torch.float16 and torch.isfinite(hooked).all()
    torch.testing.assert_close(hooked.float(), fused.float(), atol=2e-2, rtol=2e-2)


def test_state_is_shared_by_pipelines_sharing_the_unet_and_freed_with_it():
    import gc
    import weakref

    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = tiny_pipeline("sd1")
    compose.load(pipe, random_adapter(pipe, ("attn2.to_k",), components=("unet",)), name="a")
    sibling = StableDiffusionImg2ImgPipeline.from_pipe(pipe)  # same modules, so the same hooks
    assert [e["name"] for e in compose.list_erasures(sibling)] == ["a"]
    compose.unload(sibling)
    assert compose.list_erasures(pipe) == []
    compose.load(pipe, random_adapter(pipe, ("attn2.to_k",), components=("unet",)), name="b")
    unet = weakref.ref(pipe.unet)
    del pipe, sibling
    gc.collect()
    assert unet() is None  # the registry does not keep a pipeline alive
