"""erasekit bench (the tinyworld suite: rows, resume, table, plots) and erasekit bench perf's building blocks."""

import dataclasses
import json

import pytest
import torch

from erasekit.bench import SUITE, Budget, run_suite, table, trained_options
from erasekit.cli import main
from erasekit.methods import METHODS

TINY = Budget("test", prompts=1, seeds=(0,), preserve=2, attack_prompts=1, attack_entries=("shape",),
              trained_entries=("shape",), train_scale=0.05, timing_repeats=1)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, run_suite(TINY, out, methods=["uce"], attacks=["paraphrase"], progress=False)


def test_suite_rows_have_every_measure(bench):
    out, results = bench
    assert set(results["rows"]) == {f"uce/{e.name}" for e in SUITE if not e.methods or "uce" in e.methods}
    shape = results["rows"]["uce/shape"]
    assert shape["erasure_rate"] == 1.0 and shape["preservation_drop"] <= 0.5  # UCE erases circle on tinyworld
    assert 0 <= shape["preservation_broken"] <= 1 and shape["preservation_broken"] >= shape["preservation_drop"]
    assert set(shape["asr"]) == {"paraphrase"} and shape["seconds_per_attacked_prompt"]["paraphrase"] > 0
    assert shape["erase_seconds"] > 0 and shape["peak_memory_mb"] > 100 and shape["adapter_mb"] > 0
    assert "overhead" in shape["generation"]
    assert set(results["rows"]["uce/multi"]["per_concept"]) == {"circle", "square", "red", "striped"}
    composed = results["rows"]["uce/composed"]  # four adapters, one per concept, loaded together
    assert composed["adapters"] == 4 and set(composed["per_concept"]) == {"circle", "square", "red", "striped"}
    assert composed["erasure_rate"] >= 0.75 and composed["adapter_mb"] > shape["adapter_mb"] * 3
    assert "asr" not in results["rows"]["uce/colour"]  # attacks only on the budget's attack entries
    for key in ("date", "machine", "torch", "git_commit"):
        assert key in results["run"]
    assert shape["made"] == {"date": results["run"]["date"], "git_commit": results["run"]["git_commit"]}
    saved = json.loads((out / "results-test.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))


def test_outputs_table_plot_and_missing_items(bench):
    out, results = bench
    md = (out / "results-test.md").read_text()
    assert "| uce | shape | 100 |" in md
    assert "judge clip" in md and "judge nudenet" in md  # judges not used are stated with the reason
    assert "method spm: not in this run" in md and "attack unlearndiffatk: not in this run" in md
    assert (out / "results-test.png").stat().st_size > 1000
    assert "rows made earlier" not in md  # every row of this run
    older = json.loads(json.dumps(results))
    older["rows"]["uce/shape"]["made"]["git_commit"] = "0123abc"  # a row resumed or adopted from an earlier commit
    assert f"commit {older['run']['git_commit']} (rows made earlier at 0123abc) ·" in table(older)


def test_gated_entry_loads_the_composed_adapters_gated(tmp_path, monkeypatch):
    """A gated entry audits the composed entry's four adapters (copied, not erased again) each loaded through
    compose.gated: the row names its gate, and the audited pipeline held gated erasures; alone it erases its own."""
    import erasekit.api
    import erasekit.bench.suite as suite
    from erasekit import compose

    entries = (suite.Entry("composed", ("circle", "red"), composed=True),
               suite.Entry("gated", ("circle", "red"), composed=True, gate="tokencos"))
    monkeypatch.setattr(suite, "SUITE", entries)
    erased, gated, real_erase, real_gated = [], [], erasekit.api.erase, compose.gated
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: erased.append(a[2]) or real_erase(*a, **k))
    monkeypatch.setattr(compose, "gated", lambda *a, **k: gated.append(k["metric"]) or real_gated(*a, **k))
    rows = run_suite(TINY, tmp_path, methods=["uce"], attacks=[], progress=False)["rows"]
    assert erased == [["circle"], ["red"]] and gated == ["tokencos"] * 2  # each adapter gated once, then loaded
    assert rows["uce/gated"]["gate"] == "tokencos" and "gate" not in rows["uce/composed"]
    assert rows["uce/gated"]["erase_seconds"] == rows["uce/composed"]["erase_seconds"]
    assert rows["uce/gated"]["adapters"] == 2 and rows["uce/gated"]["erasure_rate"] >= 0.5
    for name in ("adapter-circle.safetensors", "adapter-red.safetensors"):
        assert ((tmp_path / ".bench-test" / "uce" / "gated" / name).read_bytes()
                == (tmp_path / ".bench-test" / "uce" / "composed" / name).read_bytes())
    erased.clear()
    monkeypatch.setattr(suite, "SUITE", entries[1:])  # no composed entry made: the gated one erases its own
    rows = run_suite(TINY, tmp_path / "alone", methods=["uce"], attacks=[], progress=False)["rows"]
    assert erased == [["circle"], ["red"]] and set(rows) == {"uce/gated"}


@pytest.mark.parametrize("order", ["single first", "composed first"])
def test_rows_of_a_method_share_the_same_erasure_instead_of_making_it_twice(tmp_path, monkeypatch, order):
    """The composed row's circle adapter is the shape row's erasure (same method, options, config, budget): whichever
    row comes second copies it, bit for bit, with the time its making took, and names where it came from; the
    composed row makes the erasures no other row makes first. The rows equal those of runs that make every adapter."""
    import erasekit.api
    import erasekit.bench.suite as suite

    shape, composed = suite.Entry("shape", ("circle",)), suite.Entry("composed", ("circle", "red"), composed=True)
    monkeypatch.setattr(suite, "SUITE", (shape, composed) if order == "single first" else (composed, shape))
    erased, real_erase = [], erasekit.api.erase
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: erased.append(a[2]) or real_erase(*a, **k))
    rows = run_suite(TINY, tmp_path, methods=["uce"], attacks=[], progress=False)["rows"]
    assert erased == ([["circle"], ["red"]] if order == "single first" else [["red"], ["circle"]])
    job = tmp_path / ".bench-test" / "uce"
    assert (job / "shape" / "adapter.safetensors").read_bytes() == (job / "composed" / "adapter-circle.safetensors").read_bytes()
    copied, source = (("composed", "shape/adapter.safetensors") if order == "single first"
                      else ("shape", "composed/adapter-circle.safetensors"))
    assert rows[f"uce/{copied}"]["reused"] == [source]
    assert rows["uce/composed"]["erase_seconds"] == round(sum(
        json.loads((job / "composed" / f"adapter-{c}.json").read_text())["erase_seconds"] for c in ("circle", "red")), 2)
    for entry in (shape, composed):  # each row alone, every adapter made: the same numbers
        monkeypatch.setattr(suite, "SUITE", (entry,))
        alone = run_suite(TINY, tmp_path / entry.name, methods=["uce"], attacks=[], progress=False)["rows"]
        key = f"uce/{entry.name}"
        assert "reused" not in alone[key]
        for measure in ("per_concept", "erasure_rate", "preservation_drop", "adapter_mb"):
            assert alone[key][measure] == rows[key][measure], (key, measure)


