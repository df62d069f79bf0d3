"""SAFREE, the first inference-time guard (erasekit.compose.guards, erasekit.methods.safree): the algebra of its rule,
the guard adapter kind of format 1.1 (no deltas; 1.0 files still load), composition with weight adapters through
the same verbs (fuse refused for the guard), the step filter under the stock denoising loop, SD 1.x / SDXL / SD 1.5
text-encoder shapes, and one judged tinyworld test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import erasekit
from erasekit import compose
from erasekit.adapter import FORMAT_KEY, METADATA_KEY, Adapter, load_adapter, read_record, write_safetensors
from erasekit.compose.guards import (orthonormal_basis, project_onto, project_out, skip_filter, svf_steps,
                                     trigger_tokens)
from erasekit.core import sd
from erasekit.errors import AdapterError, AdapterFileError, AdapterMismatchError, ConfigError
from erasekit.testing import tiny_pipeline

REFERENCE = Path(__file__).parent / "reference"
FLAG_ALL = {"alpha": -0.9}  # every token a trigger: the guard filters every prompt with tokens


@pytest.fixture(scope="module")
def pipes():
    return {family: tiny_pipeline(family) for family in ("sd1", "sdxl")}


def guard(pipe, concepts=("cat",), **options) -> Adapter:
    return erasekit.erase(pipe, "safree", list(concepts), **options)


def images(pipe, prompt="a red cat", steps=2, seed=0):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def contexts_seen(pipe):
    """Record the encoder_hidden_states every UNet call receives (a pre-hook registered after the composer's)."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    return seen, handle


# ---------------------------------------------------------------------------------------------- the algebra

def test_projection_removes_the_concept_component_and_keeps_the_input_space():
    g = torch.Generator().manual_seed(0)
    concept = orthonormal_basis(torch.randn(3, 16, generator=g, dtype=torch.float64), [16])
    assert concept.shape == (3, 16) and torch.allclose(concept @ concept.T, torch.eye(3, dtype=torch.float64))
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    assert (project_out(x, concept) @ concept.T).abs().max() < 1e-12  # (I − P_C) x ⊥ C
    assert torch.allclose(project_out(x, concept) + project_onto(x, concept), x)
    # a prompt's own space orthogonal to C: (I − P_C) P_I keeps what lies in it, drops the rest
    own = orthonormal_basis(project_out(torch.randn(4, 16, generator=g, dtype=torch.float64), concept), [16])
    inside = torch.randn(2, 4, generator=g, dtype=torch.float64) @ own
    assert torch.allclose(project_out(project_onto(inside, own), concept), inside)
    # SDXL: two encoder slices, spanned (and projected) block by block
    blocks = orthonormal_basis(torch.randn(2, 10, generator=g), [4, 6])
    assert blocks.shape == (4, 10) and blocks[:2, 4:].abs().max() == 0 and blocks[2:, :4].abs().max() == 0
    assert orthonormal_basis(torch.randn(6, 16, generator=g), [16], rank=2).shape == (2, 16)


def test_masked_token_rule_and_step_count_formula():
    # d_i ≥ (1 + α) · mean of the others
    assert trigger_tokens(torch.tensor([1.0, 1.0, 1.5]), 0.01).tolist() == [False, False, True]
    assert trigger_tokens(torch.tensor([1.0, 1.02, 1.0]), 0.01).tolist() == [False, True, False]
    assert trigger_tokens(torch.tensor([1.0, 1.02, 1.0]), 0.05).tolist() == [False, False, False]
    assert not trigger_tokens(torch.tensor([2.0]), 0.01).any()  # one token, nothing to compare: the authors' rule
    assert trigger_tokens(torch.tensor([2.0]), 0.01, alone=1.0).all()

    def f_beta(z, upper=10):  # the authors' f_beta (btype="sigmoid"): round(up_t · σ(2 · 2.5 · (10 z − 5.333)))
        return round(upper * 1 / (1 + math.exp(-2.0 * 2.5 * (10 * z - 5.333))))

    for beta in (0.0, 0.3, 0.5, 0.5333, 0.55, 0.7, 1.0):
        assert svf_steps(beta, 10, 5.333, 5.0) == f_beta(beta) + 1  # filtered at steps 0 … t'
    assert svf_steps(0.0, 10, 5.333, 5.0) == 1 and svf_steps(1.0, 10, 5.333, 5.0) == 11


def test_skip_filter_scales_low_frequencies_of_chosen_rows_only():
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    flat = torch.ones(1, 2, 8, 8) * 3.0  # only the DC component
    out = skip_filter(torch.cat([x, flat]), torch.tensor([1.0, 0.5, 1.0, 0.2]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])  # scale 1: untouched, bit for bit
    assert torch.allclose(out[3], flat[0] * 0.2, atol=1e-5)
    assert not torch.allclose(out[1], x[1]) and torch.allclose(out[1].mean(), x[1].mean() * 0.5, atol=1e-5)


def test_flagged_tokens_are_projected_and_the_others_stay_bit_identical(pipes):
    pipe = pipes["sd1"]
    adapter = guard(pipe, ("cat", "dog"))
    name = compose.load(pipe, adapter)
    try:
        composer = compose.Composer.of(pipe)
        prompts = ["a red cat on a blue car", "a dog and a cat", "a green car", "a car on a red dog"]
        context = sd.encode(pipe, prompts).embeds
        plan = composer.guards.guards[name].plan(context, [composer.tokens.tokens(r) for r in context],
                                                 compose.guards.context_encoder(
                                                     composer.component, (composer.tokenizer, None), composer.tokens))
        assert plan is not None
        basis = adapter.stats["guard.basis"].double()
        mixed = 0
        for i, row in enumerate(plan.rows.tolist()):
            tokens, filtered = plan.tokens[i], plan.filtered[i]
            assert torch.equal(filtered[~tokens], context[row][~tokens])  # unflagged tokens: bit-identical
            assert (filtered[tokens].double() @ basis.T).abs().max() < 1e-5  # flagged: no concept component
            mixed += bool(tokens.any()) and bool((~tokens).any())
        assert mixed >= 1
    finally:
        compose.unload(pipe, name)


# ---------------------------------------------------------------------------------------------- the format

def test_guard_round_trip_is_format_1_1_without_deltas(pipes, tmp_path, capsys):
    pipe = pipes["sdxl"]
    adapter = guard(pipe)
    assert adapter.kind == "guard" and adapter.deltas == {} and adapter.guard["segments"] == [16, 24]
    assert set(adapter.fingerprint) == {"text_encoder", "text_encoder_2"}
    path = adapter.save(tmp_path / "cat.safree.safetensors")
    record = read_record(path)
    assert record["format_version"] == "1.1" and record["kind"] == "guard" and record["components"] == []
    back = load_adapter(path)
    assert back.kind == "guard" and back.guard == adapter.guard and back.config == json.loads(json.dumps(adapter.config))
    assert torch.equal(back.stats["guard.basis"], adapter.stats["guard.basis"])
    from erasekit.cli import main

    assert main(["inspect", str(path)]) == 0
    assert "kind       : guard (safree: applied at generation time, changes no weights)" in capsys.readouterr().out


@pytest.mark.parametrize("stem", sorted(p.stem for p in REFERENCE.glob("*.safetensors")))
def test_format_1_0_files_still_load(stem):
    from safetensors import safe_open

    path = REFERENCE / f"{stem}.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()[FORMAT_KEY] == "1.0"
    adapter = load_adapter(path)
    assert adapter.kind == "weights" and adapter.deltas and not adapter.guard


def _write(path, record: dict, tensors: dict, version: str):
    write_safetensors(tensors, {"format": "pt", FORMAT_KEY: version, METADATA_KEY: json.dumps(record)}, path)
    return path


@pytest.mark.parametrize("case, match", [
    ("guard_in_1_0", "came in format 1.1"),
    ("guard_with_deltas", "changes no weights"),
    ("guard_tensor_in_weights", "a guard's data"),
    ("unknown_kind", "kind 'hologram' is unknown"),
    ("guard_without_record", "needs a 'guard' record"),
])
def test_reader_refuses_inconsistent_guards(tmp_path, case, match):
    basis = {"guard.basis": torch.eye(2, 4)}
    lora = {"unet.x.lora_A.weight": torch.ones(1, 4), "unet.x.lora_B.weight": torch.ones(4, 1)}
    g = {"rule": "safree", "prompts": ["cat"], "alpha": 0.01, "pooling": "eot", "mask_token_id": 0,
         "subspace": "pooled", "project": "flagged", "segments": [4], "svf": {}, "reattention": {}}
    base = {"method": "safree", "concepts": ["cat"], "config": {}, "format_version": "1.1"}
    record, tensors, version = {**base, "kind": "guard", "guard": g}, basis, "1.1"
    if case == "guard_in_1_0":
        record, version = {**record, "format_version": "1.0"}, "1.0"
    elif case == "guard_with_deltas":
        tensors = {**basis, **lora}
    elif case == "guard_tensor_in_weights":
        record, tensors = dict(base), {**basis, **lora}
    elif case == "unknown_kind":
        record = {**record, "kind": "hologram"}
    elif case == "guard_without_record":
        record = {**base, "kind": "guard"}
    path = _write(tmp_path / "bad.safetensors", record, tensors, version)
    with pytest.raises(AdapterFileError, match=match):
        load_adapter(path)


# ---------------------------------------------------------------------------------------------- compose

def test_composes_with_a_weight_adapter_through_the_verbs_and_unloads_bit_for_bit(pipes, tmp_path):
    pipe = pipes["sd1"]
    base = images(pipe)
    uce = erasekit.erase(pipe, "uce", ["cat"])
    compose.load(pipe, uce, name="uce")
    weights_only = images(pipe)
    compose.load(pipe, guard(pipe, **FLAG_ALL).save(tmp_path / "g.safetensors"), name="guard")  # from its file
    listing = {e["name"]: e for e in compose.list_erasures(pipe)}
    assert listing["guard"]["kind"] == "guard" and listing["uce"]["kind"] == "weights"
    both = images(pipe)
    assert np.abs(both - weights_only).max() > 1e-4
    compose.set_weights(pipe, "guard", 0.0)
    assert np.array_equal(images(pipe), weights_only)  # weight 0: the guard is skipped
    compose.set_weights(pipe, "guard", 1.0)
    compose.disable(pipe, "guard")
    assert np.array_equal(images(pipe), weights_only)
    compose.enable(pipe, "guard")
    with compose.disabled(pipe):
        assert np.array_equal(images(pipe), base)
    assert np.array_equal(images(pipe), both)
    # fuse: the guard cannot be fused, by name; fuse() fuses the weight adapter and leaves the guard on its hooks
    with pytest.raises(AdapterError, match="inference-time guard .*cannot be fused"):
        compose.fuse(pipe, ["guard"])
    assert compose.fuse(pipe) == ["uce"]
    assert np.abs(images(pipe) - both).max() < 1e-4
    compose.unfuse(pipe)
    compose.unload(pipe, "guard")
    assert np.array_equal(images(pipe), weights_only)
    compose.unload(pipe)
    assert np.array_equal(images(pipe), base)


def test_pipeline_class_verbs_and_export_refusals(tmp_path):
    from erasekit import ErasureStableDiffusionPipeline, export, merge

    parts = tiny_pipeline("sd1").components
    pipe = ErasureStableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    adapter = guard(pipe, **FLAG_ALL)
    pipe.load_erasure(adapter, name="guard")
    assert [e["kind"] for e in pipe.erasures] == ["guard"]
    with pytest.raises(AdapterError, match="cannot be fused"):
        pipe.fuse_erasures("guard")
    assert pipe.fuse_erasures() == []
    pipe.set_erasures(["guard"], weights=[0.5])
    pipe.unload_erasures()
    with pytest.raises(AdapterError, match="no LoRA to export"):
        export.to_diffusers(adapter, tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="inference-time guard"):
        merge.merge([adapter, adapter])


def test_other_encoder_widths_and_bad_records_are_refused(pipes):
    adapter = dataclass_replace(guard(pipes["sdxl"]), fingerprint={})
    with pytest.raises(AdapterMismatchError, match="widths"):
        compose.load(pipes["sd1"], adapter)
    with pytest.raises(AdapterError, match="needs 'alpha'"):
        compose.load(pipes["sd1"], dataclass_replace(adapter, guard={**adapter.guard, "alpha": "high"}))
    with pytest.raises(AdapterError, match="unknown guard rule 'oracle'"):
        compose.load(pipes["sd1"], dataclass_replace(adapter, guard={"rule": "oracle"}))
    assert compose.list_erasures(pipes["sd1"]) == []


def dataclass_replace(adapter, **changes):
    import dataclasses

    return dataclasses.replace(adapter, **changes)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_only_flagged_conditional_rows_for_the_filtered_steps(pipes, family):
    """Stock denoising loop, CFG batch [uncond, cond]: the unconditional "" row passes untouched; the prompt's row
    is filtered for the SVF's t' + 1 steps (upper 1: 2 of 4 steps) and is the original one after."""
    pipe = pipes[family]
    name = compose.load(pipe, guard(pipe, svf_upper=1, svf_midpoint=-100.0, **FLAG_ALL))
    seen, handle = contexts_seen(pipe)
    try:
        images(pipe, steps=4)
        images(pipe, steps=4)  # the same prompt again: a new run of the filter, not steps 5–8
    finally:
        handle.remove()
        compose.unload(pipe, name)
    original = sd.encode(pipe, ["a red cat"]).embeds[0]
    assert len(seen) == 8 and all(c.shape[0] == 2 for c in seen)
    uncond = seen[-1][0]
    for i, context in enumerate(seen):
        assert torch.equal(context[0], uncond)  # the unconditional row: never filtered
        filtered = not torch.equal(context[1], original)
        assert filtered == (i % 4 < 2), (i, filtered)


def test_sd15_text_encoder_shapes():
    """The guard on SD 1.5's text encoder (CLIP ViT-L, 768 wide; random weights) and a UNet of that context width."""
    from diffusers import UNet2DConditionModel

    from erasekit.testing import sd15_text_encoder, tiny_components

    parts = tiny_components("sd1")
    parts["text_encoder"] = sd15_text_encoder(parts["tokenizer"])
    parts["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    adapter = guard(pipe, ("cat", "dog", "car"), **FLAG_ALL)
    assert adapter.guard["segments"] == [768] and adapter.stats["guard.basis"].shape == (3, 768)
    base = images(pipe)
    name = compose.load(pipe, adapter)
    guarded = images(pipe)
    compose.unload(pipe, name)
    assert np.abs(guarded - base).max() > 1e-4 and np.array_equal(images(pipe), base)


# ---------------------------------------------------------------------------------------------- tinyworld

def test_tinyworld_guard_removes_most_circles_and_keeps_other_shapes(tinyworld_pipe, judge):
    """Judged on tinyworld with the tinyworld preset: the judge sees a circle in at most 3 of 8 of the grid's circle
    prompts and 6 of their 16 synonym prompts (the base model: all of them), and the other shapes' prompts are drawn
    as without the guard (none of their tokens is a trigger: their rows pass bit for bit). These bounds are what
    the guard does, not the issue's bars: the full protocol (4 seeds × the grid, benchmarks/safree_tinyworld.py)
    measures 8.3 % / 14.6 % (bars: 10 % / 20 %)."""
    from erasekit.generate import generate
    from erasekit.tinyworld.eval import standard_grid
    from erasekit.tinyworld.world import SHAPES

    grid = standard_grid()
    circles = [s for s in grid if s.shape == "circle"][::3]  # 8 scenes
    others = [s for s in grid if s.shape != "circle"][::10]  # 12 scenes, every other shape
    canonical = [s.prompt() for s in circles]
    synonyms = [s.prompt(names={"shape": w}) for s in circles for w in SHAPES["circle"][1:]]
    rest = [s.prompt() for s in others]
    prompts = canonical + synonyms + rest

    def shapes():
        out = generate(tinyworld_pipe, prompts, [0] * len(prompts), batch_size=len(prompts), output_type="np")
        return judge(torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1).labels("shape")

    before = shapes()
    name = compose.load(tinyworld_pipe, erasekit.erase(tinyworld_pipe, "safree", ["circle"]))
    try:
        after = shapes()
    finally:
        compose.unload(tinyworld_pipe, name)
    n, m = len(canonical), len(synonyms)
    assert sum(s == "circle" for s in before[:n + m]) >= n + m - 1  # the base model draws them
    assert sum(s == "circle" for s in after[:n]) <= 3, after[:n]
    assert sum(s == "circle" for s in after[n:n + m]) <= 6, after[n:n + m]
    kept = [a == b == s.shape for a, b, s in zip(after[n + m:], before[n + m:], others)]
    assert sum(kept) >= sum(b == s.shape for b, s in zip(before[n + m:], others)), list(zip(after[n + m:], others))
