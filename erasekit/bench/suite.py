"""``erasekit bench``: every registered method on one fixed tinyworld suite, erased, audited and tabulated.

The suite (:data:`SUITE`) is one shape ("circle"), one colour ("red"), one texture ("striped"), a 4-concept
multi-erasure (circle, square, red, striped: one adapter), the same four composed (one adapter per concept,
erased separately and loaded together; for UCE, ESD-x, SPM and AdvUnlearn) and, for ESD-x, the same four adapters
loaded gated by prompt similarity (:func:`erasekit.compose.gated`). For each (method, entry) the bench

1. erases the entry's concepts with the registry's tinyworld defaults (:func:`erasekit.erase`), recording wall time,
   peak memory (process peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) and the adapter file's size;
2. audits the erased model per concept with :func:`erasekit.audit.audit` and tinyworld's judge: erasure rate on
   canonical prompts and on paraphrases (synonyms), attack success rate of every registered attack (pre-attack
   successes counted, as UnlearnDiffAtk and P4D define it) and the preservation drop (judge accuracy on other
   concepts, original → erased; for the multi-erasure, on scenes that show none of the four);
3. times generation with the adapter loaded against the bare model (overhead per image).

Rows are appended to ``results.json`` as they finish, and to a copy in the ``--work`` cache: a rerun with the same
cache skips finished rows (adapters and audits are cached there too, and what every row's audits share: the original
images and Ring-A-Bell's searches on the original text encoder, ``base-images``) unless the method's resolved config
or the budget changed since (a new preset or default: :func:`recipe`; a row audited on other preservation
prompts than today's, :func:`preservation_digest`, is audited again, its cached adapter kept; a cached row or
adapter that records no config, made by an erasekit from before rows recorded one, cannot be checked and is made
again), so a killed bench
loses at most the row it was in (of a composed row, the adapter it was making: each is kept as it is made; a
composed row copies the adapters the single-concept rows made with the same erasure, circle's from the shape row,
and they copy its), while a
fresh clone (no cache) runs the methods it is asked for again rather than resuming their committed rows, and keeps
the committed rows of every other method: ``erasekit bench --methods NAME`` adds a new method's rows to the
committed results. Runs of different ``--entries`` (which write ``results-full-<entries>.json``) can share one
cache, side by side. A Markdown table (``results.md``) and plots (``results.png``) are rebuilt from ``results.json``
after every row.

Launched on several processes (``accelerate launch -m erasekit.cli bench ...``, on one machine or several), the
processes share the rows: each makes its share, one at a time as one process would, and the main process writes
the one results file with the rows one process gives (:mod:`erasekit.bench.shards`).

Budgets (:data:`BUDGETS`): ``quick`` audits fewer prompts, runs the trained methods on the shape entry only at
half their tinyworld iterations (AdvUnlearn at a quarter of its iterations and inner attack steps), and attacks the
shape entry only (about 31 minutes on a 2-core CPU, 32 rows); ``full`` runs every method on every entry at its
tinyworld defaults and attacks every entry.

>>> from erasekit.bench import run_suite
>>> results = run_suite("quick", out_dir="benchmarks", methods=["uce"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..core import processes, sd
from ..core.files import atomic_write, exclusive_lock, remove_stale_temporaries
from ..errors import ConfigError
from ..methods import METHODS
from . import shards
from .measure import generation_overhead, peak_memory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One erasure job of the suite: a name and the concepts erased together, or, with ``composed``, erased one at
    a time (one adapter each) and loaded together; ``gate``: each composed adapter loaded through
    :func:`erasekit.compose.gated` with this metric (its adapters are those of the composed entry of the same
    concepts, taken from it when it has made them); ``methods``: the methods that run it (empty: every method)."""

    name: str
    concepts: tuple[str, ...]
    composed: bool = False
    methods: tuple[str, ...] = ()
    gate: str = ""


SUITE: tuple[Entry, ...] = (
    Entry("shape", ("circle",)),
    Entry("colour", ("red",)),
    Entry("texture", ("striped",)),
    Entry("multi", ("circle", "square", "red", "striped")),
    Entry("composed", ("circle", "square", "red", "striped"), composed=True,
          methods=("uce", "esd-x", "spm", "advunlearn")),
    # ESD-x's static deltas act on every prompt: summed, four cost the values not erased (README, "Many concepts")
    Entry("gated", ("circle", "square", "red", "striped"), composed=True, methods=("esd-x",), gate="tokencos"),
)

#: closed-form methods (seconds per erasure) run on every entry in every budget.
CLOSED_FORM = tuple(name for name, spec in METHODS.items() if spec.family == "closed-form")