def test_a_killed_composed_row_resumes_from_the_adapters_it_finished(tmp_path, monkeypatch):
    """A composed row saves each adapter as it is made: killed while making the second, the rerun makes only that."""
    import erasekit.api
    import erasekit.bench.suite as suite

    monkeypatch.setattr(suite, "SUITE", (suite.Entry("composed", ("circle", "red"), composed=True),))
    erased, real_erase = [], erasekit.api.erase

    def killed_at_red(*a, **k):
        erased.append(a[2])
        if a[2] == ["red"]:
            raise KeyboardInterrupt
        return real_erase(*a, **k)

    monkeypatch.setattr(erasekit.api, "erase", killed_at_red)
    with pytest.raises(KeyboardInterrupt):
        run_suite(TINY, tmp_path, methods=["uce"], attacks=[], progress=False)
    job = tmp_path / ".bench-test" / "uce" / "composed"
    assert sorted(p.name for p in job.iterdir()) == ["adapter-circle.json", "adapter-circle.safetensors"]
    circle = (job / "adapter-circle.safetensors").read_bytes()
    first = json.loads((job / "adapter-circle.json").read_text())["erase_seconds"]
    erased.clear()
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: erased.append(a[2]) or real_erase(*a, **k))
    row = run_suite(TINY, tmp_path, methods=["uce"], attacks=[], progress=False)["rows"]["uce/composed"]
    assert erased == [["red"]] and (job / "adapter-circle.safetensors").read_bytes() == circle
    red = json.loads((job / "adapter-red.json").read_text())["erase_seconds"]
    assert row["adapters"] == 2 and row["erase_seconds"] == round(first + red, 2) and row["erasure_rate"] >= 0.5


