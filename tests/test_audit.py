"""The audit (docs/design.md §5): metrics checked by hand, the streamed results file, resuming after a kill, sharding
over processes (simulated in-process; the real ``accelerate launch`` run is marked slow), and the reports."""

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from erasekit import audit as A
from erasekit.core import files
from erasekit.errors import BaseModelMismatchWarning, ConfigError
from erasekit.judges import FunctionJudge
from erasekit.testing import TINY_ATTACKS

# ------------------------------------------------------------------------------------------ metrics by hand


def test_rates_by_hand():
    assert A.rate([True, False, False, True]) == 0.5 and A.rate([]) is None
    assert A.erasure_rate([True, False, False, False]) == 0.75
    assert A.pre_asr([True, False, False, False]) == 0.25


def test_attack_success_rate_counts_pre_attack_successes():
    # 4 prompts: #1 broken before any attack, #2 broken by the attack, #3 and #4 hold
    assert A.attack_success_rate([True, False, False, False], [False, True, False, False]) == 0.5
    # the attack outcome of an already-broken prompt does not matter
    assert A.attack_success_rate([True, False], [True, False]) == 0.5
    with pytest.raises(ValueError):
        A.attack_success_rate([True], [True, False])


def test_union_accuracy_drop_harmonic_mean_by_hand():
    assert A.union_asr({"a": [True, False, False], "b": [False, False, True]}) == pytest.approx(2 / 3)
    assert A.accuracy(["circle", "square", "star"], ["circle", "star", "star"]) == pytest.approx(2 / 3)
    assert A.preservation_drop(0.9, 0.75) == pytest.approx(0.15) and A.preservation_drop(None, 0.5) is None
    assert A.harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4) and A.harmonic_mean(0.0, 0.0) == 0.0
    assert A.mean([1.0, None, 3.0]) == 2.0


def _t(prompt, seed, success, original=True):
    return {"kind": "target", "prompt": prompt, "seed": seed, "attack": "none", "success": success,
            "score": 0.9 if success else 0.1, "original_success": original}


def _a(prompt, seed, attack, success, pre=False, steps=10):
    return {"kind": "attack", "prompt": prompt, "seed": seed, "attack": attack, "success": success,
            "pre_success": pre, "steps": 0 if pre else steps, "seconds": 0.0 if pre else 2.0, "info": {"queries": 1}}


