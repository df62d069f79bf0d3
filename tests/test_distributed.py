"""Several processes give what one process gives: the bench's rows split over ``accelerate launch``'s processes (one
results file, the same rows), and data-parallel training of the trained families (the same adapter within float
tolerance). The launches are real (two CPU processes over gloo); the split of a batch is also checked in-process."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from erasekit.bench import Budget, run_suite
from erasekit.cli import main
from erasekit.core import lora
from erasekit.core.processes import WHOLE, Part
from erasekit.errors import ConfigError
from erasekit.methods import abo, advunlearn, esd, spm, te, trainer
from erasekit.methods.presets import resolve
from erasekit.testing import cpu_launch, tiny_pipeline

#: the smallest bench: two closed-form rows (one per process), one prompt, no attack
BUDGET = Budget("tiny", prompts=1, seeds=(0,), preserve=1, attack_prompts=1, attack_entries=(), trained_entries=(),
                train_scale=1.0, timing_repeats=1)
BENCH = dict(methods=["uce"], attacks=[], entries=["shape", "colour"], device="cpu", progress=False)
#: a few steps of three trained families (CLI flags), batches split over the processes
TRAINED = {
    "esd-x": ["--iterations", "3", "--batch-size", "4", "--num-inference-steps", "3"],
    "spm": ["--iterations", "3", "--batch-size", "2", "--num-anchors", "2", "--num-inference-steps", "3"],
    "advunlearn": ["--iterations", "2", "--batch-size", "2", "--retain-batch", "2", "--attack-steps", "1",
                   "--warmup", "0", "--num-inference-steps", "3"],
}
#: row fields that measure time or memory, or say when a row was made
MEASURED = {"erase_seconds", "peak_memory_mb", "peak_memory_kind", "row_seconds", "generation", "made"}


def work(folder: Path) -> None:
    """What one run does, on one process or on each of several: erase with each trained family through the CLI
    (the adapter written once), then the bench."""
    for method, flags in TRAINED.items():
        assert main(["erase", "--method", method, "--concept", "cat", "--model", str(folder / "model"), "--device",
                     "cpu", "--no-progress", *flags, "--out", str(folder / f"{method}.safetensors")]) == 0
    run_suite(BUDGET, folder / "bench", **BENCH)


WORKER = """
import json, logging, sys
sys.path.insert(0, {tests!r})
from erasekit.core import processes
from test_distributed import work

logging.basicConfig(level=logging.WARNING)
logging.getLogger("erasekit.bench.suite").setLevel(logging.INFO)  # each row's line names its process
state = processes.current()
folder = __import__("pathlib").Path(sys.argv[1])
(folder / f"rank{{state.process_index}}.json").write_text(json.dumps([state.process_index, state.num_processes]))
work(folder)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one process's folder, two processes' folder, the launch's output)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    pipe = tiny_pipeline("sd1")
    for folder in (one, two):
        pipe.save_pretrained(folder / "model")
    script = two / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    prefix, env = cpu_launch(2)
    launched = subprocess.run([*prefix, str(script), str(two)], env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (same kernels, same sums)
    try:
        work(one)
    finally:
        torch.set_num_threads(threads)
    return one, two, launched.stdout + launched.stderr


def _record(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["erasekit.adapter"])


def test_two_processes_shared_the_work(runs):
    one, two, output = runs
    assert [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)] == [[0, 2], [1, 2]]
    assert "(process 0 of 2)" in output and "(process 1 of 2)" in output  # one bench row each
    for method in TRAINED:  # every process trained, one wrote the adapter and said so
        assert output.count(f"erased cat with {method} ") == 1


@pytest.mark.parametrize("method, tolerance, loss_tolerance", [("esd-x", 1e-5, 1e-4), ("spm", 1e-5, 1e-4),
                                                               ("advunlearn", 1e-2, 1e-3)])
def test_data_parallel_training_gives_the_single_process_adapter(runs, method, tolerance, loss_tolerance):
    """Same global batch, same randomness: the adapters agree to float rounding (AdvUnlearn's full-rank
    text-encoder deltas less tightly: Adam's first steps divide near-zero gradients by their own size, and one
    process with two threads differs from one thread as much)."""
    one, two, _ = runs
    (a, record_a), (b, record_b) = _record(one / f"{method}.safetensors"), _record(two / f"{method}.safetensors")
    assert a.keys() == b.keys()
    keys = [k for k in a if a[k].is_floating_point()]
    difference = sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in keys) ** 0.5
    size = sum(float(a[k].double().norm()) ** 2 for k in keys) ** 0.5
    assert size > 0 and difference <= tolerance * size
    first, last = (record_b["info"]["training"][k] / record_a["info"]["training"][k] - 1 for k in ("loss_first",
                                                                                                    "loss_last"))
    assert abs(first) < 1e-5  # the first step's loss of the global batch, summed over the processes
    assert abs(last) < loss_tolerance