def test_rerun_resumes_without_recomputing(bench, monkeypatch):
    out, results = bench
    state = out / ".bench-test" / "results-test.json"  # the resume state, in the cache
    saved = json.loads(state.read_text())
    del saved["rows"]["uce/texture"]  # as if killed during that row
    state.write_text(json.dumps(saved))
    erased = []
    import erasekit.api

    real = erasekit.api.erase
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: erased.append(a[1]) or real(*a, **k))
    again = run_suite(TINY, out, methods=["uce"], attacks=["paraphrase"], progress=False)
    assert erased == []  # the adapter of the unfinished row is cached; finished rows are skipped
    assert again["rows"]["uce/texture"]["erasure_rate"] == results["rows"]["uce/texture"]["erasure_rate"]
    assert list(again["rows"]) == [k for k in results["rows"] if k != "uce/texture"] + ["uce/texture"]


def test_rows_share_the_original_images(tmp_path, monkeypatch):
    """The audits of every row read the originals that the first row generated (the cache in the work folder)."""
    import erasekit.api
    from erasekit import compose
    from erasekit import generate as G

    events = []
    real_generate, real_erase = G.generate, erasekit.api.erase

    def generate(pipe, prompts, seeds, **kwargs):
        erasures = compose.list_erasures(pipe)
        if erasures and not any(e["enabled"] for e in erasures):  # an original image: erasures loaded, disabled
            events.append(len(prompts))
        return real_generate(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(G, "generate", generate)
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: events.append(a[1]) or real_erase(*a, **k))
    results = run_suite(TINY, tmp_path, methods=["uce", "time"], attacks=[], entries=["colour"], progress=False)
    assert set(results["rows"]) == {"uce/colour", "time/colour"}
    first = events[1:events.index("time")]
    assert events[0] == "uce" and sum(first) > 0 and events[events.index("time") + 1:] == []
    assert len(list((tmp_path / ".bench-test" / "base-images").glob("*/*.png"))) == sum(first)


def test_rows_made_with_another_config_are_redone(bench, monkeypatch):
    out, results = bench
    work = out / ".bench-test"
    state = work / "results-test.json"
    saved = json.loads(state.read_text())
    assert saved["rows"]["uce/shape"]["config"]["concepts"] == ["circle"]  # rows record what made them
    saved["rows"]["uce/shape"]["config"]["lam"] = 0.123  # as if made before a preset changed
    state.write_text(json.dumps(saved))
    info = json.loads((work / "uce" / "shape" / "erase.json").read_text())
    info["config"]["lam"] = 0.123
    (work / "uce" / "shape" / "erase.json").write_text(json.dumps(info))
    erased = []
    import erasekit.api

    real = erasekit.api.erase
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: erased.append(a[1]) or real(*a, **k))
    again = run_suite(TINY, out, methods=["uce"], attacks=[], progress=False)
    # that row only, its stale adapter too: copied from the composed row, which made circle with the current config
    assert erased == [] and again["rows"]["uce/shape"]["reused"] == ["composed/adapter-circle.safetensors"]
    assert again["rows"]["uce/shape"]["config"]["lam"] != 0.123
    assert again["rows"]["uce/shape"]["erasure_rate"] == results["rows"]["uce/shape"]["erasure_rate"]