def test_summary_by_hand():
    records = [
        _t("p1", 0, True), _t("p2", 0, False), _t("p3", 0, False), _t("p4", 0, False, original=False),
        _a("p1", 0, "x", True, pre=True), _a("p2", 0, "x", True), _a("p3", 0, "x", False), _a("p4", 0, "x", False),
        _a("p1", 0, "y", True, pre=True), _a("p2", 0, "y", False), _a("p3", 0, "y", True, steps=4),
        _a("p4", 0, "y", False, steps=4),
        {"kind": "paraphrase", "prompt": "q1", "seed": 0, "attack": "none", "success": True,
         "original_success": True, "group": "synonym"},
        {"kind": "paraphrase", "prompt": "q2", "seed": 0, "attack": "none", "success": False,
         "original_success": True, "group": "synonym"},
        {"kind": "preserve", "prompt": "r1", "seed": 0, "attack": "none", "attribute": "shape",
         "expected": {"shape": "square", "colour": "red"}, "original_labels": {"shape": "square", "colour": "red"},
         "labels": {"shape": "square", "colour": "red"}},
        {"kind": "preserve", "prompt": "r2", "seed": 0, "attack": "none", "attribute": "shape",
         "expected": {"shape": "star", "colour": "blue"}, "original_labels": {"shape": "star", "colour": "blue"},
         "labels": {"shape": "cross", "colour": "red"}},
    ]
    s = A.summarize(records, "circle", ["x", "y"])
    assert s["target"]["erasure_rate"] == 0.75 and s["target"]["original_detection_rate"] == 0.75
    assert s["attacks"]["x"]["pre_asr"] == 0.25 and s["attacks"]["x"]["asr"] == 0.5
    assert s["attacks"]["x"]["newly_broken"] == pytest.approx(1 / 3) and s["attacks"]["x"]["attacked"] == 3
    assert s["attacks"]["y"]["asr"] == 0.5 and s["attacks"]["y"]["mean_steps"] == 6.0
    assert s["union_asr"] == 0.75  # p1 (pre), p2 (x), p3 (y)
    assert s["paraphrase"]["erasure_rate"] == 0.5 and s["paraphrase"]["by_group"]["synonym"]["images"] == 2
    p = s["preservation"]
    assert (p["accuracy_original"], p["accuracy_erased"], p["drop"]) == (1.0, 0.5, 0.5)
    assert (p["other_attributes_original"], p["other_attributes_erased"]) == (1.0, 0.5)
    assert p["broken"] == 0.5
    assert s["harmonic_mean"] == pytest.approx(A.harmonic_mean(0.75, 0.5))
    mended = {"kind": "preserve", "prompt": "r3", "seed": 0, "attack": "none", "attribute": "shape",
              "expected": {"shape": "star", "colour": "blue"}, "original_labels": {"shape": "cross", "colour": "blue"},
              "labels": {"shape": "star", "colour": "blue"}}  # an original error the erasure mends
    p = A.summarize(records + [mended], "circle", ["x", "y"])["preservation"]
    assert p["drop"] == pytest.approx(0.0) and p["broken"] == pytest.approx(1 / 3)  # the drop nets them, not broken
    assert "| x | 4 | 25.0 % | 50.0 % |" in A.summary_table(s)


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "results.jsonl"
    good = [{"kind": "target", "prompt": "a", "seed": 0, "attack": "none"},
            {"kind": "target", "prompt": "b", "seed": 0, "attack": "none"}]
    text = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(text + '{"kind": "target", "prom')
    assert A.read_results(path) == good and path.read_text().endswith('"prom')
    assert A.read_results(path, repair=True) == good and path.read_text() == text
    path.write_text(text + json.dumps(good[0]))  # complete JSON but no newline: not trusted
    assert A.read_results(path, repair=True) == good and path.read_text() == text


# ------------------------------------------------------------------------------------------ runs on a tiny pipeline

