"""Bad command lines end in one `erasekit: error:` line (exit 2) before anything is loaded or written; method
options given on the command line build the config the Python API builds."""

import dataclasses
import shutil
import typing
from pathlib import Path

import pytest

from erasekit.cli.config import _kind, flag_name
from erasekit.attacks import ATTACKS
from erasekit.cli import erase_config, erase_parser, main
from erasekit.errors import ConfigError
from erasekit.methods import METHODS

EXAMPLE = Path(__file__).parents[1] / "adapters" / "examples" / "uce-circle.safetensors"
MODEL = ["--model", "missing-model"]  # reaching the model loader would name it in the error


# ------------------------------------------------------------------- method options: CLI == Python API

OPTIONS = [(method, f.name) for method, spec in METHODS.items() for f in dataclasses.fields(spec.config_cls)
           if f.name != "concepts"]


def _candidates(kind, arg, default):
    """Values to try for one option, most telling first; the test uses those the Python API accepts."""
    if kind == "literal":
        return list(arg)
    if arg is bool:
        return [not default, default]
    if kind == "tuple":
        return [(3, 1)] if arg is int else [("a {} shape", "{} on white"), default]
    if arg is int:
        return [default + 1 if isinstance(default, int) else 7, 1, 0]
    if arg is float:
        return [default * 2 + 0.25 if isinstance(default, float) else 0.25, 1.0, 0.0]
    return ["a shape", default]


def _flags(name, kind, arg, value):
    flag = flag_name(name, kind)
    if arg is bool and kind == "scalar":
        return [flag if value else "--no-" + flag[2:]]
    if kind == "tuple":
        return [token for v in value for token in (flag, str(v))]
    return [flag, str(value)]


@pytest.mark.parametrize("method, name", OPTIONS, ids=[f"{m}-{n}" for m, n in OPTIONS])
def test_every_method_option_on_the_cli_builds_the_api_config(method, name, tmp_path):
    """Every option of every registered method (a new method is covered by registering it), given on the command
    line, gives the config ``erasekit.erase`` builds from the same value (on tinyworld, the CLI's default model)."""
    spec = METHODS[method]
    field = next(f for f in dataclasses.fields(spec.config_cls) if f.name == name)
    kind, arg = _kind(typing.get_type_hints(spec.config_cls)[name])
    default = spec.preset(tinyworld=True).get(name, field.default)
    tried = 0
    for value in _candidates(kind, arg, default):
        try:
            expected = spec.make_config(["circle"], tinyworld=True, **{name: value})
        except ConfigError:
            continue  # not a valid value of this option
        parser, _ = erase_parser(method)
        args = parser.parse_args(["--method", method, "--concept", "circle", "--out", str(tmp_path / "x.safetensors"),
                                  *_flags(name, kind, arg, value)])
        assert erase_config(args, spec) == expected, (name, value)
        tried += 1
    assert tried, f"no candidate value of {method} {name} is valid: add one to _candidates"


def test_config_file_values_build_the_api_config(tmp_path):
    (tmp_path / "spm.toml").write_text('iterations = 12\nlr = 0.001\ntemplates = ["a {}"]\n')
    parser, spec = erase_parser("spm")
    args = parser.parse_args(["--method", "spm", "--concept", "circle", "--config", str(tmp_path / "spm.toml"),
                              "--batch-size", "3", "--out", str(tmp_path / "x.safetensors")])
    expected = spec.make_config("circle", tinyworld=True, iterations=12, lr=0.001, templates=("a {}",), batch_size=3)
    assert erase_config(args, spec) == expected


# ----------------------------------------------------------------------------- registries in --help

def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_audit_help_lists_every_attack_with_its_presets(capsys):
    lines = _help(["audit", "--help"], capsys).splitlines()
    for name, module in ATTACKS.items():
        line = next((ln for ln in lines if ln.split()[:1] == [name]), None)
        assert line is not None and all(p in line for p in module.PRESETS), (name, line)


def test_erase_help_lists_every_method(capsys):
    lines = _help(["erase", "--help"], capsys).splitlines()
    for name, spec in METHODS.items():
        assert f"  {name:<17} {spec.summary}" in lines, name