def test_rows_audited_on_another_preservation_set_are_audited_again(bench, monkeypatch):
    """A row whose preservation prompts are not today's (``preserve_set``) is marked in the table and audited again
    by the next run: its cached adapter kept (nothing erased), the time its making took kept; a run of other
    methods then adopts a row another run audited again (an ``--entries`` run into the same cache)."""
    import erasekit.api
    from erasekit.bench.suite import preservation_digest

    out, results = bench
    work = out / ".bench-test"
    state = work / "results-test.json"
    saved = json.loads(state.read_text())
    texture = next(e for e in SUITE if e.name == "texture")
    assert saved["rows"]["uce/texture"]["preserve_set"] == preservation_digest(texture, TINY.preserve)
    row = saved["rows"]["uce/texture"]
    row["preserve_set"], row["row_seconds"], row["preservation_drop"] = "0123456789ab", 123.0, 0.5
    state.write_text(json.dumps(saved))
    line = next(l for l in table(saved).splitlines() if l.startswith("| uce | texture |"))
    assert "50.0 °" in line and "° 1 rows' preservation drop" in table(saved)
    erased = []
    real = erasekit.api.erase
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: erased.append(a[1]) or real(*a, **k))
    sub = run_suite(TINY, out, methods=["uce"], attacks=["paraphrase"], entries=["texture"], progress=False)
    again = sub["rows"]["uce/texture"]
    assert erased == [] and again["preserve_set"] == preservation_digest(texture, TINY.preserve)
    assert again["preservation_drop"] == results["rows"]["uce/texture"]["preservation_drop"]
    assert again["row_seconds"] == 123.0 and again["reaudit_seconds"] > 0
    assert json.loads(state.read_text())["rows"]["uce/texture"]["preservation_drop"] == 0.5  # not this file's run
    whole = run_suite(TINY, out, methods=["time"], attacks=[], progress=False)  # uce's rows: assembled
    assert erased == ["time"] * 4 and whole["rows"]["uce/texture"] == json.loads(json.dumps(again))
    assert "°" not in table(whole)


def test_rows_that_record_no_config_are_redone(bench, monkeypatch):
    """A cached row or adapter from before rows recorded their config cannot be checked, so it is made again."""
    out, results = bench
    work = out / ".bench-test"
    state = work / "results-test.json"
    saved = json.loads(state.read_text())
    del saved["rows"]["uce/colour"]["config"]
    saved["rows"]["uce/colour"]["erasure_rate"] = -1
    state.write_text(json.dumps(saved))
    info = json.loads((work / "uce" / "colour" / "erase.json").read_text())
    del info["config"]
    (work / "uce" / "colour" / "erase.json").write_text(json.dumps(info))
    erased = []
    import erasekit.api

    real = erasekit.api.erase
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: erased.append(a[2]) or real(*a, **k))
    again = run_suite(TINY, out, methods=["uce"], attacks=["paraphrase"], progress=False)
    # that row only, its adapter too: copied from the composed row, which records its config
    assert erased == [] and again["rows"]["uce/colour"]["reused"] == ["composed/adapter-red.safetensors"]
    assert again["rows"]["uce/colour"]["erasure_rate"] == results["rows"]["uce/colour"]["erasure_rate"]
    assert "config" in again["rows"]["uce/colour"]


def test_entry_subsets_share_the_cache_and_another_budget_redoes_its_rows(bench, monkeypatch):
    out, _ = bench
    work = out / ".bench-test"
    erased = []
    import erasekit.api

    real = erasekit.api.erase
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: erased.append(a[1]) or real(*a, **k))
    sub = run_suite(TINY, out, methods=["uce"], attacks=["paraphrase"], entries=["colour"], progress=False)
    assert list(sub["rows"]) == ["uce/colour"] and (out / "results-test-colour.json").exists()
    assert erased == []  # a run of some entries (its own results file) reuses the adapters cached by another run
    assert (work / "uce" / "shape" / "adapter.safetensors").exists()  # and leaves the other entries' cache alone
    main_state = work / "results-test.json"
    saved = json.loads(main_state.read_text())
    saved["rows"]["uce/colour"] = {"method": "uce", "entry": "colour", "erasure_rate": -1}  # a row without config
    main_state.write_text(json.dumps(saved))
    whole = run_suite(TINY, out, methods=["uce"], attacks=["paraphrase"], progress=False)
    same = json.loads(json.dumps(sub["rows"]["uce/colour"]))
    assert json.loads(json.dumps(whole["rows"]["uce/colour"])) == same  # the subset's row, made with this config
    run_suite(dataclasses.replace(TINY, preserve=3), out, methods=["uce"], attacks=["paraphrase"],
              entries=["colour"], progress=False)
    assert erased == ["uce"]  # another budget: the cached audits are stale, so that row is made again
    assert json.loads((work / "uce" / "colour" / "erase.json").read_text())["budget"]["preserve"] == 3


