"""The README is the front door: its benchmark table is the committed one, and CI runs its test command."""

import json
import re
from pathlib import Path

from erasekit.bench import table

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_shows_the_committed_benchmark_table():
    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    md = table(results)
    assert md == (ROOT / "benchmarks" / "results.md").read_text()  # results.md is rebuilt from results.json
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) > 20
    missing = [row for row in rows if row not in README]
    assert not missing, f"README's benchmark table is stale (rerun `erasekit bench --quick`): {missing[:3]}"
    assert results["run"]["date"][:10] in README and results["run"]["machine"] in README


def test_readme_shows_the_committed_tinyworld_mmdit_table():
    results = json.loads((ROOT / "benchmarks" / "results-mmdit.json").read_text())
    md = table(results)
    assert md == (ROOT / "benchmarks" / "results-mmdit.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) > 10
    missing = [row for row in rows if row not in README.split("<!-- bench:quick-mmdit -->")[1]]
    assert not missing, f"README's tinyworld-mmdit table is stale (rerun `erasekit bench --quick --model mmdit`): {missing[:3]}"


def test_readme_shows_the_committed_full_suite_table():
    from erasekit.bench import SUITE
    from erasekit.methods import METHODS

    results = json.loads((ROOT / "benchmarks" / "results-full.json").read_text())
    md = table(results)
    assert md == (ROOT / "benchmarks" / "results-full.md").read_text()
    from erasekit.bench.report import unrun_rows

    ran = {key.split("/")[0] for key in results["rows"]}  # a method added since: named as not in this run
    assert all(f"method {m}: not in this run" in md for m in METHODS if m not in ran)
    expected = {f"{m}/{e.name}" for m in METHODS if m in ran for e in SUITE if not e.methods or m in e.methods}
    unrun = unrun_rows(results)  # rows of an entry added since: the table names them as not run yet
    assert set(results["rows"]) | set(unrun) == expected and all(f"row {k}: not run yet" in md for k in unrun)
    header, main = md.split("\n\n")[:2]
    missing = [row for row in main.splitlines() if row not in README]
    assert not missing, f"README's full-suite table is stale (see benchmarks/results-full.md): {missing[:3]}"
    assert header in README


def test_ci_runs_the_readme_test_command():
    command = re.search(r"pip install -e \"\.\[test\]\" && (python -m pytest[^\n`]*)", README).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'pip install -e ".[test]" && {command}' in ci