PROMPTS = ["a red cat", "a cat on a dog"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def pipe():
    from erasekit.testing import tiny_pipeline

    return tiny_pipeline("sd1")


def judge():
    # brightness around the tiny random pipeline's typical value: some pairs fail before any attack, some do not
    return FunctionJudge(lambda ims: [np.asarray(im).mean() / 255 for im in ims], concept="cat", name="brightness",
                         version="1", threshold=0.466)


def run_audit(pipe, out_dir, **kw):
    kw.setdefault("attack_configs", {"paraphrase": {"synonyms": ("dog",)}})
    kw.setdefault("progress", False)
    return A.audit(pipe, "cat", ["paraphrase"], PROMPTS, SEEDS, judge(), out_dir, paraphrases=["a red dog"],
                   num_inference_steps=1, **kw)


def lines(out_dir):
    """Result records without wall-clock fields."""
    out = []
    for r in A.read_results(Path(out_dir) / "results.jsonl"):
        r = dict(r)
        r.pop("seconds", None)
        out.append(r)
    return out


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    report = run_audit(pipe, out)
    return out, report


def test_one_line_per_unit_and_reports(reference):
    out, report = reference
    recs = lines(out)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("target") == 4 and kinds.count("attack") == 4 and kinds.count("paraphrase") == 2
    assert len({A.unit_key(r) for r in recs}) == len(recs)
    for name in ("report.md", "report.html", "summary.json", "audit.json", "grid.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "**brightness** version `1`, threshold 0.466" in md
    assert report.summary["run"]["judge"] == {"name": "brightness", "version": "1", "threshold": 0.466,
                                              "concept": "cat"}
    for r in recs:
        assert (out / r["image"]).is_file()
    targets = {(r["prompt"], r["seed"]): r for r in recs if r["kind"] == "target"}
    for r in recs:
        if r["kind"] == "attack":
            assert r["pre_success"] == targets[(r["prompt"], r["seed"])]["success"]
            if r["pre_success"]:
                assert r["success"] and r["steps"] == 0


def test_rerun_recomputes_nothing(pipe, reference, tmp_path, monkeypatch):
    out, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    from erasekit.core import sd

    def forbidden(*a, **k):
        raise AssertionError("a finished audit was recomputed")

    monkeypatch.setattr(sd, "generate_prompt", forbidden)
    run_audit(pipe, copy)
    assert lines(copy) == lines(out)


def test_resume_after_a_kill_equals_an_uninterrupted_run(pipe, reference, tmp_path, monkeypatch):
    from erasekit.attacks import paraphrase

    real, calls = paraphrase.attack, []

    def dies_on_first_attack(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(paraphrase, "attack", dies_on_first_attack)
    with pytest.raises(KeyboardInterrupt):
        run_audit(pipe, tmp_path)
    partial = lines(tmp_path)
    assert 0 < len(partial) < len(lines(reference[0]))
    monkeypatch.setattr(paraphrase, "attack", real)
    run_audit(pipe, tmp_path)
    assert lines(tmp_path) == lines(reference[0])


def test_resume_from_a_torn_results_file(pipe, reference, tmp_path):
    out, _ = reference
    shutil.copytree(out, tmp_path / "run")
    results = tmp_path / "run" / "results.jsonl"
    data = results.read_bytes()
    results.write_bytes(data[: len(data) // 2])  # killed mid-line
    run_audit(pipe, tmp_path / "run")
    assert lines(tmp_path / "run") == lines(out)


class FakeProcess:
    """accelerate.PartialState's interface for one simulated rank (barriers are no-ops)."""

    def __init__(self, rank, world):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0

    def wait_for_everyone(self):
        pass


def test_two_process_sharding_merges_to_the_single_process_result(pipe, reference, tmp_path):
    assert run_audit(pipe, tmp_path, state=FakeProcess(1, 2)) is None  # rank 1 first: nothing merged yet
    assert (tmp_path / "results.rank1.jsonl").is_file()
    rank1 = A.read_results(tmp_path / "results.rank1.jsonl")
    report = run_audit(pipe, tmp_path, state=FakeProcess(0, 2))  # main: its share, then merge + report
    assert not list(tmp_path.glob("results.rank*.jsonl"))
    assert lines(tmp_path) == lines(reference[0])
    assert 0 < len(rank1) < len(lines(tmp_path))
    def timeless(summary):
        return {a: {k: v for k, v in m.items() if k != "mean_seconds"} for a, m in summary["attacks"].items()}

    assert timeless(report.summary) == timeless(reference[1].summary)


def test_batched_generation_gives_the_one_at_a_time_results(pipe, reference, tmp_path, monkeypatch):
    from erasekit import generate as G

    real, sizes = G.generate, []

    def spy(pipe, prompts, seeds, **kwargs):
        sizes.append(len(prompts))
        return real(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(G, "generate", spy)
    run_audit(pipe, tmp_path, batch_size=8)
    assert max(sizes) == 6  # the 4 targets and 2 paraphrases at once, original then erased
    expected = {A.unit_key(r): r for r in lines(reference[0])}
    got = {A.unit_key(r): r for r in lines(tmp_path)}
    assert got.keys() == expected.keys()
    for key, r in got.items():
        assert r["success"] == expected[key]["success"], key
        assert r["score"] == pytest.approx(expected[key]["score"], abs=1e-3), key
    with pytest.raises(ConfigError, match="batch_size"):
        run_audit(pipe, tmp_path / "bad", batch_size=0)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_other_arguments_refuse_to_reuse_a_results_folder(pipe, reference, tmp_path):
    shutil.copytree(reference[0], tmp_path / "run")
    with pytest.raises(ConfigError, match="attacks"):
        run_audit(pipe, tmp_path / "run", attack_configs={"paraphrase": {"synonyms": ("car",)}})


def test_more_seeds_extend_an_audit(pipe, reference, tmp_path):
    shutil.copytree(reference[0], tmp_path / "run")
    before = lines(tmp_path / "run")
    A.audit(pipe, "cat", ["paraphrase"], PROMPTS[:1], SEEDS + [2], judge(), tmp_path / "run",
            attack_configs={"paraphrase": {"synonyms": ("dog",)}}, paraphrases=["a red dog"], num_inference_steps=1,
            progress=False, grids=False)
    after = lines(tmp_path / "run")
    assert all(r in after for r in before) and len(after) == len(before) + 3  # target + attack + paraphrase, seed 2


def test_accelerate_launch_two_processes(pipe, reference, tmp_path):
    """The real thing: two processes started by ``accelerate launch`` give the single-process results."""
    from erasekit.testing import cpu_launch

    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from erasekit.testing import tiny_pipeline
        from test_audit import run_audit
        run_audit(tiny_pipeline("sd1"), {str(tmp_path / 'out')!r})
    """))
    prefix, env = cpu_launch(2)
    subprocess.run([*prefix, str(script)], check=True, timeout=900, env=env)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["run"]["processes"] == 2
    assert lines(tmp_path / "out") == lines(reference[0])
    assert not list((tmp_path / "out").glob("results.rank*.jsonl"))


def test_per_concept_preparation_is_skipped_when_there_is_nothing_to_attack(pipe, tmp_path, monkeypatch):
    from erasekit.attacks import cce

    def forbidden(*a, **k):
        raise AssertionError("CCE prepared its token for an audit without target prompts")

    monkeypatch.setattr(cce, "prepare", forbidden)
    report = A.audit(pipe, "cat", ["cce"], [], SEEDS, judge(), tmp_path / "run", paraphrases=[],
                     preserve_prompts=["a red car"], num_inference_steps=1, progress=False)
    assert report.summary["preservation"] is not None
    assert not list((tmp_path / "run").glob("*cce*"))


# ------------------------------------------------------------------------------------------ folders: left-overs, locks


def test_a_rejected_config_creates_nothing(pipe, tmp_path):
    with pytest.raises(ConfigError, match="unknown attack"):
        A.audit(pipe, "cat", ["no_such_attack"], PROMPTS, SEEDS, judge(), tmp_path / "new", progress=False)
    with pytest.raises(ConfigError, match="give the prompts"):
        A.audit(pipe, "cat", ["paraphrase"], None, SEEDS, judge(), tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_a_locked_folder_refuses_a_second_audit_and_writes_nothing(pipe, tmp_path):
    from erasekit.errors import BusyError
    from erasekit.core.files import exclusive_lock

    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".audit.rank0.lock"
    with exclusive_lock(lock, "an audit in another process"):
        with pytest.raises(BusyError, match="in use by another erasekit process"):
            run_audit(pipe, out)
    assert [p.name for p in out.iterdir()] == [lock.name]
    with exclusive_lock(out / ".audit.rank1.lock", "process 1 of a sharded audit"):  # other ranks: not in the way
        run_audit(pipe, out)
    assert lines(out)


def test_temporaries_have_their_own_names_and_none_is_left(reference, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(RuntimeError):
        with files.replacing(folder / "summary.json") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert not list(folder.iterdir())
    with files.replacing(folder / "a.json") as one, files.replacing(folder / "a.json") as two:
        assert one != two and one.parent == folder  # two writers of one file never share a temporary
        one.write_bytes(b"1")
        two.write_bytes(b"2")
    assert [p.name for p in folder.iterdir()] == ["a.json"]


def test_stale_temporaries_of_killed_runs_are_cleared(pipe, reference, tmp_path):
    out, _ = reference
    run = tmp_path / "run"
    shutil.copytree(out, run)
    stale = [run / "results.jsonl.tmp", run / ".summary.json.x1y2.tmp", run / "images" / "target" / "ab_erased.tmp.png"]
    for path in stale:
        path.write_bytes(b"")
    run_audit(pipe, run)
    assert not [p for p in stale if p.exists()]
    assert not list(run.rglob("*.tmp*"))
    assert lines(run) == lines(out)


def test_the_plan_is_printed_before_the_work(pipe, tmp_path, capsys):
    run_audit(pipe, tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    plan = err[err.index("audit 'cat'"):]
    assert "2 prompts × 2 seeds, 1 paraphrases" in plan
    assert "to do: 6 of 6 units" in plan and "4 attack runs" in plan and "estimate:" in plan
    run_audit(pipe, tmp_path / "run", progress=True)
    assert "to do: 0 of 6 units (image pairs original | erased: 0 canonical, 0 paraphrase, 0 preserve) and 0 attack " \
           "runs" in capsys.readouterr().err


def test_tinyworld_default_is_the_small_prompt_set(tinyworld_pipe, tmp_path, capsys):
    report = A.audit(tinyworld_pipe, "circle", [], None, [0], "tinyworld", tmp_path / "run", preserve_prompts=[],
                     paraphrases=[], num_inference_steps=2, grids=False)
    assert [r["prompt"] for r in report.records] == A.subsample(A.tinyworld_prompts("circle"), A.DEFAULT_PROMPTS)
    assert A.DEFAULT_PROMPTS == 4 < len(A.tinyworld_prompts("circle")) == 24
    assert "4 of the grid's 24 prompts of 'circle' (full_grid=True or --full-grid: all)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the base-image cache

CIRCLES = ["a red circle on a black background", "a blue striped circle on a black background"]


@pytest.fixture(scope="module")
def uce_circle(tinyworld_pipe, tmp_path_factory):
    import erasekit

    path = tmp_path_factory.mktemp("uce") / "uce.safetensors"
    erasekit.erase(tinyworld_pipe, "uce", ["circle"]).save(path)
    return path


def erased_audit(pipe, adapter, out_dir, seeds=(0,), **kw):
    """A small tinyworld audit of the erasure ``adapter`` (two targets, a paraphrase and a preserve prompt)."""
    from erasekit import compose

    name = compose.load(pipe, adapter)
    try:
        return A.audit(pipe, "circle", [], CIRCLES, seeds, "tinyworld", out_dir, paraphrases=["a red round shape"],
                       preserve_prompts=["a red square on a black background"], progress=False, grids=False,
                       **{"num_inference_steps": 4, **kw})
    finally:
        compose.unload(pipe, name)


def test_an_audit_folder_is_not_resumed_for_another_adapter_of_the_same_name(tinyworld_pipe, uce_circle, tmp_path):
    """The manifest records each erasure's digest: auditing a different adapter (here: the same file's edit at a
    lower strength, same name, method and concept) into the folder of a finished audit is refused with one
    ConfigError, where its records would otherwise be taken as this erasure's; the same adapter resumes."""
    import erasekit

    erased_audit(tinyworld_pipe, uce_circle, tmp_path / "audit")
    weaker = tmp_path / "other" / "uce.safetensors"  # the same file name: the same erasure name
    weaker.parent.mkdir()
    erasekit.erase(tinyworld_pipe, "uce", ["circle"], erase_scale=0.5).save(weaker)
    with pytest.raises(ConfigError, match="other model"):
        erased_audit(tinyworld_pipe, weaker, tmp_path / "audit")
    erased_audit(tinyworld_pipe, uce_circle, tmp_path / "audit")  # resumes


def count_originals(monkeypatch) -> list[int]:
    """Sizes of the generation calls made with erasures loaded but all disabled (the audit's originals)."""
    from erasekit import compose
    from erasekit import generate as G

    real, sizes = G.generate, []

    def spy(pipe, prompts, seeds, **kwargs):
        erasures = compose.list_erasures(pipe)
        if erasures and not any(e["enabled"] for e in erasures):
            sizes.append(len(prompts))
        return real(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(G, "generate", spy)
    return sizes


def image_bytes(out_dir):
    return {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in sorted(Path(out_dir).glob("images/**/*.png"))}


@pytest.mark.parametrize("batch_size", [1, 8])
def test_base_cache_gives_the_records_without_it_and_a_second_audit_generates_no_original(
        tinyworld_pipe, uce_circle, tmp_path, monkeypatch, batch_size):
    sizes = count_originals(monkeypatch)
    erased_audit(tinyworld_pipe, uce_circle, tmp_path / "plain", batch_size=batch_size)
    assert sum(sizes) == 4  # 2 targets, a paraphrase, a preserve prompt
    cache = tmp_path / "base-images"
    first = erased_audit(tinyworld_pipe, uce_circle, tmp_path / "first", batch_size=batch_size, base_cache=cache)
    assert sum(sizes) == 8 and len(list(cache.glob("*/*.png"))) == 4  # an empty cache: made and saved
    assert lines(tmp_path / "first") == lines(tmp_path / "plain")
    assert image_bytes(tmp_path / "first") == image_bytes(tmp_path / "plain")
    second = erased_audit(tinyworld_pipe, uce_circle, tmp_path / "second", batch_size=batch_size, base_cache=cache)
    assert sum(sizes) == 8  # every original read from the cache
    assert lines(tmp_path / "second") == lines(tmp_path / "plain")  # the judge saw the same pixels
    assert image_bytes(tmp_path / "second") == image_bytes(tmp_path / "plain")
    assert second.summary["target"] == first.summary["target"] and first.summary["target"]["erasure_rate"] == 1.0
    assert not list(cache.rglob("*.tmp"))


def test_base_cache_misses_another_seed_setting_batch_or_model(tinyworld_pipe, uce_circle, tmp_path, monkeypatch):
    import torch

    cache = tmp_path / "base-images"
    erased_audit(tinyworld_pipe, uce_circle, tmp_path / "first", batch_size=8, base_cache=cache)
    sizes = count_originals(monkeypatch)
    erased_audit(tinyworld_pipe, uce_circle, tmp_path / "seed", seeds=(1,), batch_size=8, base_cache=cache)
    assert sizes == [4]
    erased_audit(tinyworld_pipe, uce_circle, tmp_path / "steps", batch_size=8, base_cache=cache,
                 num_inference_steps=3)
    assert sizes == [4, 4]
    erased_audit(tinyworld_pipe, uce_circle, tmp_path / "one", batch_size=1, base_cache=cache)  # other calls
    assert sizes == [4, 4, 1, 1, 1, 1]
    bias = tinyworld_pipe.unet.conv_out.bias
    with torch.no_grad():
        bias += 0.01  # other base weights
    try:
        with pytest.warns(BaseModelMismatchWarning):  # the adapter was made on the unchanged weights
            erased_audit(tinyworld_pipe, uce_circle, tmp_path / "weights", batch_size=8, base_cache=cache)
    finally:
        with torch.no_grad():
            bias -= 0.01
    assert sizes == [4, 4, 1, 1, 1, 1, 4]
    erased_audit(tinyworld_pipe, uce_circle, tmp_path / "again", batch_size=8, base_cache=cache)
    assert sizes == [4, 4, 1, 1, 1, 1, 4]  # the first audit's calls are still found


# ------------------------------------------------------------------------------------------ SD3 (MMDiT, flow matching)

#: a budget of one or two steps per attack (the papers' presets otherwise: the tiny SD3 pipeline is not tinyworld)
SD3_ATTACKS = {**TINY_ATTACKS, "paraphrase": dict(synonyms=("dog",))}


def test_an_audit_runs_every_attack_on_sd3_and_shares_its_base_images(tmp_path, monkeypatch):
    """Every registered attack runs in the audit of an erasure (UCE on the transformer) on SD3's architecture; the
    originals (erasure disabled) go to the base-image cache, keyed by the base transformer's weights, and a second
    audit reads them back and writes the same records."""
    import erasekit
    from erasekit import compose
    from erasekit.attacks import ATTACKS
    from erasekit.audit.cache import BaseCache
    from erasekit.testing import tiny_pipeline

    assert set(SD3_ATTACKS) == set(ATTACKS)
    sd3 = tiny_pipeline("sd3")
    compose.load(sd3, erasekit.erase(sd3, "uce", ["cat"]), name="uce")
    never = FunctionJudge(lambda ims: [np.asarray(im).mean() / 255 for im in ims], concept="cat", name="brightness",
                          version="1", threshold=2.0)  # the concept is never seen: every attack runs its budget

    def audit(out_dir):
        return A.audit(sd3, "cat", sorted(SD3_ATTACKS), ["a red cat"], [0], never, out_dir, paraphrases=["a red dog"],
                       preserve_prompts=[], attack_configs=SD3_ATTACKS, num_inference_steps=1, progress=False,
                       base_cache=tmp_path / "base")

    report = audit(tmp_path / "first")
    recs = lines(tmp_path / "first")
    attacked = {r["attack"]: r for r in recs if r["kind"] == "attack"}
    assert set(attacked) == set(ATTACKS) and [r["kind"] for r in recs].count("target") == 1
    assert not any(r["success"] or r["pre_success"] for r in attacked.values())
    assert all(r["steps"] >= 1 and (tmp_path / "first" / r["image"]).is_file() for r in attacked.values())
    assert sorted(report.summary["attacks"]) == sorted(ATTACKS)
    (target,) = [r for r in recs if r["kind"] == "target"]
    assert target["original_score"] != target["score"]  # the original is the base model, the erased one is not
    assert len(list((tmp_path / "base").glob("*/*.png"))) == 2  # the target's and the paraphrase's originals

    made = []
    real_images = BaseCache.images
    monkeypatch.setattr(BaseCache, "images",
                        lambda self, p, s, make: real_images(self, p, s, lambda: made.append(p) or make()))
    audit(tmp_path / "second")

    def timeless(records):  # CCE's record of its preparation has a wall time too
        return [{**r, "info": {k: v for k, v in r.get("info", {}).items() if not k.endswith("seconds")}}
                for r in records]

    assert made == [] and timeless(lines(tmp_path / "second")) == timeless(recs)


def test_ring_a_bell_searches_once_per_model_and_prompt(pipe, tmp_path, monkeypatch):
    """Ring-A-Bell's genetic search runs on the original text encoder: the audits of two different erasures of one
    model that share a base cache search once, and find the tokens an audit without the cache finds."""
    import erasekit
    from erasekit import compose
    from erasekit.attacks import ring_a_bell
    from erasekit.testing import TINY_ATTACKS

    searches = []
    real = ring_a_bell.genetic_search
    monkeypatch.setattr(ring_a_bell, "genetic_search", lambda *a, **k: searches.append(a[0]) or real(*a, **k))
    never = FunctionJudge(lambda ims: [0.0] * len(ims), concept="cat", name="never", version="1", threshold=0.5)

    def attacked(out_dir, adapter, cache):
        name = compose.load(pipe, adapter)
        try:
            A.audit(pipe, "cat", ["ring_a_bell"], ["a red cat"], [0], never, out_dir, paraphrases=[],
                    preserve_prompts=[], attack_configs=TINY_ATTACKS, num_inference_steps=1,
                    progress=False, base_cache=cache)
        finally:
            compose.unload(pipe, name)
        (record,) = [r for r in lines(out_dir) if r["attack"] == "ring_a_bell"]
        return record

    uce = erasekit.erase(pipe, "uce", ["cat"])
    other = erasekit.erase(pipe, "uce", ["cat"], preserve=["dog"], guides=["a dog"])
    plain = attacked(tmp_path / "plain", uce, None)
    first = attacked(tmp_path / "first", uce, tmp_path / "base")
    second = attacked(tmp_path / "second", other, tmp_path / "base")
    assert len(searches) == 2  # the audit without a cache, and the first one with it
    assert len(list((tmp_path / "base" / "ring_a_bell").glob("*/*.json"))) == 1
    for record in (first, second):
        assert record["adv_prompt"] == plain["adv_prompt"]
        assert record["info"]["adv_token_ids"] == plain["info"]["adv_token_ids"]
        assert record["info"]["distance"] == plain["info"]["distance"]
    assert first["image"] and lines(tmp_path / "first") == lines(tmp_path / "plain")  # bit for bit the same records
