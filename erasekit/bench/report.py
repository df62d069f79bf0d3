"""The bench's outputs, rebuilt from ``results.json`` after every row: the Markdown tables (``results.md``) and
the plots (``results.png``)."""

from __future__ import annotations

import json
from pathlib import Path

from .suite import SUITE

# ============================================================================================== outputs

def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def _s(x) -> str:
    return "–" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.0f}")


def _ordered_rows(results: dict) -> dict:
    """The rows of a results dict in registry order, then suite order, whatever order they ran in."""
    from ..methods import METHODS

    order = {name: i for i, name in enumerate([*METHODS, *(e.name for e in SUITE)])}
    return dict(sorted(results.get("rows", {}).items(), key=lambda kv: (
        order.get(kv[1].get("method"), len(order)), order.get(kv[1].get("entry"), 0))))


def table(results: dict) -> str:
    """The Markdown table of a results dict (what ``results.md`` holds and the README shows)."""
    from ..methods import METHODS

    run = results.get("run", {})
    rows = _ordered_rows(results)
    budget = results.get("budget", {})
    commits = {r["made"]["git_commit"] for r in rows.values() if r.get("made")} - {run.get("git_commit")}
    unrecorded = " and before" if any(not r.get("made") for r in rows.values()) else ""  # rows from before "made"
    made = f" (rows made earlier at {', '.join(sorted(commits))}{unrecorded})" if commits else ""
    lines = [f"erasekit bench ({budget.get('name')}) · {run.get('date')} · {run.get('machine')} · torch "
             f"{run.get('torch')} · diffusers {run.get('diffusers')} · commit {run.get('git_commit')}{made} · "
             f"{budget.get('prompts')} canonical prompts × seeds {budget.get('seeds')} per concept, judge: tinyworld",
             "",
             "| method | entry | erased % (canonical) | erased % (synonyms) | preservation drop (pts) | "
             "ASR % (all attacks) | erase s | peak MB | adapter MB | generation overhead |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    current = _preservation_digests(budget)
    earlier = []
    for row in rows.values():
        gen = row.get("generation", {})
        drop = row.get("preservation_drop")
        drop = "–" if drop is None else f"{100 * drop:.1f}"
        if current and drop != "–" and row.get("preserve_set") != current.get(row["entry"]):
            drop += " °"
            earlier.append(f"{row['method']}/{row['entry']}")
        overhead = "–" if not gen else f"{100 * gen['overhead']:+.0f} %"
        asr = _pct(row.get("union_asr")) if row.get("asr") else "not attacked"
        lines.append(
            f"| {row['method']} | {row['entry']} | {_pct(row.get('erasure_rate'))} | "
            f"{_pct(row.get('paraphrase_erasure_rate'))} | {drop} | "
            f"{asr} | {_s(row.get('erase_seconds'))} | "
            f"{_s(row.get('peak_memory_mb'))} | {row.get('adapter_mb')} | "
            f"{overhead} |")
    if earlier:
        lines += ["", f"° {len(earlier)} rows' preservation drop was measured on an earlier set of prompts of other "
                      "concepts (before 2026-12-05 every k-th grid scene: a texture's 16 were all solid, the quick "
                      "budget's colour ones all green); `erasekit bench --methods M --entries E` audits the row "
                      "again (its adapter too is made again unless the work cache holds it)."]
    attacked = [r for r in rows.values() if r.get("asr")]
    if attacked:
        names = sorted({a for r in attacked for a in r["asr"]})
        lines += ["", "Attack success rate % per attack (pre-attack successes counted) · in brackets, mean seconds "
                      "per attacked prompt, + seconds once per concept (CCE's learned token, Ring-A-Bell's concept "
                      "vector)", "",
                  "| method | entry | pre-attack | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for r in attacked:
            cells = []
            for a in names:
                sec = (r.get("seconds_per_attacked_prompt") or {}).get(a)
                once = (r.get("seconds_per_concept") or {}).get(a)
                cost = "" if sec is None else f" ({sec:.1f} s" + (f" + {once:.0f} s" if once is not None else "") + ")"
                cells.append(f"{_pct(r['asr'].get(a))}{cost}")
            lines.append(f"| {r['method']} | {r['entry']} | {_pct(r.get('pre_asr'))} | " + " | ".join(cells) + " |")
    lines += _per_concept_table(rows.values())
    from ..attacks import ATTACKS

    missing = dict(results.get("missing", {}))
    for a in ATTACKS:
        if attacked and not any(a in r["asr"] for r in attacked):
            missing.setdefault(f"attack {a}", "not in this run (`erasekit bench --attacks` selected others, or "
                                              "the rows were made before it was registered)")
    for m in METHODS:
        if not any(r["method"] == m for r in rows.values()):
            missing.setdefault(f"method {m}", "not in this run (`erasekit bench --methods` selected others)")
    for key in unrun_rows(results):
        method, entry = key.split("/")
        missing.setdefault(f"row {key}", f"not run yet (`erasekit bench --methods {method} --entries {entry}` adds it)")
    if missing:
        lines += ["", "Not in the table:", ""] + [f"- {k}: {v}" for k, v in missing.items()]
    total = sum(r.get("row_seconds", 0) for r in rows.values())
    if total:
        shared = f"; {results['processes']} processes shared them" if results.get("processes", 1) > 1 else ""
        lines += ["", f"Row time: {total / 60:.1f} min, summed over the rows above (erase + audit + generation timing; "
                      f"model loading excluded{shared})."]
    return "\n".join(lines) + "\n"


def _preservation_digests(budget: dict) -> dict[str, str]:
    """Each suite entry's current preservation set (:func:`erasekit.bench.suite.preservation_digest`) under a
    results file's budget record ({} if it records no ``preserve``)."""
    from .suite import preservation_digest

    count = budget.get("preserve")
    return {e.name: preservation_digest(e, count) for e in SUITE} if isinstance(count, int) else {}


def _per_concept_table(rows) -> list[str]:
    """Lines of the table of the rows that erase several concepts (the 4-concept entries), one line per concept:
    its erasure rates, union ASR and the attack that brings it back most often (issue #22 §3 asks for each
    concept's union ASR, which the main table averages)."""
    several = [r for r in rows if len(r.get("per_concept") or {}) > 1]
    if not several:
        return []
    lines = ["", "Rows that erase several concepts, per concept (each concept's own prompts and attacks)", "",
             "| method | entry | concept | erased % (canonical) | erased % (synonyms) | union ASR % | "
             "strongest attack (ASR %) |", "|---|---|---|---|---|---|---|"]
    for r in several:
        for concept, c in r["per_concept"].items():
            asr = c.get("asr") or {}
            top = max(asr, key=lambda a: (asr[a] or 0), default=None)
            strongest = "–" if top is None else f"{top} ({_pct(asr[top])})"
            union = _pct(c.get("union_asr")) if asr else "not attacked"
            lines.append(f"| {r['method']} | {r['entry']} | {concept} | {_pct(c.get('erasure_rate'))} | "
                         f"{_pct(c.get('paraphrase_erasure_rate'))} | {union} | {strongest} |")
    return lines


def unrun_rows(results: dict) -> list[str]:
    """``method/entry`` rows that the results' budget runs for a method in them but that have not been made (an
    entry added to the suite after the rows were)."""
    from .suite import BUDGETS, entries_for

    rows = results.get("rows", {})
    record = results.get("budget", {})
    spec = BUDGETS.get(record.get("name"))
    trained = spec.trained_entries if spec and spec.same_as(record) else record.get("trained_entries", ())
    methods = dict.fromkeys(r["method"] for r in rows.values())
    return [f"{m}/{e.name}" for m in methods for e in entries_for(m, trained) if f"{m}/{e.name}" not in rows]


def plot(results: dict, path: Path) -> Path | None:
    """Four panels: erasure rates, preservation drop, attack success rates, erase time (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in _ordered_rows(results).values() if r["entry"] == "shape"]
    if not rows:
        return None
    labels = [r["method"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    ax = axes[0][0]
    ax.bar([i - 0.2 for i in x], [100 * (r["erasure_rate"] or 0) for r in rows], 0.4, label="canonical")
    ax.bar([i + 0.2 for i in x], [100 * (r["paraphrase_erasure_rate"] or 0) for r in rows], 0.4, label="synonyms")
    ax.set_title("erasure rate % (circle)")
    ax.legend()
    ax = axes[0][1]
    ax.bar(list(x), [100 * (r["preservation_drop"] or 0) for r in rows], color="tab:red")
    ax.set_title("preservation drop, points (other shapes)")
    ax = axes[1][0]
    names = sorted({a for r in rows for a in r.get("asr", {})})
    width = 0.8 / max(1, len(names))
    for j, a in enumerate(names):
        ax.bar([i - 0.4 + width * (j + 0.5) for i in x], [100 * (r.get("asr", {}).get(a) or 0) for r in rows],
               width, label=a)
    ax.set_title("attack success rate % (circle)")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    ax.bar(list(x), [r["erase_seconds"] for r in rows], color="tab:green")
    ax.set_yscale("log")
    ax.set_title("erase time, s (log)")
    for ax in axes.flat:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    fig.suptitle(f"erasekit bench ({results['budget']['name']}), {results['run']['date']}, {results['run']['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
    return path


def write_results(path: Path, results: dict) -> None:
    """``path`` (JSON), and beside it the Markdown table and the plots; each written atomically."""
    from ..core.files import atomic_write, replacing

    atomic_write(path, json.dumps(results, indent=1, default=str).encode())
    atomic_write(path.with_suffix(".md"), table(results).encode())
    with replacing(path.with_suffix(".png")) as tmp:
        made = plot(results, tmp)
    if not made:  # no plottable row: nothing replaced it but an empty file
        path.with_suffix(".png").unlink()
    readme = path.parent.parent / "README.md"
    marker = {"results.json": "quick", "results-full.json": "full", "results-mmdit.json": "quick-mmdit"}.get(path.name)
    if marker and readme.is_file():
        update_readme(readme, results, marker)


def update_readme(readme: Path, results: dict, marker: str) -> bool:
    """Put the table of ``results`` between ``<!-- bench:MARKER -->`` and ``<!-- /bench:MARKER -->`` in ``readme``
    (the quick run's whole table; the full suite's header and main table, its per-attack table stays in
    ``results-full.md``), so that a bench run keeps the README's tables true. False when the markers are absent."""
    from ..core.files import replace_between

    md = table(results)
    block = md if marker.startswith("quick") else "\n\n".join(md.split("\n\n")[:2]).strip() + "\n"
    return replace_between(readme, f"<!-- bench:{marker} -->\n", f"<!-- /bench:{marker} -->", block)


