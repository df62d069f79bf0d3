"""erasekit bench perf's side-by-side benchmarks (erasekit.bench.perf.peers) on the tiny SD 1.x pipeline: the
agreement checks and the JSON written (not the timings)."""

import json

import pytest
import torch

from erasekit.bench.perf import peers, run_perf
from erasekit.cli import main
from erasekit.errors import ConfigError
from erasekit.methods import uce
from erasekit.testing import tiny_pipeline

RECORD_KEYS = {"benchmark", "model", "timed", "results", "wall_s", "load_before", "load_after", "run"}


def test_peft_compare_agrees_with_peft_and_writes_its_record(tmp_path):
    path = peers.run("peft_compare", "sd1", 1, tmp_path)
    record = json.loads(path.read_text())
    assert path.name == "peft_compare.json" and set(record) == RECORD_KEYS
    assert {"git_commit", "date"} <= set(record["run"]) and "load average" in record["load_before"]["uptime"]
    results = record["results"]
    variants = {"plain", "peft", "erasekit_static", "erasekit_gated", "fused"}
    assert set(results["median_step_s"]) == set(results["step_s"]) == variants
    assert all(len(v) == 1 for v in results["step_s"].values())
    assert set(results["ratios"]) == {"erasekit_static_over_peft", "erasekit_gated_over_peft", "fused_over_peft",
                                      "plain_over_peft", "peft_over_plain"}
    assert set(results["paired_ratios"]) == set(results["ratios"]) - {"peft_over_plain"}
    assert set(results["meets_goals"]) == {"static", "gated"}
    assert results["adapters"]["modules_per_adapter"] == 4 * 4  # q, k, v, out of the tiny UNet's 4 attn2
    agreement = results["agreement"]
    # the adapters change the output (so agreeing means something) and erasekit's change is PEFT's
    assert agreement["adapter_effect_relative_to_output"] > 1e-3
    assert agreement["agree"]
    for variant in ("erasekit_static", "fused"):
        assert agreement[variant]["relative_to_output"] <= 1e-4
        assert agreement[variant]["relative_to_adapter_effect"] <= 1e-2


def test_uce_reference_transcription_matches_the_solve_and_the_record_says_so(tmp_path):
    path = peers.run("uce_reference", "sd1", 1, tmp_path)
    record = json.loads(path.read_text())
    assert path.name == "uce_reference.json" and set(record) == RECORD_KEYS
    cases = record["results"]
    assert set(cases) == {"uce_1_concept", "uce_100_concepts_500_preserve"}
    big = cases["uce_100_concepts_500_preserve"]
    assert (big["concepts"], big["preserve_prompts"], big["erase_keys"], big["preserve_keys"]) == (100, 500, 100, 500)
    assert set(big["median_solve_s"]) == {"ours", "reference"} and big["reference_over_ours"] > 0
    for case in cases.values():
        assert case["agree_fp64"] and case["max_relative_weight_diff"]["reference_fp64"] <= 1e-5
        assert case["condition_number"] >= 1


def test_the_uce_agreement_check_fails_for_a_different_edit():
    """The transcription is not trivially equal to the solve: another λ gives other weights."""
    pipe = tiny_pipeline("sd1")
    config = uce.UceConfig(concepts=("circle",), preserve=("square", "red"))
    modules = uce.find_targets(pipe, config.targets)
    keys = uce.collect_keys(pipe, config)
    edit = uce.solve(keys, 1.0, 1.0, config.lam)
    ours = uce.module_deltas(modules, edit.P, edit.Q)
    weights = {n: m.weight for n, m in modules.items()}
    for lam, agrees in ((config.lam, True), (2 * config.lam, False)):
        ref = peers.reference_uce(weights, keys, 1.0, 1.0, lam, torch.float64)
        diffs = [peers.relative(m.weight.double() + ours[f"unet.{n}"].dense().double(), ref[n])
                 for n, m in modules.items()]
        assert (max(diffs) <= 1e-5) == agrees


def test_shared_view_shares_the_base_tensors_but_not_the_owned_weights():
    pipe = tiny_pipeline("sd1")
    view = peers.shared_view(pipe, own=("attn2.to_k",))
    base, other = dict(pipe.unet.named_parameters()), dict(view.unet.named_parameters())
    assert set(base) == set(other)
    for name in base:
        assert (other[name] is base[name]) == (not name.endswith("attn2.to_k.weight"))
    assert view.unet is not pipe.unet and view.text_encoder is pipe.text_encoder


def test_unknown_perf_benchmark_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown perf benchmark"):
        run_perf(tmp_path / "out", only=["nope"])
    assert main(["bench", "perf", "--only", "nope", "--out-dir", str(tmp_path / "out")]) == 2
    assert "unknown perf benchmark(s) nope" in capsys.readouterr().err
    assert main(["bench", "--only", "peft_compare", "--out-dir", str(tmp_path / "out")]) == 2
    assert "--only names perf benchmarks" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