@dataclass(frozen=True)
class Budget:
    """How much of the suite one run covers.

    Attributes:
        name: "quick" or "full".
        prompts: canonical prompts audited per concept (evenly subsampled from tinyworld's grid).
        seeds: seeds of every audited image.
        preserve: prompts of other concepts for the preservation drop.
        attack_prompts: canonical prompts attacked per concept (by every attack).
        attack_entries: entries whose concepts are attacked.
        trained_entries: entries the trained (non closed-form) methods run on.
        train_scale: factor on the trained methods' tinyworld iterations / epochs (and inner attack steps).
        method_scale: (method, factor) pairs that replace ``train_scale`` for methods whose cost grows faster
            than their iterations (AdvUnlearn: every outer step runs an inner attack).
        omitted: (method, reason) pairs this budget does not run unless asked by name (the table says why).
        timing_repeats: generations timed with and without each adapter (the best is kept).
        batch_size: audit images generated per pipeline call (``erasekit.audit.audit``'s ``batch_size``).
    """

    name: str
    prompts: int
    seeds: tuple[int, ...]
    preserve: int
    attack_prompts: int
    attack_entries: tuple[str, ...]
    trained_entries: tuple[str, ...]
    train_scale: float
    timing_repeats: int = 3
    batch_size: int = 8
    method_scale: tuple[tuple[str, float], ...] = ()
    omitted: tuple[tuple[str, str], ...] = ()

    def scale_for(self, method: str) -> float:
        return dict(self.method_scale).get(method, self.train_scale)

    def record(self) -> dict:
        """This budget as results files record it (JSON types)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def same_as(self, record: dict) -> bool:
        """Whether a results file's budget record is this budget (fields added since count at their defaults). An
        entry added to the suite since (the full budget's entry lists grow with :data:`SUITE`) keeps the other
        rows: the lists may have gained entries, never lost one."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        ours = self.record()
        grown = ("trained_entries", "attack_entries")
        return set(record) <= set(ours) and all(
            set(record.get(k, v)) <= set(v) if k in grown else
            record.get(k, json.loads(json.dumps(defaults.get(k)))) == v for k, v in ours.items())


BUDGETS = {
    "quick": Budget("quick", prompts=4, seeds=(0,), preserve=6, attack_prompts=2, attack_entries=("shape",),
                    trained_entries=("shape",), train_scale=0.5, timing_repeats=2,
                    method_scale=(("advunlearn", 0.25), ("advunlearn-fast", 0.25)),
                    omitted=(("advunlearn-fast", "the quick budget runs AdvUnlearn once (its pgd inner attack); the "
                              "fast_at variant costs as much again and runs in the full suite"),)),
    "full": Budget("full", prompts=8, seeds=(0, 1), preserve=16, attack_prompts=3,
                   attack_entries=tuple(e.name for e in SUITE), trained_entries=tuple(e.name for e in SUITE),
                   train_scale=1.0),
}

#: the folder of the work cache where every row's audits share their original (base-model) images
BASE_IMAGES = "base-images"

#: judges of erasekit and whether the tinyworld suite uses them (the table states why not).
JUDGES = {
    "tinyworld": None,
    "clip": "open_clip zero-shot needs local CLIP weights; none can be downloaded on the benchmark machine, and "
            "tinyworld's own judge is exact for tinyworld concepts",
    "nudenet": "NudeNet detects nudity; tinyworld has none (the optional `nudenet` extra is for real SD models)",
}


# ============================================================================================== the suite

def trained_options(method: str, concepts: Sequence[str], scale: float) -> dict:
    """Option overrides that scale a trained method's tinyworld iterations (or epochs, and inner attack steps)
    by ``scale``."""
    from ..methods.presets import resolve

    if method in CLOSED_FORM or scale == 1.0:
        return {}
    config = resolve(method, None, {}, concepts)
    out = {"progress": False} if "progress" in METHODS[method].options else {}
    for name in ("iterations", "epochs", "attack_steps"):
        value = getattr(config, name, None)
        if value is not None:
            out[name] = max(1, round(value * scale))
    return out


def recipe(pipe, method: str, concepts: Sequence[str], options: dict) -> dict:
    """The resolved config that ``erase(pipe, method, concepts, **options)`` runs on a tinyworld ``pipe`` (registry
    presets and tinyworld values, per-model defaults resolved), as JSON: what a cached row or adapter was made with."""
    from ..methods.presets import resolve

    config = resolve(method, pipe, options, tuple(concepts))
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def same_recipe(stored, current, method: str) -> bool:
    """Whether a cached row or adapter made with config ``stored`` (one :func:`recipe`, or a list of them for a
    composed entry) is one of ``current``: equal, except that a field added to ``method``'s config after it was made
    matches when ``current`` holds that field's own default (a field added at its default changes nothing)."""
    if isinstance(stored, list) or isinstance(current, list):
        return (isinstance(stored, list) and isinstance(current, list) and len(stored) == len(current)
                and all(same_recipe(s, c, method) for s, c in zip(stored, current)))
    if stored == current or not isinstance(stored, dict) or not isinstance(current, dict):
        return stored == current
    if set(stored) - set(current) or any(stored[k] != current[k] for k in stored):
        return False
    fields = {f.name: f.default for f in dataclasses.fields(METHODS[method].config_cls)}
    defaults = json.loads(json.dumps(fields, default=str))
    return all(k in defaults and current[k] == defaults[k] for k in set(current) - set(stored))


def entries_for(method: str, trained_entries: Sequence[str]) -> list[Entry]:
    """The suite entries ``method`` runs on: every entry open to it if it is closed-form, else those of them in
    ``trained_entries`` (the budget's)."""
    entries = [e for e in SUITE if not e.methods or method in e.methods]
    if method in CLOSED_FORM:
        return entries
    return [e for e in entries if e.name in trained_entries]


def _erasures(entry: Entry) -> list[tuple[str, ...]]:
    """The concept lists erased for ``entry``: all at once, or (composed) one adapter per concept."""
    return [(c,) for c in entry.concepts] if entry.composed else [entry.concepts]


def _safe_prompts(concepts: Sequence[str], n: int) -> list[str]:
    """Canonical grid prompts that show none of ``concepts`` (the multi-erasure's preservation set)."""
    from ..audit import subsample
    from ..tinyworld import concept_attribute
    from ..tinyworld.eval import standard_grid

    erased = {(concept_attribute(c), c) for c in concepts}
    scenes = [s for s in standard_grid() if not any(getattr(s, a) == c for a, c in erased)]
    return subsample([s.prompt() for s in scenes], n)


def preservation_prompts(entry: Entry, count: int) -> list[str]:
    """The ``count`` prompts of other concepts (a budget's ``preserve``) the erasure audit of ``entry`` judges
    preservation on: for one concept, tinyworld's balanced set of its attribute's other values
    (:func:`erasekit.tinyworld.prompts.preserve_prompts`); for several, canonical grid prompts that show none of
    them (one set, shared by the concepts)."""
    from ..audit import tinyworld_preserve_prompts

    if len(entry.concepts) == 1:
        return tinyworld_preserve_prompts(entry.concepts[0], count)
    return _safe_prompts(entry.concepts, count)


def preservation_digest(entry: Entry, count: int) -> str:
    """A short digest of :func:`preservation_prompts` (what a row records as ``preserve_set``): a row audited on
    another set is not finished (its erasure audit is made again; the adapter and attack audits are kept when the
    cache has them), and the table marks a committed row that was."""
    text = "\n".join(preservation_prompts(entry, count))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def audit_entry(pipe, entry: Entry, budget: Budget, work: Path, attacks: Sequence[str], progress: bool,
                base_cache: Path | None = None) -> dict:
    """Audit every concept of ``entry`` on ``pipe`` (its adapter loaded); metrics averaged over the concepts.
    ``base_cache``: the audits' shared folder of base-model images (``erasekit.audit.audit``'s)."""
    from ..audit import audit, subsample, tinyworld_paraphrases, tinyworld_prompts

    from ..audit.metrics import preservation
    from ..tinyworld import concept_attribute

    per_concept = {}
    attack = entry.name in budget.attack_entries
    shared = None  # several concepts share one preservation set: its images are made and judged once
    for concept in entry.concepts:
        canonical = subsample(tinyworld_prompts(concept), budget.prompts)
        paraphrases = [p for p, group in tinyworld_paraphrases(concept, canonical) if group == "synonym"]
        preserve = preservation_prompts(entry, budget.preserve) if shared is None else []
        attacked = subsample(canonical, budget.attack_prompts)
        kwargs = dict(seeds=budget.seeds, judge="tinyworld", grids=False, progress=progress,
                      batch_size=budget.batch_size, base_cache=base_cache)
        report = audit(pipe, concept, attacks=(), prompts=canonical, paraphrases=paraphrases,
                       preserve_prompts=preserve, out_dir=work / f"{concept}-erasure", **kwargs)
        erasure = report.summary
        if len(entry.concepts) > 1:  # every attribute's labels are in the records: read this concept's from them
            shared = shared or [r for r in report.records if r["kind"] == "preserve"]
            erasure["preservation"] = preservation([{**r, "attribute": concept_attribute(concept)} for r in shared])
        row = {"erasure_rate": erasure["target"]["erasure_rate"],
               "paraphrase_erasure_rate": erasure["paraphrase"]["erasure_rate"],
               "preservation_drop": erasure["preservation"].get("drop"),
               "preservation_broken": erasure["preservation"].get("broken"),
               "other_attributes_drop": erasure["preservation"].get("other_attributes_drop")}
        if attack:
            summary = audit(pipe, concept, attacks=attacks, prompts=attacked, paraphrases=[], preserve_prompts=[],
                            out_dir=work / f"{concept}-attacks", **kwargs).summary
            row["pre_asr"] = summary["target"]["pre_asr"]
            row["asr"] = {a: v["asr"] for a, v in summary["attacks"].items()}
            row["seconds_per_attacked_prompt"] = {a: v["mean_seconds"] for a, v in summary["attacks"].items()}
            row["seconds_per_concept"] = {a: v["prepare_seconds"] for a, v in summary["attacks"].items()
                                          if v.get("prepare_seconds") is not None}
            row["union_asr"] = summary["union_asr"]
        per_concept[concept] = row
    return {"per_concept": per_concept, **_average(list(per_concept.values()))}


def _average(rows: list[dict]) -> dict:
    from ..audit import mean

    out = {}
    for key in ("erasure_rate", "paraphrase_erasure_rate", "preservation_drop", "preservation_broken",
                "other_attributes_drop", "pre_asr", "union_asr"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = mean(values) if values else None
    for key in ("asr", "seconds_per_attacked_prompt", "seconds_per_concept"):
        names = sorted({a for r in rows for a in r.get(key, {})})
        if names:
            out[key] = {a: mean([r[key][a] for r in rows if r.get(key, {}).get(a) is not None]) for a in names}
    return out


def _rows_of_other_runs(work: Path, state: Path, spec: Budget) -> dict:
    """Rows that runs of other ``--entries`` finished into the cache ``work`` with this budget: key → rows."""
    rows = {}
    for other in sorted(work.glob("results*.json")):
        results = json.loads(other.read_text()) if other != state else {}
        if spec.same_as(results.get("budget", {"name": None})):
            for key, row in results.get("rows", {}).items():
                rows.setdefault(key, []).append(row)
    return rows


def check_selection(budget: str | Budget = "quick", methods: Sequence[str] | None = None,
                    attacks: Sequence[str] | None = None, entries: Sequence[str] | None = None) -> None:
    """A :class:`ConfigError` naming the first unknown budget, method, attack or suite entry (before any work)."""
    from ..attacks import ATTACKS

    if not isinstance(budget, Budget) and budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    for m in methods or ():
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for a in attacks or ():
        if a not in ATTACKS:
            raise ConfigError(f"unknown attack {a!r}; choose from {', '.join(ATTACKS)}")
    names = [e.name for e in SUITE]
    for e in entries or ():
        if e not in names:
            raise ConfigError(f"unknown suite entry {e!r}; choose from {', '.join(names)}")


def check_model(model=None, device: str = "auto"):
    """The pipeline of ``model`` (default: the packaged tinyworld), or a :class:`ConfigError` if it is not a
    tinyworld model (the suite's judge knows tinyworld's concepts only)."""
    from ..loading import load_pipeline
    from ..tinyworld import is_tinyworld

    pipe = load_pipeline(model, device=device)
    if not is_tinyworld(pipe):
        raise ConfigError("erasekit bench runs on a tinyworld model (its judge knows the suite's concepts); "
                          "use `erasekit bench perf` for real-model shapes")
    return pipe


def run_suite(budget: str | Budget = "quick", out_dir: str | Path = "benchmarks", *, methods: Sequence[str] | None = None,
              attacks: Sequence[str] | None = None, entries: Sequence[str] | None = None, work_dir: str | Path | None = None, model=None,
              device: str = "auto", progress: bool = True) -> dict:
    """Run the suite and write ``results[-full].json`` / ``.md`` / ``.png`` into ``out_dir``; returns the results.

    Args:
        budget: a key of :data:`BUDGETS`, or a :class:`Budget`.
        out_dir: where the results go (``results.json`` for quick, ``results-full.json`` for full).
        methods: registry names (default: all of :data:`erasekit.methods.METHODS`).
        attacks: registry names (default: all of :data:`erasekit.attacks.ATTACKS`).
        entries: names of :data:`SUITE` entries to run (default: all the budget runs).
        work_dir: cache of adapters and audits (default: ``out_dir/.bench-<budget>``); rerun to resume.
        model: a tinyworld model folder or name (default: the packaged one; "tinyworld-mmdit" or "mmdit": the
            packaged SD3-architecture one, whose results go to ``results-mmdit[-full].json`` and which runs the
            methods that erase from MMDiT transformers).
        device: "auto", "cpu", "cuda", ...
        progress: show progress bars.
    """
    from ..attacks import ATTACKS

    check_selection(budget, methods, attacks, entries)
    spec = budget if isinstance(budget, Budget) else BUDGETS[budget]
    budget = spec.name
    attacks = list(ATTACKS) if attacks is None else list(attacks)
    pipe = check_model(model, device)
    arch = "mmdit" if sd.is_mmdit(pipe) else "unet"
    unable = [m for m in (methods or ()) if arch not in METHODS[m].architectures]
    if unable:
        METHODS[unable[0]].check_architecture(pipe)  # the ConfigError naming the methods that can
    omitted = dict(spec.omitted) | {m: "does not erase from an MMDiT transformer (SD3)" for m, s in METHODS.items()
                                    if arch not in s.architectures}
    methods = [m for m in METHODS if m not in omitted] if methods is None else list(methods)
    spec = dataclasses.replace(spec, omitted=tuple(omitted.items()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if arch == "unet" else f"-{arch}"
    work = Path(work_dir) if work_dir else out_dir / f".bench-{budget}{suffix}"
    path = out_dir / ("results" + suffix + ("" if budget == "quick" else f"-{budget}") + ".json")
    if entries and budget != "quick":
        path = path.with_name(f"results-{budget}-{'-'.join(entries)}.json")
    work.mkdir(parents=True, exist_ok=True)
    state = work / path.name  # the resume state lives in the cache, so a committed results file is not resumed
    proc = processes.current()  # launched on several processes: they share the rows (erasekit.bench.shards)
    # runs of other --entries share the cache (one lock per job); a second run of these entries is refused
    with (exclusive_lock(work / f".{path.stem}.lock", f"bench work folder {str(work)!r} (for {path.name})")
          if proc.is_main_process else contextlib.nullcontext()):
        return _run_jobs(pipe, spec, methods, attacks, entries, work, state, path, progress, proc)


def _run_jobs(pipe, spec: Budget, methods, attacks, entries, work: Path, state: Path, path: Path,
              progress: bool, proc) -> dict:
    """The rows of :func:`run_suite`, holding its lock on ``state`` (the main process does), shared by the
    processes of ``proc``."""
    from ..core.provenance import run_record
    from ..errors import BusyError
    from .report import write_results

    methods = list(methods)
    results = json.loads(state.read_text()) if state.exists() else {}
    budget_record = spec.record()
    if not results and path.exists():  # a fresh cache: keep the committed rows of the methods not rerun here
        committed = json.loads(path.read_text())
        if spec.same_as(committed.get("budget", budget_record)):
            kept = {k: r for k, r in committed.get("rows", {}).items() if k.split("/")[0] not in methods}
            results = {**committed, "rows": kept} if kept else {}
    if not spec.same_as(results.get("budget", budget_record)):  # another budget's rows: start over
        results = {}
    results.update(budget=budget_record, run=run_record(), suite=[dataclasses.asdict(e) for e in SUITE],
                   judge="tinyworld", missing={**{f"judge {j}": why for j, why in JUDGES.items() if why},
                            **{f"method {m}": why for m, why in spec.omitted if m not in methods}})
    if proc.num_processes > 1:
        results["processes"] = proc.num_processes
    else:
        results.pop("processes", None)
    rows = results.setdefault("rows", {})
    siblings = _rows_of_other_runs(work, state, spec)
    before = list(rows)
    started = time.time()

    def save() -> None:  # the resume state, then the outputs
        results["seconds_this_run"] = round(time.time() - started, 1)
        atomic_write(state, json.dumps(results, indent=1, default=str).encode())
        write_results(path, results)

    def job(method: str, entry: Entry) -> tuple:  # (method, entry, options, resolved config(s) it is made with)
        options = trained_options(method, entry.concepts, spec.scale_for(method))
        made_with = [recipe(pipe, method, concepts, options) for concepts in _erasures(entry)]
        return method, entry, options, made_with if entry.composed else made_with[0]

    jobs = [job(method, entry) for method in methods for entry in entries_for(method, spec.trained_entries)
            if not entries or entry.name in entries]

    digests = {e.name: preservation_digest(e, spec.preserve) for e in SUITE}

    def made_alike(key: str, made_with) -> list[dict]:  # rows of this erasure, by this run or another into the cache
        found = [r for r in [rows.get(key), *siblings.get(key, [])] if r]
        # a row that records no config (made before rows recorded one) cannot be checked: it is made again
        return [r for r in found if "config" in r and same_recipe(r["config"], made_with, key.split("/")[0])]

    def finished(key: str, made_with) -> list[dict]:  # ... audited on today's preservation set
        return [r for r in made_alike(key, made_with) if r.get("preserve_set") == digests[key.split("/")[1]]]

    def adopt(key: str, made_with) -> bool:
        done = finished(key, made_with)
        if done:
            rows[key] = done[0]
        return bool(done)

    rank, world = int(proc.process_index), int(proc.num_processes)
    to_make = [f"{m}/{e.name}" for m, e, _, w in jobs if not finished(f"{m}/{e.name}", w)]
    # the main process's list decides (machines may not share the cache); every process has read before any writes
    seconds = (_row_seconds(path, spec) or _guessed_seconds(jobs, spec)) if world > 1 else None
    to_make, seconds = processes.gather(proc, (to_make, seconds))[0]
    mine = shards.deal(to_make, rank, world, seconds)
    order = list(range(len(jobs)))  # in suite order; shared, each process's longest rows first (a short tail)
    if world > 1:
        index = {f"{m}/{e.name}": i for i, (m, e, _, _) in enumerate(jobs)}
        order = [index[key] for key in shards.longest_first(list(index), seconds)]
    busy, made = [], []
    for i in order:
        method, entry, options, made_with = jobs[i]
        key = f"{method}/{entry.name}"
        if adopt(key, made_with) or (world > 1 and key not in mine):  # done, or another process's row
            continue
        job_dir = work / method / entry.name
        job_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            with exclusive_lock(job_dir.with_name(f".{entry.name}.lock"), f"bench job {key}"):
                siblings = _rows_of_other_runs(work, state, spec)  # it may have finished while we waited
                if adopt(key, made_with):
                    continue
                where = f" (process {rank} of {world})" if world > 1 else ""
                logger.info("[%d/%d] %s%s", i + 1, len(jobs), key, where)
                if progress:
                    print(f"[{i + 1}/{len(jobs)}] {key}{where}", flush=True)
                # a row of this erasure audited on another preservation set: its adapter is audited again
                earlier = next(iter(made_alike(key, made_with)), None)
                with processes.alone():  # the row's erasure and audits are this process's own
                    _run_job(pipe, method, entry, options, made_with, spec, job_dir, attacks, results, progress,
                             work / BASE_IMAGES, earlier)
        except BusyError:  # a run of other --entries is making this row: adopt it at the end
            busy.append(key)
            continue
        made.append(key)
        if world > 1:
            shards.save_rank_rows(state, rank, results, made)
        if proc.is_main_process:
            save()
    if world > 1:
        rows, busy = shards.merge(proc, rows, mine, busy, before, [f"{m}/{e.name}" for m, e, _, _ in jobs])
        results["rows"] = rows
    siblings = _rows_of_other_runs(work, state, spec)
    made_with_of = {f"{m}/{e.name}": w for m, e, _, w in jobs}
    entries_of = {e.name: e for e in SUITE}
    for key in list(rows):  # rows of other methods that another run into the cache has made again since
        method, entry = key.split("/")
        if key not in made_with_of and method in METHODS and entry in entries_of and siblings.get(key):
            adopt(key, job(method, entries_of[entry])[3])  # kept if it is one of today's itself
    for key in busy:  # made by the other run meanwhile, with this run's config: else it is not this run's row
        if not adopt(key, made_with_of[key]):
            rows.pop(key, None)
    if proc.is_main_process:
        save()
        shards.remove_rank_files(state)  # their rows are in the state now
    proc.wait_for_everyone()
    unfinished = [key for key in busy if key not in rows]
    if unfinished:
        raise BusyError(f"bench rows {', '.join(unfinished)} are being made by another erasekit bench on "
                        f"{str(work)!r}; rerun when it is done to add them")
    return results


def _guessed_seconds(jobs: list, spec: Budget) -> dict[str, float]:
    """A rough time for each row, to deal the rows when no earlier results file times them: trained erasures take
    minutes, closed-form ones seconds, and an attacked row a minute or two more (tinyworld's quick budget, 2026-12:
    trained rows 50–210 s, closed-form 5–80 s; only the order matters)."""
    guess = {}
    for method, entry, _, _ in jobs:
        trained = METHODS[method].family == "trained"
        guess[f"{method}/{entry.name}"] = (100.0 if trained else 5.0) * len(_erasures(entry)) + (
            60.0 if entry.name in spec.attack_entries else 0.0)
    return guess


def _row_seconds(path: Path, spec: Budget) -> dict[str, float]:
    """Each row's time in the budget's last results file beside ``path`` (what the rows are dealt by)."""
    last = path.with_name("results.json" if spec.name == "quick" else f"results-{spec.name}.json")
    try:
        rows = json.loads(last.read_text()).get("rows", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {key: float(r["row_seconds"]) for key, r in rows.items()
            if isinstance(r, dict) and isinstance(r.get("row_seconds"), (int, float))}


#: a row's erase record in its job folder (time, peak memory, options, config, budget), written once all its
#: adapters are made
ERASE_INFO = "erase.json"


def _same_erasure(info: dict | None, options: dict, made_with, method: str, spec: Budget) -> bool:
    """Whether an erase record (a row's, or one adapter's) was made with these options, this recipe and budget."""
    return bool(info and info.get("options") == json.loads(json.dumps(options)) and "config" in info
                and same_recipe(info["config"], made_with, method) and spec.same_as(info.get("budget", spec.record())))


def _made_by_other_rows(method: str, concepts: tuple[str, ...], job_dir: Path) -> bool:
    """Whether another suite entry that ``method`` runs erases ``concepts`` too (one of a composed entry's adapters
    is a single-concept entry's: circle is the shape entry's erasure)."""
    return any(job_dir.name != e.name and not e.gate and (not e.methods or method in e.methods)
               and concepts in _erasures(e) for e in SUITE)


def _reuse(job_dir: Path, path: Path, same) -> dict | None:
    """An adapter another row of the method made with the same erasure (``same(record)``: options, resolved config
    and budget), copied to ``path`` with its record, which says where it came from; None if there is none. The
    erasure is deterministic (seeded), so the copy holds the tensors this row would make, bit for bit (checked for
    ESD-x made in two processes), and its record keeps the time and memory its making took."""
    for other in sorted(job_dir.parent.iterdir()):
        if other == job_dir or not other.is_dir():
            continue
        for source in sorted(other.glob("adapter*.safetensors")):
            record = source.with_suffix(".json")
            try:
                info = json.loads(record.read_text()) if record.exists() else None
                if not same(info):
                    continue
                shutil.copyfile(source, path.with_suffix(".tmp"))
            except (OSError, ValueError):  # being remade by another process: look further, or erase
                continue
            path.with_suffix(".tmp").replace(path)
            info = {**info, "reused_from": f"{other.name}/{source.name}"}
            atomic_write(path.with_suffix(".json"), json.dumps(info).encode())
            return info
    return None


def _erase_job(pipe, method: str, erasures: list[tuple[str, ...]], adapter_paths: list[Path], options: dict,
               made_with: list[dict], spec: Budget, job_dir: Path) -> dict:
    """Make a row's adapters into ``job_dir``, each saved with its own erase record (``<adapter>.json``) as soon as
    it is made, so that a killed composed row (four trained adapters) resumes from the adapters it finished. A row
    whose erasure finished (its :data:`ERASE_INFO` written) with another config or budget is made again whole;
    everything else in ``job_dir`` (audits of other adapters) is removed. An adapter another row of the method made
    with the same erasure is copied rather than made again (:func:`_reuse`). Returns what was measured: the summed
    time and the largest peak (a copied adapter's as recorded where it was made), and which adapters were copied."""
    from ..api import erase

    def finished(path: Path, recipe_: dict) -> dict | None:
        record = path.with_suffix(".json")
        info = json.loads(record.read_text()) if record.exists() and path.exists() else None
        return info if _same_erasure(info, options, recipe_, method, spec) else None

    unfinished = not (job_dir / ERASE_INFO).exists()  # killed while erasing: its finished adapters are kept
    done = {path: finished(path, r) if unfinished else None for path, r in zip(adapter_paths, made_with)}
    keep = {p for p, info in done.items() if info} | {p.with_suffix(".json") for p, info in done.items() if info}
    for item in job_dir.iterdir():  # stale: other adapters, their audits
        if item in keep:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()
    try:
        # the erasures another row of the method also makes last, so that one made there meanwhile is reused
        order = sorted(range(len(erasures)), key=lambda i: _made_by_other_rows(method, erasures[i], job_dir))
        for i in order:
            concepts, path, recipe_ = erasures[i], adapter_paths[i], made_with[i]
            if done[path]:
                continue
            done[path] = _reuse(job_dir, path, lambda info: _same_erasure(info, options, recipe_, method, spec))
            if done[path]:
                continue
            with peak_memory(pipe.device) as peak:
                t0 = time.perf_counter()
                adapter = erase(pipe, method, list(concepts), **options)
                seconds = time.perf_counter() - t0
            adapter.save(path)  # atomic
            done[path] = {"erase_seconds": round(seconds, 2), "peak_memory_mb": peak["mb"],
                          "peak_memory_kind": peak["kind"], "options": options, "config": recipe_,
                          "budget": spec.record()}
            atomic_write(path.with_suffix(".json"), json.dumps(done[path]).encode())
    except BaseException:
        if not any(job_dir.iterdir()):
            job_dir.rmdir()  # nothing made: no empty folder left behind
        raise
    infos = [done[p] for p in adapter_paths]
    peak_info = max(infos, key=lambda i: i["peak_memory_mb"])
    reused = [i["reused_from"] for i in infos if "reused_from" in i]
    return {"erase_seconds": round(sum(i["erase_seconds"] for i in infos), 2),
            "peak_memory_mb": peak_info["peak_memory_mb"], "peak_memory_kind": peak_info["peak_memory_kind"],
            **({"reused": reused} if reused else {})}


def _run_job(pipe, method: str, entry: Entry, options: dict, made_with: dict, spec: Budget, job_dir: Path,
             attacks, results: dict, progress: bool, base_cache: Path, earlier: dict | None = None) -> None:
    """Erase, audit and time one row into ``results["rows"]``, holding the job's lock; the audits share the
    original images in ``base_cache``. ``earlier``: a row of the same erasure audited on another preservation set;
    if the cache holds its adapter (the same making: the erase time it records), the row keeps that row's time
    (what making it cost) and records the audit's own as ``reaudit_seconds``."""
    from .. import compose

    budget_record = spec.record()
    rows = results["rows"]
    key = f"{method}/{entry.name}"
    row_started = time.time()
    job_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(job_dir)
    erasures = _erasures(entry)
    adapter_paths = ([job_dir / f"adapter-{concepts[0]}.safetensors" for concepts in erasures] if entry.composed
                     else [job_dir / "adapter.safetensors"])
    erase_info_path = job_dir / ERASE_INFO

    erase_info = json.loads(erase_info_path.read_text()) if erase_info_path.exists() else None  # this job's?
    if not (all(p.exists() for p in adapter_paths) and _same_erasure(erase_info, options, made_with, method, spec)):
        erase_info = None
    cached = erase_info is not None
    if erase_info is None:  # (a gated entry's adapters are copied from the composed entry's: _erase_job's _reuse)
        measured = _erase_job(pipe, method, erasures, adapter_paths, options,
                              made_with if entry.composed else [made_with], spec, job_dir)
        erase_info = {**measured, "options": options, "config": made_with, "budget": budget_record}
        atomic_write(erase_info_path, json.dumps(erase_info).encode())
    row = {"method": method, "entry": entry.name, "concepts": list(entry.concepts),
           **{k: v for k, v in erase_info.items() if k != "budget"},  # the results file records the budget
           "adapter_mb": round(sum(path.stat().st_size for path in adapter_paths) / 1e6, 3),
           **({"adapters": len(adapter_paths)} if entry.composed else {})}
    adapters = [compose.gated(path, metric=entry.gate) if entry.gate else path for path in adapter_paths]
    if entry.gate:
        row["gate"] = entry.gate
    names = [compose.load(pipe, adapter, name=path.stem) for adapter, path in zip(adapters, adapter_paths)]
    try:
        row.update(audit_entry(pipe, entry, spec, job_dir, attacks, progress, base_cache))
        row["preserve_set"] = preservation_digest(entry, spec.preserve)
    finally:
        compose.unload(pipe, names)
    row["generation"] = generation_overhead(pipe, adapters, spec.timing_repeats)
    seconds = round(time.time() - row_started, 1)
    if cached and earlier and earlier.get("row_seconds") and earlier.get("erase_seconds") == row["erase_seconds"]:
        row["row_seconds"], row["reaudit_seconds"] = earlier["row_seconds"], seconds
    else:
        row["row_seconds"] = seconds
    row["made"] = {k: results["run"].get(k) for k in ("date", "git_commit")}  # rows outlive runs (resume, adopt)
    rows[key] = row
