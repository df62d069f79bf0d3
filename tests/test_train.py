"""Training checkpoints and the divergence guard of the shared loop (``erasekit.methods.trainer``), issue #20: a resume never
returns more training than asked, only checked states are checkpointed, checkpoints are written atomically and
reported by name when damaged, and one checkpoint folder serves one run at a time."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from erasekit.core import lora
from erasekit.methods import trainer
from erasekit.cli import main
from erasekit.errors import BusyError, CheckpointError, ConfigError
from erasekit.core.files import exclusive_lock
from erasekit.methods import esd

FAST = dict(concepts=("circle",), num_inference_steps=2, batch_size=1, progress=False)


def _quadratic(target, size=3):
    w = torch.zeros(size, requires_grad=True)

    def loss_fn(step, gen):
        return ((w - target - 0.1 * torch.randn(size, generator=gen)) ** 2).sum()

    return w, loss_fn


def _checkpoint(folder):
    with safe_open(str(folder / trainer.CHECKPOINT), "pt") as f:
        return json.loads(f.metadata()["erasekit.train"]), {k: f.get_tensor(k) for k in f.keys()}


def _erase_cli(tmp_path, *options):
    return main(["erase", "--method", "esd-x", "--concept", "circle", "--num-inference-steps", "2", "--batch-size",
                 "1", "--no-progress", "--checkpoint-dir", str(tmp_path / "ck"), *options])


# ------------------------------------------------------------------------------------------ resume
def test_resume_with_fewer_iterations_is_refused(tmp_path, capsys):
    assert _erase_cli(tmp_path, "--iterations", "3", "--out", str(tmp_path / "a3.safetensors")) == 0
    capsys.readouterr()
    assert _erase_cli(tmp_path, "--iterations", "2", "--resume", "--out", str(tmp_path / "a2.safetensors")) == 2
    err = capsys.readouterr().err
    assert "erasekit: error:" in err and "at step 3, past the 2 steps" in err and "Traceback" not in err
    assert not (tmp_path / "a2.safetensors").exists()  # no adapter that says 2 iterations and holds 3
    assert _checkpoint(tmp_path / "ck")[0]["step"] == 3  # the checkpoint is left as it was


def test_resume_with_another_config_names_the_difference(tinyworld_pipe, tmp_path):
    esd.erase(tinyworld_pipe, esd.EsdConfig(iterations=1, checkpoint_dir=str(tmp_path), **FAST))
    for change, named in [({"lr": 2e-3}, "lr: 0.001 there, 0.002 now"), ({"rank": 2}, "rank"),
                          ({"concepts": ("square",)}, "concepts"), ({"train_method": "esd-x-strict"}, "method")]:
        config = esd.EsdConfig(**{**FAST, "iterations": 2, "checkpoint_dir": str(tmp_path), "resume": True, **change})
        with pytest.raises(ConfigError, match="different run") as info:
            esd.erase(tinyworld_pipe, config)
        assert named in str(info.value)


def test_fit_refuses_a_checkpoint_of_another_method_or_other_tensors(tmp_path):
    w, loss_fn = _quadratic(torch.ones(3))
    trainer.fit({"w": w}, loss_fn, steps=2, lr=0.1, checkpoint_dir=tmp_path, progress=False, desc="esd-x")
    with pytest.raises(ConfigError, match="method: 'esd-x' there, 'abo' now"):
        trainer.fit({"w": _quadratic(torch.ones(3))[0]}, loss_fn, steps=3, lr=0.1, checkpoint_dir=tmp_path,
                   resume=True, progress=False, desc="abo")
    with pytest.raises(ConfigError, match="other trainable tensors"):
        trainer.fit({"w": _quadratic(torch.ones(4), 4)[0]}, loss_fn, steps=3, lr=0.1, checkpoint_dir=tmp_path,
                   resume=True, progress=False, desc="esd-x")


# -------------------------------------------------------------------------------------- divergence
def test_update_to_weight_ratio_is_measured_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 5))
    for rank in (0, 2):
        deltas = lora.Deltas(model, lora.select(model, lambda n, m: True), rank)
        with torch.no_grad():
            for p in deltas.params.values():
                p.normal_()
        exported = deltas.export("m")
        expected = {n: float(exported[f"m.{n}"].dense().norm() / m.weight.detach().norm()) for n, m in deltas.modules.items()}
        assert deltas.ratios() == pytest.approx(expected, rel=1e-6)


def test_a_blow_up_in_the_last_update_is_caught(tinyworld_pipe, tmp_path):
    """The last update is checked too (the loss of a step is computed before its update)."""
    config = esd.EsdConfig(iterations=1, lr=1e6, checkpoint_dir=str(tmp_path), **FAST)
    with pytest.raises(trainer.TrainingDivergedError) as info:
        esd.erase(tinyworld_pipe, config)
    message = str(info.value)
    assert "step 1 of 1" in message and "attn2" in message and "times its base weight" in message
    assert "lower the learning rate" in message and "no good checkpoint was written" in message
    assert not (tmp_path / trainer.CHECKPOINT).exists()


def test_only_checked_states_are_checkpointed(tmp_path):
    """A gradient of inf at step 3 makes the parameters NaN while that step's loss is finite: the run stops there,
    and the checkpoint left is the last finite one, named in the error."""
    w, loss_fn = _quadratic(torch.ones(3))

    def blow_up(step, gen):  # d/dx sqrt(|x|) at 0 is inf; the value is 0
        return loss_fn(step, gen) + (torch.sqrt((w - w.detach()).abs()).sum() if step == 2 else 0)

    with pytest.raises(trainer.TrainingDivergedError,
                       match=r"step 3 of 6: parameter w holds nan.*checkpoint \(after step 2\)") as info:
        trainer.fit({"w": w}, blow_up, steps=6, lr=0.1, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    assert str(tmp_path / trainer.CHECKPOINT) in str(info.value)
    record, tensors = _checkpoint(tmp_path)
    assert record["step"] == 2 and all(torch.isfinite(t).all() for t in tensors.values())


def test_a_delta_far_larger_than_its_weight_is_divergence(tmp_path):
    w, loss_fn = _quadratic(torch.full((3,), 100.0))
    base = torch.ones(3)
    with pytest.raises(trainer.TrainingDivergedError, match=r"step 2 of 5: the delta of module w is (19\.\d+|20(\.\d+)?) times"):
        trainer.fit({"w": w}, loss_fn, steps=5, lr=10.0, progress=False, ratios=lambda: {"w": float(w.norm() / base.norm())})


def test_a_diverged_checkpoint_is_not_resumed(tmp_path):
    w, loss_fn = _quadratic(torch.ones(3))
    trainer.fit({"w": w}, loss_fn, steps=2, lr=0.1, checkpoint_dir=tmp_path, progress=False)
    record, tensors = _checkpoint(tmp_path)  # as the old guard left it: NaN kept as "last good"
    tensors["param.w"] = torch.full((3,), float("nan"))
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / trainer.CHECKPOINT), metadata={"erasekit.train": json.dumps(record)})
    with pytest.raises(CheckpointError, match="holds a diverged run"):
        trainer.fit({"w": _quadratic(torch.ones(3))[0]}, loss_fn, steps=4, lr=0.1, checkpoint_dir=tmp_path,
                   resume=True, progress=False)


# ------------------------------------------------------------------------------------ file safety
def test_a_damaged_checkpoint_is_named_on_resume(tmp_path, capsys):
    assert _erase_cli(tmp_path, "--iterations", "1", "--out", str(tmp_path / "a.safetensors")) == 0
    checkpoint = tmp_path / "ck" / trainer.CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # a disk full / kill without fsync
    capsys.readouterr()
    assert _erase_cli(tmp_path, "--iterations", "2", "--resume", "--out", str(tmp_path / "b.safetensors")) == 2
    err = capsys.readouterr().err
    assert f"the training checkpoint {checkpoint} is damaged" in err and "Traceback" not in err
    assert not (tmp_path / "b.safetensors").exists()


def test_checkpoints_are_written_like_adapters(tmp_path, monkeypatch):
    """Unique temporary name (a fixed one left over, or another run's, is not in the way), fsync, atomic rename."""
    import erasekit.core.files

    synced = []
    real_fsync = erasekit.core.files.os.fsync
    monkeypatch.setattr(erasekit.core.files.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    (tmp_path / (trainer.CHECKPOINT + ".tmp")).mkdir()  # the old fixed temporary name, blocked
    w, loss_fn = _quadratic(torch.ones(3))
    trainer.fit({"w": w}, loss_fn, steps=4, lr=0.1, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    assert len(synced) == 2 and _checkpoint(tmp_path)[0]["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [trainer.LOCK, trainer.CHECKPOINT, trainer.CHECKPOINT + ".tmp"]


def test_a_checkpoint_folder_serves_one_run_at_a_time(tmp_path):
    w, loss_fn = _quadratic(torch.ones(3))
    with exclusive_lock(tmp_path / trainer.LOCK, "another run"):  # a concurrent run holds the folder
        with pytest.raises(BusyError, match=f"the checkpoint folder {tmp_path} is in use by another erasekit process"):
            trainer.fit({"w": w}, loss_fn, steps=2, lr=0.1, checkpoint_dir=tmp_path, progress=False)
    assert not (tmp_path / trainer.CHECKPOINT).exists()
    trainer.fit({"w": w}, loss_fn, steps=2, lr=0.1, checkpoint_dir=tmp_path, progress=False)  # free again
    with exclusive_lock(tmp_path / trainer.LOCK, "the folder"):  # ... and released after the run
        pass


def test_exclusive_lock_across_processes(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'w')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=f"^the folder is in use by another erasekit process \\(lock {lock}\\); "
                                            "wait for it or choose another folder$"):
            with exclusive_lock(lock, "the folder"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "the folder"):  # the holder is gone, and so is its lock
        pass
