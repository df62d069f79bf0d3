"""The command line, in-process: help is instant, bad input gives one clear error and exit code 2."""

import subprocess
import sys
import time

import pytest

from erasekit.cli import main

COMMANDS = ["generate", "inspect", "export", "fuse", "merge", "audit", "tinyworld", "env"]


def test_top_level_help_is_fast_and_imports_no_torch():
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import sys; from erasekit.cli import main\ntry: main(['--help'])\n"
                          "except SystemExit: pass\nprint('torch' in sys.modules)"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("False")
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("command", COMMANDS + ["erase"])
def test_every_command_has_help_with_examples(command, capsys):
    argv = [command, "--help"] if command != "erase" else ["erase", "--method", "uce", "--help"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert "example" in capsys.readouterr().out


def test_unknown_model_path_is_one_clear_error(capsys, tmp_path):
    code = main(["generate", "--prompt", "a red circle", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_bad_flag_exits_2(capsys):
    assert main(["generate", "--prompt", "x", "--bogus"]) == 2
    assert capsys.readouterr().err == "erasekit: error: unrecognized arguments: --bogus (see `erasekit generate --help`)\n"


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["generate", "--prompt", "a red circle", "--out-dir", str(blocker / "sub")])
    assert code == 2 and "cannot write to output folder" in capsys.readouterr().err


def test_generate_writes_png_and_judge_reads_it(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", "a solid red circle on a black background", "--seed", "0", "--out", str(out), "--judge"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "judge:" in text and "circle" in text


def test_generate_several_writes_contact_sheet(tmp_path):
    assert main(["generate", "--prompt", "a red circle", "--prompt", "a blue square", "--seed", "0", "1",
                 "--out-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 5  # 4 images + contact sheet


def test_env_prints_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "diffusers" in out and "tinyworld" in out


def test_tinyworld_render(tmp_path):
    assert main(["tinyworld", "render", "--prompt", "a dotted crimson disc on snowfield", "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").exists()


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "erasekit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "erasekit" in out.stdout


def test_audit_bad_batch_size_is_a_usage_error_that_creates_nothing(tmp_path, capsys):
    assert main(["audit", "--concept", "circle", "--batch-size", "0", "--out-dir", str(tmp_path / "a")]) == 2
    assert "--batch-size: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_audit_unknown_attack_is_one_clear_error(tmp_path, capsys):
    code = main(["audit", "--concept", "circle", "--attack", "nope", "--out-dir", str(tmp_path / "a")])
    assert code == 2 and "unknown attack 'nope'" in capsys.readouterr().err


def test_erase_gate_writes_a_gated_adapter_and_refuses_text_encoder_deltas(tmp_path, capsys):
    """--gate: the adapter file carries a prompt-similarity gate on its concept; a method whose deltas are on the
    text encoder (few-shot) gets one clear error and no file."""
    from erasekit.adapter import load_adapter

    out = tmp_path / "c.safetensors"
    assert main(["erase", "--method", "uce", "--concept", "circle", "--gate", "tokencos", "--out", str(out)]) == 0
    assert load_adapter(out).gating["metric"] == "tokencos" and load_adapter(out).gating["prompts"] == ["circle"]
    bad = tmp_path / "f.safetensors"
    code = main(["erase", "--method", "fewshot", "--concept", "circle", "--epochs", "1", "--gate", "tokencos",
                 "--out", str(bad)])
    err = capsys.readouterr().err
    assert code != 0 and "changes text_encoder" in err and "Traceback" not in err and not bad.exists()
    assert main(["erase", "--method", "uce", "--concept", "circle", "--gate", "cosine", "--out", str(bad)]) == 2
    assert not bad.exists()


def test_registry_says_what_each_adapter_changes(tinyworld_pipe):
    """``MethodSpec.changes`` (which --gate checks before any work) matches the components of real adapters."""
    from pathlib import Path

    from erasekit import erase
    from erasekit.adapter import load_adapter
    from erasekit.methods import METHODS

    reference = Path(__file__).parent / "reference"
    for stem in ("uce", "rece", "time", "esd-x", "spm", "advunlearn", "fewshot"):
        components = {key.split(".", 1)[0] for key in load_adapter(reference / f"{stem}.safetensors").deltas}
        assert components == {"unet" if METHODS[stem].changes == "denoiser" else METHODS[stem].changes}, stem
    assert METHODS["safree"].changes == "nothing" and erase(tinyworld_pipe, "safree", ["circle"]).is_guard