def test_unknown_attack_is_one_line_naming_the_valid_ones(tmp_path, capsys):
    assert main(["audit", "--concept", "circle", "--attack", "nope", "--out-dir", str(tmp_path / "a"), *MODEL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown attack 'nope'" in err and all(name in err for name in ATTACKS)


# -------------------------------------------------------------------------------- bad command lines

G = ["generate", "--prompt", "a red circle", *MODEL]
E = ["erase", "--concept", "circle", *MODEL]
A = ["audit", "--concept", "circle", *MODEL]
BAD = [  # (argv, a fragment of the one error line); see `workdir` for the files and folders
    (["nope"], "invalid choice: 'nope'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["generate"], "required: --prompt"),
    ([*G, "--bogus"], "see `erasekit generate --help`"),
    ([*G, "--steps", "0"], "--steps: must be at least 1"),
    ([*G, "--steps", "-1"], "--steps: must be at least 1"),
    ([*G, "--steps", "ten"], "--steps: expected an integer"),
    ([*G, "--steps"], "--steps: expected one argument"),
    ([*G, "--guidance", "nan"], "--guidance: must be a finite number"),
    ([*G, "--guidance=-inf"], "--guidance: must be a finite number"),
    ([*G, "--seed", "99999999999999999999"], "--seed: a seed is an integer from 0 to 2**63-1"),
    ([*G, "--seed", "-1"], "--seed: a seed is"),
    ([*G, "--seed"], "--seed: expected at least one argument"),
    ([*G, "--adapter", "nope.safetensors"], "file not found: 'nope.safetensors'"),
    ([*G, "--adapter", "adapter.safetensors:nan"], "the weight must be a number from -100 to 100"),
    ([*G, "--adapter", "adapter.safetensors:inf"], "the weight must be"),
    ([*G, "--adapter", "adapter.safetensors:-1e9"], "the weight must be"),
    ([*G, "--adapter", "adapter.safetensors:1e6"], "the weight must be"),
    ([*G, "--adapter", "adapter.safetensors:half"], "the weight after ':' must be a number, got 'half'"),
    ([*G, "--adapter", "dir"], "'dir' is a folder"),
    ([*G, "--out", "x.txt"], "--out: 'x.txt' must end in .png"),
    ([*G, "--out", "dir.png"], "'dir.png' is a folder"),
    ([*G, "--out", "file.txt/x.png"], "'file.txt' is a file"),
    ([*G, "--out-dir", "file.txt"], "--out-dir: 'file.txt' is a file, not a folder"),
    ([*G, "--out-dir", "file.txt/sub"], "'file.txt' is a file"),
    ([*G, "--out", "x.png", "--seed", "0", "1"], "give --out-dir FOLDER for several"),
    ([*G, "--out", "x.png", "--out-dir", "out"], "not allowed with argument --out"),
    ([*G, "--judge", "--out", "x.png"], "--judge needs a tinyworld model"),
    (["generate", "--prompt", "a red \udcff circle", *MODEL], "--prompt: not valid UTF-8"),
    ([*G, "--negative-prompt", "\udcff"], "--negative-prompt: not valid UTF-8"),
    ([*G, "--out", "\udcff.png"], "--out: not valid UTF-8"),
    ([*G, "--device", "gpu0"], "unknown device 'gpu0'"),
    ([*G, "--dtype", "float8"], "unknown dtype 'float8'"),
    (["erase", "--out", "x.safetensors"], "required: --method"),
    ([*E, "--method", "bogus", "--out", "x.safetensors"], "unknown method 'bogus'"),
    ([*E, "--method", "uce", "--out", "dir.safetensors"], "'dir.safetensors' is a folder"),
    ([*E, "--method", "uce", "--out", "dir"], "must end in .safetensors"),
    ([*E, "--method", "uce", "--out", "file.txt/x.safetensors"], "'file.txt' is a file"),
    ([*E, "--method", "uce", "--out", "x.safetensors", "--lamb", "1"], "unrecognized arguments: --lamb 1"),
    ([*E, "--method", "spm", "--out", "x.safetensors", "--lr", "nan"], "--lr: must be a finite number"),
    ([*E, "--method", "spm", "--out", "x.safetensors", "--iterations", "many"], "--iterations: invalid int value"),
    ([*E, "--method", "spm", "--out", "x.safetensors", "--seed", "-5"], "--seed: a seed is"),
    ([*E, "--method", "uce", "--out", "x.safetensors", "--config", "nope.toml"], "file not found: 'nope.toml'"),
    ([*E, "--method", "uce", "--out", "x.safetensors", "--config", "bad.toml"], "unknown option 'lamb' in the config file"),
    (["erase", "--method", "uce", "--concept", "\udcff", "--out", "x.safetensors", *MODEL], "not valid UTF-8"),
    ([*E, "--method", "esd-x", "--concept", "circle", "--out", "x.safetensors"], "'circle' is given more than once"),
    (["inspect", "nope.safetensors"], "file not found"),
    (["inspect", "dir"], "'dir' is a folder"),
    (["export", "adapter.safetensors", "--to", "diffusers", "--out", "dir.safetensors"], "is a folder"),
    (["export", "adapter.safetensors", "--to", "diffusers", "--out", "x.txt"], "must end in .safetensors"),
    (["export", "adapter.safetensors", "--to", "kohya", "--out", "x.safetensors", "--svd-rank", "0"], "--svd-rank"),
    (["export", "adapter.safetensors", "--to", "onnx", "--out", "x.safetensors"], "invalid choice: 'onnx'"),
    (["export", "nope.safetensors", "--to", "kohya", "--out", "x.safetensors"], "file not found"),
    (["fuse", "--adapter", "adapter.safetensors", "--out", "dir", *MODEL], "is a folder that is not empty"),
    (["fuse", "--adapter", "adapter.safetensors", "--out", "file.txt", *MODEL], "'file.txt' is a file"),
    (["fuse", "--adapter", "adapter.safetensors:inf", "--out", "baked", *MODEL], "the weight must be"),
    (["fuse", "--out", "baked", *MODEL], "required: --adapter"),
    (["merge", "adapter.safetensors", "adapter.safetensors", "--out", "dir.safetensors", *MODEL], "is a folder"),
    (["merge", "adapter.safetensors", "adapter.safetensors", "--out", "x.png", *MODEL], "must end in .safetensors"),
    (["merge", "adapter.safetensors", "nope.safetensors", "--out", "x.safetensors", *MODEL], "file not found"),
    (["merge", "adapter.safetensors", "adapter.safetensors", "--out", "x.safetensors", "--weights", "1", "nan",
      *MODEL], "--weights: must be a finite number"),
    (["merge", "adapter.safetensors", "adapter.safetensors", "--out", "x.safetensors", "--weights", "1", *MODEL],
     "1 --weights for 2 adapters"),
    ([*A, "--out-dir", "file.txt"], "--out-dir: 'file.txt' is a file"),
    ([*A, "--out-dir", "audit", "--attack", "p4d:bogus"], "attack 'p4d' has no preset 'bogus'"),
    ([*A, "--out-dir", "audit", "--attack", "p4d", "p4d"], "an attack is listed twice"),
    ([*A, "--out-dir", "audit", "--seed", "-1"], "--seed: a seed is"),
    ([*A, "--out-dir", "audit", "--batch-size", "0"], "--batch-size: must be at least 1"),
    ([*A, "--out-dir", "audit", "--prompts", "nope.txt"], "file not found: 'nope.txt'"),
    ([*A, "--out-dir", "audit", "--adapter", "nope.safetensors"], "file not found"),
    ([*A, "--out-dir", "audit", "--judge", "eyes"], "invalid choice: 'eyes'"),
    ([*A], "required: --out-dir"),
    (["audit", "--concept", "bogus", "--out-dir", "audit", *MODEL], "unknown tinyworld concept 'bogus'"),
    (["tinyworld"], "required: SUBCOMMAND"),
    (["tinyworld", "train", "--out", "tw", "--work", "work", "--n-images", "0"], "--n-images: must be at least 1"),
    (["tinyworld", "train", "--out", "tw", "--work", "work", "--unet-steps", "-1"], "--unet-steps: must be"),
    (["tinyworld", "train", "--out", "file.txt", "--work", "work"], "'file.txt' is a file"),
    (["tinyworld", "render", "--prompt", "a red circle", "--out", "dir.png"], "'dir.png' is a folder"),
    (["tinyworld", "render", "--prompt", "a red circle", "--out", "file.txt/r.png"], "'file.txt' is a file"),
    (["tinyworld", "render", "--prompt", "a red circle", "--out", "r.txt"], "must end in .png"),
    (["tinyworld", "render", "--prompt", "a red blob", "--out", "r.png"], "names no tinyworld shape"),
    (["tinyworld", "render", "--prompt", "a red circle", "--seed", "-1", "--out", "r.png"], "--seed: a seed is"),
    (["tinyworld", "eval", "--seeds", "0", "-1", *MODEL], "--seeds: a seed is"),
    (["tinyworld", "eval", "--out", "dir.png", *MODEL], "must end in .json"),
    (["demo", "--method", "bogus", *MODEL], "unknown method 'bogus'"),
    (["demo", "--concept", "bogus", *MODEL], "unknown tinyworld concept 'bogus'"),
    (["demo", "--out-dir", "file.txt", *MODEL], "'file.txt' is a file"),
    (["demo", "--seed", "99999999999999999999", *MODEL], "--seed: a seed is"),
    (["bench", "--out-dir", "file.txt", *MODEL], "'file.txt' is a file"),
    (["bench", "--work", "file.txt", *MODEL], "'file.txt' is a file"),
    (["bench", "--quick", "--methods", "nope", "--out-dir", "bench", *MODEL], "unknown method 'nope'"),
    (["bench", "speed"], "invalid choice: 'speed'"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with an adapter, a file where folders go, folders where files go, a bad config file."""
    shutil.copy(EXAMPLE, tmp_path / "adapter.safetensors")
    (tmp_path / "file.txt").write_text("")
    (tmp_path / "bad.toml").write_text("lamb = 1\n")
    for name in ("dir", "dir.png", "dir.safetensors"):
        (tmp_path / name).mkdir()
    (tmp_path / "dir" / "keep").write_text("")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("argv, fragment", BAD, ids=[" ".join(a).replace("\udcff", "<ff>") for a, _ in BAD])
def test_bad_command_line_is_one_error_line_and_writes_nothing(argv, fragment, workdir, capsys):
    before = _tree(workdir)
    code = main(argv)  # anything but an ErasekitError would escape here as a traceback
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("erasekit: error: "), err
    assert fragment in err and "missing-model" not in err, err  # the named problem, found before loading
    assert _tree(workdir) == before


# ------------------------------------------------------------------------------------ what is written

def test_generate_file_names_keep_no_separator_or_control_character(tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "a red/circle\x1b[2J on\tblack\\..", "--seed", "0", "1",
                 "--out-dir", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert _tree(tmp_path) == ["out", *(f"out/{n}" for n in names)] and len(names) == 3, names
    assert names[0] == "000-seed0-a_red_circle_2J_on_black_...png", names


def test_render_creates_the_missing_folder_of_its_out(tmp_path):
    assert main(["tinyworld", "render", "--prompt", "a red circle", "--out", str(tmp_path / "new" / "r.png")]) == 0
    assert (tmp_path / "new" / "r.png").is_file()


def test_generate_api_rejects_out_of_range_settings(tinyworld_pipe):
    from erasekit.generate import generate

    for bad in ({"num_inference_steps": 0}, {"num_inference_steps": -1}, {"guidance_scale": float("nan")},
                {"batch_size": 0}):
        with pytest.raises(ConfigError):
            generate(tinyworld_pipe, ["a red circle"], [0], **bad)


def test_corrupt_or_foreign_single_file_model_is_one_error(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from erasekit import tinyworld

    (tmp_path / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}xxx")
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    for model in ("garbage", "foreign"):
        code = main(["generate", "--prompt", "a red circle", "--model", str(tmp_path / f"{model}.safetensors"),
                     "--model-config", str(tinyworld.path()), "--out", str(tmp_path / "x.png")])
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("erasekit: error: ")]
        assert code == 2 and len(errors) == 1 and "could not load model" in errors[0], errors
    assert not (tmp_path / "x.png").exists()


def test_inspect_escapes_control_characters_of_the_record(tmp_path, capsys):
    from erasekit.adapter import load_adapter

    path = tmp_path / "odd.safetensors"
    adapter = load_adapter(EXAMPLE)
    dataclasses.replace(adapter, concepts=("circ\x1b[2Jle\x07",)).save(path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "circ\\x1b[2Jle\\x07" in out


def test_a_kill_unwinds_like_ctrl_c_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    """`kill` (SIGTERM) during a command raises KeyboardInterrupt, so the atomic writers remove their temporaries
    (a SIGKILL cannot be caught: a killed run's temporaries are cleared when its folder is opened again)."""
    import signal

    import pytest

    from erasekit.cli import main
    from erasekit.core import files

    monkeypatch.setattr(signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)
    handlers = {}
    assert main(["env"]) == 0
    with pytest.raises(KeyboardInterrupt):
        with files.replacing(tmp_path / "x.safetensors") as tmp:
            tmp.write_bytes(b"half")
            handlers[signal.SIGTERM](signal.SIGTERM, None)
    assert list(tmp_path.iterdir()) == []


def test_a_closed_pipe_is_no_traceback():
    """`erasekit inspect x | head -1`: the reader goes away; the command stops quietly (exit 141, like cat)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.Popen([sys.executable, "-m", "erasekit", "inspect", str(root / "adapters/examples/uce-circle.safetensors")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # before it writes a line
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "Exception" not in err, err
