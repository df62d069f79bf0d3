"""How erasure scales with the number of concepts erased at once: k = 1, 2, 4, 8, 12 tinyworld concepts (mixed
shapes, colours and textures; the same nested lists for every method), at the full suite's erasure budget (8
canonical prompts × seeds 0, 1 per concept, their synonyms, 16 prompts showing none of the k), without attacks.

    python benchmarks/scaling_tinyworld.py [METHOD ...] [--ks K ...]     # default: uce rece spm-composed, every k

A method is a registry name (one adapter erases the k concepts together), ``NAME-composed`` (one adapter per
concept, erased separately and loaded together; each concept's adapter is made once and reused for every k) or
``NAME-gated`` (the same adapters, each loaded gated by the prompt's ``tokencos`` similarity to its concept:
:func:`erasekit.compose.gated`).
Rows are written as they finish to ``benchmarks/scaling_tinyworld.json`` (resumable, and several methods may run
side by side, one process each: a row is added to the file as it is then; the cache is
``benchmarks/.bench-scaling``), and the plot to ``benchmarks/scaling_tinyworld.png``: erased % (canonical and
synonyms) and preservation drop against k, erase time and adapter size against k.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from erasekit import compose, erase
from erasekit.bench import BUDGETS, Budget
from erasekit.bench.suite import Entry, audit_entry, recipe
from erasekit.core.files import atomic_write
from erasekit.core.provenance import run_record
from erasekit.loading import load_pipeline

#: the erased concepts, in the order they are added: k concepts = the first k (k = 4 is the suite's ``multi``
#: entry). At k = 12 one value of each attribute is left to preserve: diamond, purple/orange, solid.
CONCEPTS = ("circle", "red", "striped", "square", "blue", "dotted", "triangle", "green", "star", "yellow",
            "outlined", "cross")
KS = (1, 2, 4, 8, 12)

full = BUDGETS["full"]
BUDGET = Budget("scaling", prompts=full.prompts, seeds=full.seeds, preserve=full.preserve, attack_prompts=1,
                attack_entries=(), trained_entries=(), train_scale=1.0)
OUT = Path(__file__).with_name("scaling_tinyworld.json")
PLOT = OUT.with_suffix(".png")
WORK = Path(__file__).with_name(".bench-scaling")


#: the gate of ``NAME-gated`` rows: tinyworld's 64-wide encoder does not separate prompts by the flattened clipcos
GATE_METRIC = "tokencos"


def split(method: str) -> tuple[str, bool]:
    """(registry name, composed?) of a row's method."""
    for suffix in ("-composed", "-gated"):
        if method.endswith(suffix):
            return method[:-len(suffix)], True
    return method, False


