"""Audit an erasure: judge the erased model on the concept's prompts, on paraphrases, under adversarial attacks,
and on the other concepts it should keep (docs/design.md §5, with the metric definitions).

Metrics (each a small pure function in ``erasekit.audit.metrics``, checked by hand in the tests):

* **erasure rate** = 1 − (share of images in which the judge sees the concept), on the canonical prompts and on
  paraphrases (synonyms, held-out templates);
* **pre-ASR** = share of (prompt, seed) pairs whose *un-attacked* erased image already shows the concept;
* **ASR** = share of pairs broken with or without the attack, ASR = pre-ASR + newly broken (UnlearnDiffAtk's
  convention, Diffusion-MU-Attack#11; attacks are not run on pairs that already fail); the union over attacks is
  P4D's UNION row;
* **preservation**: on prompts of the *other* concepts, the judge's accuracy with adapters disabled vs enabled and
  the drop (tinyworld; UnlearnCanvas' IRA/CRA), or the CLIP score of image and prompt (real models, CLIP judge).

Results stream to ``out_dir/results.jsonl``, one line per (kind, prompt, seed, attack), written (and flushed) as
soon as each is computed; a rerun with the same arguments reads the file and skips what is there, so a killed audit
resumes without recomputing and loses at most the line being written. Every random draw of a line is seeded from
that line's own key, so the file does not depend on interruptions or on sharding. Under ``accelerate launch`` each
process takes every ``world_size``-th (prompt, seed) pair and writes ``results.rank{k}.jsonl``; the main process
merges them after ``wait_for_everyone``. Each process holds a lock on the folder for its rank
(``.audit.rank{k}.lock``), so a second identical audit on the same folder is refused
(``erasekit.errors.BusyError``) instead of computing the same lines; files are written through temporaries of
their own names, and those a kill left behind are removed when the folder is opened again. ``report.md`` /
``report.html`` (+ ``summary.json``) are rebuilt from the results alone: summary table, plots (matplotlib,
optional) and image grids (original | erased | attacked).

The package: ``metrics`` (pure), ``store`` (the folder: results, manifest, images, state), ``prompts`` (the prompt
sets, tinyworld's defaults), ``runner`` (the steps of :func:`audit`), ``report`` (tables, plots, grids, pages),
``cache`` (the base-model images that audits of one model share).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core import sd
from ..errors import ConfigError
from .metrics import (
    KINDS, accuracy, attack_success_rate, erasure_rate, harmonic_mean, mean, pre_asr, preservation,
    preservation_drop, rate, summarize, union_asr,
)
from .prompts import (
    DEFAULT_PRESERVE, DEFAULT_PROMPTS, prompt_sets, subsample, tinyworld_paraphrases, tinyworld_preserve_prompts,
    tinyworld_prompts,
)
from .report import AuditReport, summary_table, write_report
from ..core import processes
from .runner import AuditRun, attack_plans, build_manifest, resolve_judge
from .store import MANIFEST, RESULTS, check_manifest, merge_results, read_results, unit_id, unit_key



def audit(pipe, concept: str, attacks: Sequence[str] = ("unlearndiffatk",), prompts: Sequence[str] | None = None,
          seeds: Sequence[int] = (0,), judge: Any = "tinyworld", out_dir: str | Path = "audit", *,
          budget: str = "auto", attack_configs: Mapping[str, Any] | None = None,
          paraphrases: Sequence[str] | str | None = None, preserve_prompts: Sequence[str] | str | None = None,
          judge_options: Mapping[str, Any] | None = None, num_inference_steps: int | None = None,
          guidance_scale: float | None = None, batch_size: int = 1, grids: bool = True, progress: bool = True,
          full_grid: bool = False, state=None, base_cache: str | Path | None = None) -> AuditReport | None:
    """Audit the erasure of ``concept`` in ``pipe`` (its loaded adapters = the erased model; the same pipeline with
    ``erasekit.compose.disabled`` = the original).

    Args:
        pipe: a diffusers SD / SDXL pipeline with the erasure(s) loaded.
        concept: the erased concept ("circle", "nudity", "Van Gogh").
        attacks: registry names (``erasekit.attacks.ATTACKS``), optionally with a preset: "p4d:k" (with the
            tinyworld budget, the preset's "tinyworld-" variant when there is one).
        prompts: the concept's prompts (None: for a tinyworld concept, :data:`DEFAULT_PROMPTS` of tinyworld's
            canonical grid, evenly spread; all of them with ``full_grid``).
        seeds: one image (and one attack) per (prompt, seed).
        judge: "tinyworld" | "clip" | "nudenet", or any ``erasekit.judges.Judge``.
        out_dir: where results, images, report and per-attack state go (resumable).
        budget: attack preset when an attack name has none: "paper", "tinyworld", or "auto" (tinyworld presets on
            the tinyworld model, the papers' otherwise).
        attack_configs: per attack label: a config object, or a dict of field overrides of the preset.
        paraphrases: prompts for the paraphrase erasure rate, or a text file with one per line (None: tinyworld's
            synonyms and held-out templates; [] to skip).
        preserve_prompts: prompts of other concepts for preservation, or a file (None: :data:`DEFAULT_PRESERVE`
            prompts of tinyworld's other values of the concept's attribute, 36 with ``full_grid``; [] to skip).
            Needs a tinyworld or CLIP judge.
        judge_options: options of a judge given by name (e.g. {"weights": "ViT-B-32.bin"} for clip).
        num_inference_steps: sampling steps of every generation (None: the model's default).
        guidance_scale: CFG scale of every generation (None: the model's default).
        batch_size: up to this many pending (prompt, seed) units of the target, paraphrase and preserve sets get
            their original and their erased images in one pipeline call each (2-3x faster on a CPU at 8; the
            memory of a ``batch_size`` generation). Images can differ from one-at-a-time ones in the last bits of
            floating point, so a resumed or sharded audit matches an uninterrupted one exactly only at 1.
        grids: save image grids (original | erased | attacked) per prompt.
        progress: print the plan (units, attacks, an estimate of the time) and show a progress bar; the plan is
            logged either way.
        full_grid: with tinyworld's default prompts, audit the concept's whole grid (24–36 prompts, their
            paraphrases and 36 prompts of other concepts: about 5x the default's work) instead of its default set.
        state: an ``accelerate.PartialState``-like object (default: :func:`erasekit.core.processes.current`, the
            launched processes, or one).
        base_cache: a folder of original (base-model) images that audits share (``erasekit.audit.cache``): the
            originals found there are read instead of generated, the others are saved there; the records are the
            same as without it. None: every original is generated.

    Returns:
        the :class:`AuditReport` (on a non-main process: the report once the main process wrote it, else None).

    >>> import erasekit
    >>> from erasekit.audit import audit
    >>> pipe = erasekit.load_pipeline(device="cpu")
    >>> _ = erasekit.compose.load(pipe, erasekit.erase(pipe, "uce", ["circle"]))
    >>> report = audit(pipe, "circle", attacks=["p4d"], prompts=["a solid red circle on a black background"],
    ...                paraphrases=[], preserve_prompts=[], out_dir=tmp / "audit", progress=False)
    >>> report.summary["target"]["erasure_rate"], sorted(report.summary["attacks"])
    (1.0, ['p4d'])
    """
    # everything is checked before anything is created
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    run = _resolve(pipe, concept, attacks, prompts, seeds, judge, out_dir, budget, attack_configs, paraphrases,
                   preserve_prompts, judge_options, num_inference_steps, guidance_scale, full_grid, state, base_cache)
    return run.execute(batch_size, grids, progress)


def _resolve(pipe, concept, attacks, prompts, seeds, judge, out_dir, budget, attack_configs, paraphrases,
             preserve_prompts, judge_options, num_inference_steps, guidance_scale, full_grid, state,
             base_cache=None) -> AuditRun:
    """The audit's arguments resolved and checked (the manifest too, against the folder's), nothing created."""
    from ..tinyworld import is_tinyworld

    started = time.time()
    proc = processes.current(state)
    out_dir = Path(out_dir)
    defaulted = prompts is None
    prompts, paraphrases, preserve_prompts = prompt_sets(concept, prompts, paraphrases, preserve_prompts, full_grid)
    if budget == "auto":
        budget = "tinyworld" if is_tinyworld(pipe) else "paper"
    steps, guidance = sd.generation_settings(pipe, num_inference_steps, guidance_scale)
    generation = {"num_inference_steps": steps, "guidance_scale": guidance}
    plans = attack_plans(list(attacks), budget, attack_configs, generation)
    judge = resolve_judge(judge, concept, pipe, judge_options)
    manifest = build_manifest(concept, plans, judge, generation, pipe)
    if (out_dir / MANIFEST).exists():
        check_manifest(out_dir / MANIFEST, manifest)
    return AuditRun(pipe, concept, prompts, [int(s) for s in seeds], paraphrases, preserve_prompts, plans, budget,
                    generation, judge, manifest, out_dir, proc, full_grid if defaulted else None, started,
                    None if base_cache is None else Path(base_cache))


__all__ = [
    "AuditReport", "AuditRun", "DEFAULT_PRESERVE", "DEFAULT_PROMPTS", "KINDS", "MANIFEST", "RESULTS", "accuracy",
    "attack_success_rate", "audit", "erasure_rate", "harmonic_mean", "mean", "merge_results", "pre_asr",
    "preservation", "preservation_drop", "rate", "read_results", "subsample", "summarize", "summary_table",
    "tinyworld_paraphrases", "tinyworld_preserve_prompts", "tinyworld_prompts", "union_asr", "unit_id", "unit_key",
    "write_report",
]