def test_trained_methods_scale_their_budget():
    assert trained_options("uce", ["circle"], 0.2) == {}
    esd = trained_options("esd-x", ["circle"], 0.2)
    full = METHODS["esd-x"].make_config(["circle"], tinyworld=True).iterations
    assert esd["iterations"] == round(full * 0.2) and esd["progress"] is False
    assert "epochs" in trained_options("fewshot", ["circle"], 0.5)
    adv = trained_options("advunlearn", ["circle"], 0.25)  # its inner attack is training cost too
    config = METHODS["advunlearn"].make_config(["circle"], tinyworld=True)
    assert (adv["iterations"], adv["attack_steps"]) == (round(config.iterations / 4), round(config.attack_steps / 4))


def test_budget_method_scale_and_records_from_before_a_field_existed():
    import dataclasses

    from erasekit.bench import BUDGETS

    quick = BUDGETS["quick"]
    assert quick.scale_for("advunlearn") == 0.25 and quick.scale_for("esd-x") == quick.train_scale
    assert "advunlearn-fast" in dict(quick.omitted) and not BUDGETS["full"].omitted
    record = json.loads(json.dumps(dataclasses.asdict(BUDGETS["full"])))
    assert BUDGETS["full"].same_as(record)
    del record["method_scale"]  # a results file written before the field: still this budget (default value)
    assert BUDGETS["full"].same_as(record)
    assert not quick.same_as(record) and not quick.same_as({k: v for k, v in record.items() if k != "name"} | {
        "name": "quick"})


