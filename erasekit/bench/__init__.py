"""``erasekit bench``: every registered method on one fixed tinyworld suite, erased, audited and tabulated
(:mod:`.suite`; its tables and plots: :mod:`.report`), and ``erasekit bench perf``: speed and memory on real
models' shapes (:mod:`.perf`). Run records (date, machine, versions, commit) come from ``erasekit.core.provenance``.

>>> from erasekit.bench import run_suite
>>> results = run_suite("quick", out_dir="benchmarks", methods=["uce"])  # doctest: +SKIP
"""

from __future__ import annotations

from .perf import run_perf
from .report import plot, table, write_results
from .suite import (
    BUDGETS, CLOSED_FORM, JUDGES, SUITE, Budget, Entry, audit_entry, generation_overhead, peak_memory, recipe,
    run_suite, trained_options,
)

__all__ = ["BUDGETS", "Budget", "CLOSED_FORM", "Entry", "JUDGES", "SUITE", "audit_entry", "generation_overhead",
           "peak_memory", "plot", "recipe", "run_perf", "run_suite", "table", "trained_options", "write_results"]