def test_bench_rows_split_over_processes_are_the_single_process_rows(runs):
    one, two, _ = runs
    name = "results-tiny-shape-colour.json"
    a, b = (json.loads((folder / "bench" / name).read_text()) for folder in (one, two))
    assert list(a["rows"]) == list(b["rows"]) == ["uce/shape", "uce/colour"]  # the order one process makes them
    for key, row in a["rows"].items():
        assert {k: v for k, v in b["rows"][key].items() if k not in MEASURED} == \
               {k: v for k, v in row.items() if k not in MEASURED}
    assert b["processes"] == 2 and "processes" not in a
    work = two / "bench" / ".bench-tiny"
    assert json.loads((work / name).read_text())["rows"] == b["rows"]  # the resume state: every row
    assert not list(work.glob("*.rank*.json"))  # the processes' row files, merged


def test_rows_an_interrupted_run_of_several_processes_finished_are_resumed(runs, tmp_path, monkeypatch):
    """A process's rows file left by a killed launch is read back (by any number of processes): its rows are not
    made again."""
    import erasekit.api

    _, two, _ = runs
    results = json.loads((two / "bench" / "results-tiny-shape-colour.json").read_text())
    work = tmp_path / "work"
    work.mkdir()
    left = {"budget": results["budget"], "rank": 1, "rows": {"uce/colour": results["rows"]["uce/colour"]}}
    (work / "results-tiny-colour.rank1.json").write_text(json.dumps(left))
    erased = []
    monkeypatch.setattr(erasekit.api, "erase", lambda *a, **k: erased.append(a[2]))
    resumed = run_suite(BUDGET, tmp_path, work_dir=work, **{**BENCH, "entries": ["colour"]})
    assert erased == [] and resumed["rows"] == {"uce/colour": results["rows"]["uce/colour"]}
    assert not list(work.glob("*.rank*.json"))  # in the resume state now


# ---------------------------------------------------------------------------------- the split, in one process
def test_a_batch_splits_into_contiguous_parts_weighted_by_their_rows():
    parts = [Part(i, 3) for i in range(3)]
    assert [p.rows(7) for p in parts] == [slice(0, 2), slice(2, 4), slice(4, 7)]
    loss = torch.tensor(2.0)
    assert sum(float(p.mean(loss, 7)) for p in parts) == pytest.approx(2.0)
    assert WHOLE.rows(5) == slice(0, 5) and WHOLE.mean(loss, 5) is loss
    with pytest.raises(ConfigError, match="batch of 2 samples cannot be split over 3 processes"):
        parts[0].rows(2)


def _unet_objective(method, options):
    def build(pipe):
        config = resolve(method, pipe, options, ("cat",))
        module = {"esd-x": esd, "abo": abo, "spm": spm}[method]
        config = config.with_paper_defaults() if method == "spm" else config
        names = spm.transformer_modules(pipe.unet) if method == "spm" else lora.select(pipe.unet, esd.PRESETS["esd-x"])
        return module.objective(pipe, config), lora.attach(pipe.unet, names, 2, torch.Generator().manual_seed(0))
    return build


def _advunlearn_objective(pipe):
    config = resolve("advunlearn", pipe, dict(batch_size=3, retain_batch=2, attack_steps=1, warmup=0,
                                             num_inference_steps=3), ("cat",))
    names = te.select(pipe, advunlearn.module_selection(config.component, config.layers))
    return advunlearn.objective(pipe, config), te.attached(pipe, names, 2, 0)


@pytest.mark.parametrize("build", [
    _unet_objective("esd-x", dict(batch_size=3, num_inference_steps=3, preserve_weight=1.0, preserve=("a dog",))),
    _unet_objective("esd-x", dict(batch_size=3, num_inference_steps=3, adversary_steps=2, anchors=("a dog | a car",))),
    _unet_objective("abo", dict(batch_size=3, num_inference_steps=3)),
    _unet_objective("spm", dict(batch_size=3, num_inference_steps=3, num_anchors=2)),
    _advunlearn_objective,
], ids=["esd-x", "esd-x-anchors-adversary", "abo", "spm", "advunlearn"])
def test_the_parts_of_a_step_sum_to_the_whole_step(build):
    """Each process's weighted loss of its rows, drawn from the same step generator: their sum is the batch's loss
    and gradient (what the processes' all-reduce adds up)."""
    pipe = tiny_pipeline("sd1")
    loss_for, attached = build(pipe)
    with lora.frozen(pipe.unet), attached as deltas:
        with torch.no_grad():  # deltas away from zero: every parameter gets a gradient
            for p in deltas.params.values():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        params = list(deltas.params.values())

        def step(part):
            for p in params:
                p.grad = None
            loss = trainer.total(loss_for(deltas)(0, trainer.step_generator(5, 0), part))  # a fresh loss: AdvUnlearn's round too
            loss.backward()
            return float(loss.detach()), [p.grad.clone() for p in params]

        whole, grads = step(WHOLE)
        parts = [step(Part(i, 2)) for i in range(2)]
    assert sum(loss for loss, _ in parts) == pytest.approx(whole, rel=1e-5)
    assert any(float(g.abs().max()) > 0 for g in grads)
    for g, g0, g1 in zip(grads, parts[0][1], parts[1][1]):
        # float32 sums in another order (two threads split them too): within 1e-4 of the gradient's own scale
        torch.testing.assert_close(g0 + g1, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()) + 1e-12)
    assert abs(parts[0][0] - parts[1][0]) > 1e-9  # two different halves of the batch
