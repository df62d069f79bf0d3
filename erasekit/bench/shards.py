"""The bench's rows split over processes (``accelerate launch -m erasekit.cli bench``, ``torchrun``): which rows a
process makes, the file of its finished rows, and the merge into the one results file the main process writes.

The rows still to make (those no results file of the cache holds with the same config) are dealt longest first,
each to the process with the least expected time so far (a row's time is the one the last results file recorded),
and each process makes its rows longest first; the list and the times are the main process's (read before any
process writes; on machines that do not share the cache, another process may find one of its rows done in its own
cache and send that), so the split is the same everywhere. A process appends each row it finishes to its own file
in the cache, ``<results>.rank<k>.json`` (atomically; a resumed run, with any number of processes, adopts those rows
as it adopts the rows of runs of other ``--entries``), and at the end the rows of every process are gathered (over
``torch.distributed``, so the processes may run on different machines) and the main process writes the results, in
the order one process would have made them. One process: none of this happens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..core import processes
from ..core.files import atomic_write


def rank_file(state: Path, rank: int) -> Path:
    """The file of the rows process ``rank`` finished, beside the resume state ``state`` (``results*.json``: the
    bench reads it back as it reads other runs' results)."""
    return state.with_name(f"{state.stem}.rank{rank}.json")


def expected(keys: Sequence[str], seconds: Mapping[str, float]) -> dict[str, float]:
    """Each key's expected time: its ``seconds``, or the longest known for a row without one."""
    longest = max(seconds.values(), default=1.0)
    return {key: float(seconds.get(key, longest)) for key in keys}


def longest_first(keys: Sequence[str], seconds: Mapping[str, float]) -> list[str]:
    """``keys`` by their :func:`expected` time, longest first (equal times keep their order)."""
    times = expected(keys, seconds)
    return sorted(keys, key=lambda k: -times[k])


def deal(keys: Sequence[str], rank: int, count: int, seconds: Mapping[str, float] | None = None) -> set[str]:
    """The rows (``keys`` of the rows still to make, in suite order) that process ``rank`` of ``count`` makes: in
    turn (row ``i`` to process ``i mod count``), or with ``seconds`` (a row's expected time, e.g. from the last
    results file) the longest rows first (:func:`longest_first`), each to the process with the least time so far
    (ties: the lowest rank)."""
    keys = list(keys)
    if seconds is None:
        return set(keys[rank::count])
    times = expected(keys, seconds)
    load, share = [0.0] * count, [[] for _ in range(count)]
    for key in longest_first(keys, seconds):
        k = min(range(count), key=lambda i: (load[i], i))
        load[k] += times[key]
        share[k].append(key)
    return set(share[rank])


def save_rank_rows(state: Path, rank: int, results: dict, made: Sequence[str]) -> None:
    """Write the rows ``made`` by process ``rank`` (with the run's budget record) to its file."""
    record = {"budget": results["budget"], "rank": rank, "rows": {key: results["rows"][key] for key in made}}
    atomic_write(rank_file(state, rank), json.dumps(record, indent=1, default=str).encode())


def merge(proc, rows: dict, mine: Iterable[str], busy: Sequence[str], before: Sequence[str],
          order: Sequence[str]) -> tuple[dict, list[str]]:
    """Every process's rows: ``rows`` (this process's, with those it adopted) and each process's rows of its share
    (``mine``: made, or found in its cache), in the order one process gives them (``before``: the keys the results
    held at the start; then ``order``, the suite's rows), and the keys some process found busy (made by another
    bench on the cache)."""
    shared = processes.gather(proc, {"rows": {key: rows[key] for key in mine if key in rows}, "busy": list(busy)})
    merged = dict(rows)
    for part in shared:
        merged.update(part["rows"])
    out = {key: merged[key] for key in [*before, *order] if key in merged}
    out.update({key: row for key, row in merged.items() if key not in out})
    return out, [key for part in shared for key in part["busy"] if key not in out]


def remove_rank_files(state: Path) -> None:
    """Remove the rows files of every process (their rows are in the resume state now)."""
    for path in state.parent.glob(f"{state.stem}.rank*.json"):
        path.unlink(missing_ok=True)


__all__ = ["deal", "expected", "longest_first", "merge", "rank_file", "remove_rank_files", "save_rank_rows"]
