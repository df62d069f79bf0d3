"""The README's tour runs as printed: its CLI lines, in order, on tinyworld in a fresh folder (the ``bench`` lines
excepted: the benchmark covers them), then its Python example in the same folder. Each command exits 0 and writes
what it names. Parsed from the README, so the README stays true."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _tour_block(language: str) -> str:
    tour = README.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", tour, re.S).group(1)


def tour_commands() -> list[list[str]]:
    commands = []
    for line in _tour_block("bash").splitlines():
        line = line.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line))
    return commands


def _outputs(argv: list[str]) -> list[str]:
    """What a command says it writes: the values of --out / --out-dir."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out", "--out-dir")]


def test_the_tour_lists_the_main_commands():
    commands = tour_commands()
    assert all(argv[0] == "erasekit" for argv in commands)
    names = {argv[1] for argv in commands}
    assert {"erase", "generate", "inspect", "export", "fuse", "audit", "merge", "bench"} <= names


def test_the_tour_runs_as_printed(tmp_path, monkeypatch, capsys):
    from erasekit.cli import main

    monkeypatch.chdir(tmp_path)
    for argv in tour_commands():
        if argv[1] == "bench":
            continue
        try:  # the `erasekit` entry point, in this process (one Python start for the whole tour)
            code = main(argv[1:])
        except SystemExit as e:  # argparse's --help exits
            code = e.code
        assert code == 0, f"{shlex.join(argv)} exited {code}:\n{capsys.readouterr().err[-2000:]}"
        for out in _outputs(argv):
            target = tmp_path / out
            assert target.exists(), f"{shlex.join(argv)} did not write {out}"
            if target.is_dir():
                assert any(target.iterdir()), f"{shlex.join(argv)} left {out} empty"
    code = _tour_block("python")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, f"the tour's Python example failed:\n{run.stderr[-3000:]}"
    for written in re.findall(r"""(?:save\(|out_dir=)["']([^"']+)["']""", code):
        assert (tmp_path / written).exists(), f"the Python example did not write {written}"