def test_cli_bench_errors(tmp_path, capsys):
    assert main(["bench", "--quick", "--methods", "nope", "--out-dir", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--attacks", "nope", "--out-dir", str(tmp_path)]) == 2
    assert not list(tmp_path.glob("results*"))
    if not torch.cuda.is_available():
        assert main(["bench", "perf", "--device", "cuda", "--out-dir", str(tmp_path)]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err


def test_cli_bench_processes(monkeypatch, capsys):
    """`--processes auto` is one process per CPU core (capped) and one on a GPU or under a launcher; the processes
    it starts get the same bench arguments; a bad selection is refused once, before any process starts."""
    from erasekit.cli import build_parser
    from erasekit.cli.commands import MAX_LOCAL_PROCESSES, bench_argv, bench_processes
    from erasekit.core import processes

    parse = lambda *a: build_parser("bench").parse_args(["bench", *a])  # noqa: E731
    monkeypatch.setattr(processes, "cpu_cores", lambda: 2)
    for name in processes.WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert bench_processes(parse("--quick", "--device", "cpu")) == 2
    assert bench_processes(parse("--device", "cpu", "--processes", "1")) == 1
    assert bench_processes(parse("--device", "cpu", "--processes", "3")) == 3
    assert bench_processes(parse("perf", "--device", "cpu")) == 1
    monkeypatch.setattr(processes, "cpu_cores", lambda: 64)
    assert bench_processes(parse("--device", "cpu")) == MAX_LOCAL_PROCESSES
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert bench_processes(parse("--device", "cpu", "--processes", "4")) == 1  # launched: the launcher's processes
    args = parse("--quick", "--methods", "uce", "spm", "--attacks", "p4d", "--entries", "shape", "--out-dir", "b",
                 "--work", "w", "--device", "cpu", "--processes", "2")
    again = parse(*bench_argv(args)[1:])
    assert {k: v for k, v in vars(again).items() if k != "processes"} == {
        k: v for k, v in vars(args).items() if k != "processes"}
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["bench", "--quick", "--methods", "nope", "--processes", "2"]) == 2
    err = capsys.readouterr()
    assert "unknown method 'nope'" in err.err and "processes share" not in err.out
    assert main(["bench", "--processes", "0"]) == 2 and "must be at least 1" in capsys.readouterr().err


def test_bench_help_names_every_suite_entry():
    """The CLI's help lists the entries without importing the suite (torch): it must keep up with SUITE."""
    from erasekit.cli import build_parser

    bench = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                 if "--entries" in a.option_strings)
    assert bench.help.split(":", 1)[1].split("(")[0].split() == [e.name for e in SUITE]


def test_rows_are_dealt_longest_first_to_the_least_loaded_process():
    from erasekit.bench.shards import deal, longest_first

    keys = ["a", "b", "c", "d", "e"]
    assert [deal(keys, r, 2) for r in (0, 1)] == [{"a", "c", "e"}, {"b", "d"}]  # no times: in turn
    seconds = {"a": 10.0, "b": 1.0, "c": 9.0, "d": 2.0}  # "e" unknown: as long as the longest
    shares = [deal(keys, r, 3, seconds) for r in range(3)]
    assert shares == [{"a", "b"}, {"e"}, {"c", "d"}]
    assert set().union(*shares) == set(keys) and sum(map(len, shares)) == len(keys)
    assert deal([], 0, 2, seconds) == set() and deal(keys, 0, 1, seconds) == set(keys)
    assert longest_first(keys, seconds) == ["a", "e", "c", "d", "b"] and longest_first(keys, {}) == keys


def test_rows_without_earlier_times_are_dealt_by_a_guess_that_spreads_the_trained_ones():
    from erasekit.bench.shards import deal
    from erasekit.bench.suite import BUDGETS, SUITE, _guessed_seconds

    entries = {e.name: e for e in SUITE}
    jobs = [(m, entries[e], {}, None) for m, e in [("uce", "shape"), ("esd-x", "shape"), ("uce", "colour"),
                                                   ("spm", "shape"), ("uce", "composed"), ("time", "shape")]]
    guess = _guessed_seconds(jobs, BUDGETS["quick"])
    assert guess["esd-x/shape"] > guess["uce/shape"] > guess["uce/composed"] > guess["uce/colour"]
    shares = [deal(list(guess), r, 2, guess) for r in (0, 1)]
    assert {len(share & {"esd-x/shape", "spm/shape"}) for share in shares} == {1}  # one trained row each


def test_table_of_empty_results_names_every_method():
    md = table({"budget": {"name": "quick"}, "run": {}, "rows": {}})
    assert all(f"method {m}" in md for m in METHODS)


def test_table_gives_each_concept_of_a_multi_concept_row_its_union_asr(bench):
    out, results = bench
    assert "| uce | multi | circle | 100 | 100 | not attacked | – |" in (out / "results-test.md").read_text()
    rows = json.loads(json.dumps(results["rows"]))
    per = {"circle": {"erasure_rate": 1.0, "paraphrase_erasure_rate": 0.5, "union_asr": 1 / 3,
                      "asr": {"p4d": 1 / 6, "cce": 1 / 3}},
           "red": {"erasure_rate": 0.75, "paraphrase_erasure_rate": 1.0, "union_asr": 0.0,
                   "asr": {"p4d": 0.0, "cce": 0.0}}}
    rows["uce/multi"].update(per_concept=per, asr={"p4d": 1 / 12, "cce": 1 / 6}, union_asr=1 / 6)
    md = table({**results, "rows": rows})
    assert "| uce | multi | circle | 100 | 50 | 33 | cce (33) |" in md
    assert "| uce | multi | red | 75 | 100 | 0 | p4d (0) |" in md
    assert "| uce | shape | circle |" not in md  # one concept: the main table says it all


def test_real_shape_pipelines_have_the_real_widths():
    from erasekit.testing import real_shape_pipeline, unet_inputs

    with torch.device("meta"):
        xl = real_shape_pipeline("sdxl")
    assert xl.unet.config.cross_attention_dim == 2048
    assert xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size == 2048
    assert 2.5e9 < sum(p.numel() for p in xl.unet.parameters()) < 2.7e9
    inputs = unet_inputs(xl.unet, 2, "meta", torch.float16)
    assert inputs["added_cond_kwargs"]["time_ids"].shape == (2, 6)


def test_compose_overhead_runs_on_tinyworld():
    from erasekit.bench.perf import compose_overhead

    rows = compose_overhead.run("tinyworld", repeats=1, counts=(1,))
    assert {"plain", "static_1", "gated_1"} <= set(rows) and rows["steps_per_image"] == 10
    assert rows["gated_1"]["modules_per_adapter"] > rows["static_1"]["modules_per_adapter"]


def test_a_method_run_alone_is_added_to_the_committed_results(bench, tmp_path):
    """Adding a method is one command: `bench --methods NAME` on a fresh clone (the committed results file, no
    cache) keeps every other method's committed rows and makes NAME's again instead of resuming them."""
    out, results = bench
    saved = json.loads((out / "results-test.json").read_text())
    other = {**saved["rows"]["uce/shape"], "erasure_rate": 0.25}
    saved["rows"] = {"time/shape": other, "uce/shape": {**other, "erasure_rate": -1.0}}
    (tmp_path / "results-test-shape.json").write_text(json.dumps(saved))
    again = run_suite(TINY, tmp_path, methods=["uce"], attacks=[], entries=["shape"], progress=False)
    assert again["rows"]["time/shape"] == other  # kept as committed
    assert again["rows"]["uce/shape"]["erasure_rate"] == 1.0  # made again, not the stale committed row
    written = json.loads((tmp_path / "results-test-shape.json").read_text())
    assert set(written["rows"]) == {"time/shape", "uce/shape"}


def test_a_second_bench_on_the_same_results_is_refused_and_writes_nothing(tmp_path):
    from erasekit.errors import BusyError
    from erasekit.core.files import exclusive_lock

    work = tmp_path / "work"
    work.mkdir()
    with exclusive_lock(work / ".results-test.lock", "a bench in another process"):
        with pytest.raises(BusyError, match="in use by another erasekit process"):
            run_suite(TINY, tmp_path, methods=["uce"], attacks=["paraphrase"], work_dir=work, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert [p.name for p in work.iterdir()] == [".results-test.lock"]


def test_a_row_another_bench_is_making_is_left_to_it(tmp_path, monkeypatch):
    """Runs of other --entries share the cache; a row that one of them is making (its job lock held) is not made
    twice: the run leaves it out, saves the rest and says so; a row of that key made with another config is not
    taken for it."""
    from erasekit.errors import BusyError
    from erasekit.core.files import exclusive_lock
    import erasekit.api

    erased = []
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: erased.append(a[1]))
    (tmp_path / "work" / "uce").mkdir(parents=True)
    stale = {"method": "uce", "entry": "shape", "config": {"concepts": ["circle"], "lam": 123.0}, "erasure_rate": 0.5}
    (tmp_path / "work" / "results-test-other.json").write_text(  # another run's row of another config: not adopted
        json.dumps({"budget": TINY.record(), "rows": {"uce/shape": stale}}))
    with exclusive_lock(tmp_path / "work" / "uce" / ".shape.lock", "a bench of other entries"):
        with pytest.raises(BusyError, match="uce/shape are being made by another erasekit bench"):
            run_suite(TINY, tmp_path, methods=["uce"], attacks=["paraphrase"], entries=["shape"],
                      work_dir=tmp_path / "work", progress=False)
    assert erased == [] and not (tmp_path / "work" / "uce" / "shape").exists()
    assert json.loads((tmp_path / "results-test-shape.json").read_text())["rows"] == {}


def test_bench_keeps_the_readme_table_true(bench, tmp_path):
    """A bench writing into a repository's benchmarks/ folder rewrites the README's table between its markers (and
    nothing else), so adding a method's rows needs no hand edit; a README without markers is left alone."""
    from erasekit.bench.report import update_readme

    out, results = bench
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:full -->\nold table\n<!-- /bench:full -->\nafter\n")
    assert update_readme(readme, results, "full")
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert all(row in text for row in table(results).split("\n\n")[1].splitlines())
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, results, "full") and plain.read_text() == "no markers\n"


def test_closed_form_methods_come_from_the_registry():
    """The bench's budget per method follows the registry's family: nothing to edit in the bench for a new method."""
    from erasekit.bench import CLOSED_FORM

    assert set(CLOSED_FORM) == {name for name, spec in METHODS.items() if spec.family == "closed-form"}
    assert {"uce", "time", "rece", "safree"} == set(CLOSED_FORM)
    assert all(spec.family in ("closed-form", "trained") for spec in METHODS.values())