def adapters_for(pipe, method: str, concepts: tuple[str, ...]) -> tuple[list[Path], float]:
    """The adapter files for one row (made, or found in the cache with the same config) and the seconds spent
    erasing them (for composed rows: the sum of the single-concept erasures)."""
    base, composed = split(method)
    jobs = [(c,) for c in concepts] if composed else [concepts]
    paths, seconds = [], 0.0
    for job in jobs:
        name = "-".join(job) if len(job) <= 2 else f"{job[0]}-and-{len(job) - 1}-more"
        path = WORK / base / f"{name}.safetensors"
        info_path = path.with_suffix(".json")
        made_with = recipe(pipe, base, job, {})
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        if not (path.exists() and info.get("config") == made_with):
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            erase(pipe, base, list(job)).save(path)
            info = {"config": made_with, "erase_seconds": round(time.perf_counter() - t0, 2)}
            atomic_write(info_path, json.dumps(info).encode())
        paths.append(path)
        seconds += info["erase_seconds"]
    return paths, seconds


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for method in dict.fromkeys(r["method"] for r in results["rows"].values()):
        rows = sorted((r for r in results["rows"].values() if r["method"] == method), key=lambda r: r["k"])
        ks = [r["k"] for r in rows]
        line = axes[0].plot(ks, [100 * r["erasure_rate"] for r in rows], "o-", label=method)[0]
        axes[0].plot(ks, [100 * r["paraphrase_erasure_rate"] for r in rows], "x--", color=line.get_color())
        axes[1].plot(ks, [100 * r["preservation_drop"] for r in rows], "o-", label=method)
        axes[2].plot(ks, [r["erase_seconds"] for r in rows], "o-", label=method)
        axes[3].plot(ks, [r["adapter_mb"] for r in rows], "o-", label=method)
    for ax, title in zip(axes, ("erased % (o canonical, x synonyms)", "preservation drop (points)",
                                "erase time (s)", "adapter size (MB)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("concepts erased at once (k)")
        ax.set_xticks(KS)
    axes[0].axhline(90, color="grey", lw=0.5)
    axes[1].axhline(5, color="grey", lw=0.5)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"tinyworld, {results['run'].get('date', '')}, {results['run'].get('machine', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=80, format="png")
    plt.close(fig)


def save_row(results: dict, key: str) -> None:
    """Write ``results`` with its row ``key`` into the file as it is now: runs of other methods side by side (one
    process each) add their rows to the same file, and none drops another's."""
    latest = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["rows"].update({k: row for k, row in latest.get("rows", {}).items() if k != key})  # in place
    atomic_write(OUT, json.dumps(results, indent=1, default=str).encode())


def main(methods: list[str], ks: tuple[int, ...] = KS) -> dict:
    pipe = load_pipeline(None, device="cpu")
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results.update(budget=BUDGET.record(), concepts=list(CONCEPTS), run=run_record())
    rows = results.setdefault("rows", {})
    for method in methods:
        for k in ks:
            key = f"{method}/k{k}"
            concepts = CONCEPTS[:k]
            paths, seconds = adapters_for(pipe, method, concepts)
            made_with = [json.loads(p.with_suffix(".json").read_text())["config"] for p in paths]
            if rows.get(key, {}).get("config") == made_with:
                continue
            print(f"{key}: {', '.join(concepts)}", flush=True)
            started = time.time()
            gated = method.endswith("-gated")
            names = [compose.load(pipe, compose.gated(p, metric=GATE_METRIC) if gated else p, name=p.stem)
                     for p in paths]
            # one audit folder per set of adapters: a killed row resumes, a row of new adapters starts afresh
            made = "".join(e["digest"] for e in compose.list_erasures(pipe))
            folder = WORK / "audits" / key / hashlib.sha256(made.encode()).hexdigest()[:12]
            try:
                audited = audit_entry(pipe, Entry(f"k{k}", concepts), BUDGET, folder, (),
                                      progress=False, base_cache=WORK / "base-images")
            finally:
                compose.unload(pipe, names)
            rows[key] = {"method": method, "k": k, "concepts": list(concepts), "erase_seconds": round(seconds, 2),
                         "adapter_mb": round(sum(p.stat().st_size for p in paths) / 1e6, 3),
                         "adapters": len(paths), **({"gate": GATE_METRIC} if gated else {}),
                         **audited, "row_seconds": round(time.time() - started, 1),
                         "made": {f: results["run"].get(f) for f in ("date", "git_commit")},
                         "load_average": [round(x, 1) for x in os.getloadavg()], "config": made_with}
            save_row(results, key)
            plot(results)
            r = rows[key]
            print(f"  erased {r['erasure_rate']:.3f} (synonyms {r['paraphrase_erasure_rate']:.3f}), preservation "
                  f"drop {r['preservation_drop']:.3f}, erase {r['erase_seconds']} s, {r['adapter_mb']} MB",
                  flush=True)
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", default=["uce", "rece", "spm-composed"])
    parser.add_argument("--ks", nargs="+", type=int, default=list(KS), choices=KS, help="the k to run (default: all)")
    args = parser.parse_args()
    main(args.methods, tuple(args.ks))
