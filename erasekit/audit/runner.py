"""The audit's runner: attack plans, the judge, the work split over processes, the plan printed before it starts,
the per-attack preparation, the computation of each missing results line, and the merge into the report.

Every random draw of a line is seeded from that line's own key, so the results do not depend on interruptions or
on sharding: under ``accelerate launch`` each process takes every ``world_size``-th (prompt, seed) pair and writes
``results.rank{k}.jsonl``; the main process merges them after ``wait_for_everyone``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from .. import compose
from ..core import sd
from ..core.files import atomic_write, exclusive_lock, remove_stale_temporaries
from ..errors import ConfigError
from ..tinyworld.prompts import concept_prompts
from .cache import BaseCache
from .metrics import summarize
from .report import AuditReport, write_report
from .store import (
    MANIFEST, RESULTS, ResultsWriter, check_manifest, done_units, json_default, load_image, load_state,
    merge_results, save_image, save_state, unit_key,
)

logger = logging.getLogger("erasekit.audit")


# =============================================================================================== the runner

@dataclass
class AttackPlan:
    label: str
    module: Any
    config: Any


def attack_plans(attacks: Sequence[str], budget: str, attack_configs: Mapping[str, Any] | None,
                  generation: dict) -> list[AttackPlan]:
    from ..attacks import get, preset, with_overrides

    plans = []
    for label in attacks:
        name, _, preset_name = label.partition(":")
        module = get(name)
        given = (attack_configs or {}).get(label)
        if given is not None and not isinstance(given, Mapping):
            config = given
        else:
            if preset_name and budget == "tinyworld" and f"tinyworld-{preset_name}" in module.PRESETS:
                preset_name = f"tinyworld-{preset_name}"  # e.g. "p4d:k" on tinyworld: P4D-K with a CPU budget
            config = preset(module, preset_name or budget)
            if given:
                config = with_overrides(config, **dict(given))
        config = dataclasses.replace(config, **generation)  # judged like the pre-attack images
        plans.append(AttackPlan(label, module, config))
    if len({p.label for p in plans}) != len(plans):
        raise ConfigError(f"attack listed twice: {list(attacks)}")
    return plans


def resolve_judge(judge, concept: str, pipe, judge_options: Mapping | None):
    from .. import judges

    if isinstance(judge, str):
        options = dict(judge_options or {})
        if judge == "tinyworld":
            options.setdefault("pipe", pipe)
        return judges.load(judge, concept, **options)
    return judge


def _erasures(pipe) -> list:
    try:

        return json.loads(json.dumps(compose.list_erasures(pipe), default=str))
    except Exception:  # compose absent or no erasures: the audit runs on the pipeline as it is
        return []


def build_manifest(concept, plans, judge, generation, pipe) -> dict:
    from ..judges import describe

    return {
        "concept": concept,
        "attacks": {p.label: dataclasses.asdict(p.config) for p in plans},
        "judge": describe(judge),
        "generation": generation,
        "model": {"id": sd.model_id(pipe, type(pipe).__name__), "erasures": _erasures(pipe)},
    }

#: the seconds of one attacked prompt, and of an attack's once-per-concept preparation, in tinyworld images (with
#: the tinyworld presets; measured on a 2-core CPU by ``erasekit bench``): what the audit's plan estimates with.
_TINYWORLD_IMAGES_PER_ATTACK = {"cce": 3, "concept_arithmetic": 15, "p4d": 25, "paraphrase": 45, "ring_a_bell": 35,
                                "sage": 50, "unlearndiffatk": 35}
_TINYWORLD_IMAGES_PER_PREPARE = {"cce": 110, "ring_a_bell": 3}


def _seconds_per_image(pipe, prompt: str, seed: int, generation: dict) -> float:
    """Seconds of one generation, timed after a first one (which pays for the pipeline's lazy set-up)."""

    sd.generate_prompt(pipe, prompt, seed, **generation)
    t0 = time.perf_counter()
    sd.generate_prompt(pipe, prompt, seed, **generation)
    return time.perf_counter() - t0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _plan_text(pipe, concept, prompts, seeds, paraphrases, preserve_prompts, plans, budget, generation, pending,
               pending_attacks, to_prepare, units, full_grid, process) -> str:
    """What the audit is about to do, and how long that should take (printed before it starts)."""
    rank, world = process
    kinds = {k: sum(1 for u in pending if u[0] == k) for k in ("target", "paraphrase", "preserve")}
    text = (f"audit {concept!r}" + (f" (process {rank} of {world})" if world > 1 else "") +
            f": {len(prompts)} prompts × {len(seeds)} seed{'s' * (len(seeds) > 1)}, {len(paraphrases)} paraphrases, "
            f"{len(preserve_prompts)} prompts of other concepts; attacks: {', '.join(p.label for p in plans) or 'none'}"
            f" ({budget} budget).\n  to do: {len(pending)} of {units} units (image pairs original | erased: "
            f"{kinds['target']} canonical, {kinds['paraphrase']} paraphrase, {kinds['preserve']} preserve) and "
            f"{len(pending_attacks)} attack runs (each skipped when the erased model already shows the concept)")
    if pending or pending_attacks:
        probe = pending[0] if pending else ("target", prompts[0], seeds[0])
        image_s = _seconds_per_image(pipe, probe[1], probe[2], generation)
        images = 2 * len(pending)
        def name(label: str) -> str:
            return label.split(":")[0]

        if budget == "tinyworld" and all(name(p.label) in _TINYWORLD_IMAGES_PER_ATTACK for p in plans):
            images += sum(_TINYWORLD_IMAGES_PER_ATTACK[name(a)] for a in pending_attacks)
            images += sum(_TINYWORLD_IMAGES_PER_PREPARE.get(name(p.label), 0) for p in to_prepare)
            estimate = f"at most about {_duration(images * image_s)}"
        else:
            estimate = (f"about {_duration(images * image_s)} for the images, plus the attacks (the paper budgets "
                        "take minutes per attacked prompt on a GPU)" if plans and pending_attacks
                        else f"about {_duration(images * image_s)}")
        text += f";\n  estimate: {estimate} ({image_s:.2f} s per image here)"
    if full_grid is False:
        text += (f".\n  tinyworld's default prompt set: {len(prompts)} of the grid's "
                 f"{len(concept_prompts(concept))} prompts of {concept!r} (full_grid=True or --full-grid: all)")
    return text + "."

class UnitRunner:
    """Computes the lines of one (kind, prompt, seed) group that are not in the results yet."""

    def __init__(self, pipe, judge, plans, states, out_dir, generation, done, writer, paraphrase_groups, bar,
                 base_images: BaseCache | None = None):
        self.pipe, self.judge, self.plans, self.states = pipe, judge, plans, states
        self.out_dir, self.generation, self.done, self.writer = out_dir, generation, done, writer
        self.paraphrase_groups, self.bar = paraphrase_groups, bar
        self.base_images = base_images  # the cache of base-model images and results (None: each is made)
        self.images: dict[tuple, tuple] = {}  # (kind, prompt, seed) -> (original, erased, seconds), from prefetch

    def _pending_pair(self, unit: tuple) -> bool:
        return unit[0] != "attack" and unit not in self.images and (*unit, "none") not in self.done

    def prefetch(self, units: Sequence[tuple]) -> None:
        """Original and erased images of the pending pair units among ``units``, one batched call each."""
        from ..generate import generate

        if not units or not self._pending_pair(units[0]):
            return
        pending = [u for u in units if self._pending_pair(u)]
        prompts, seeds = [u[1] for u in pending], [u[2] for u in pending]
        t0 = time.perf_counter()
        originals = self._originals(prompts, seeds)
        erased = generate(self.pipe, prompts, seeds, **self.generation)
        share = (time.perf_counter() - t0) / len(pending)
        self.images.update({u: (o, e, share) for u, o, e in zip(pending, originals, erased)})

    def _images(self, kind: str, prompt: str, seed: int) -> tuple[Any, Any, float]:
        """(original, erased, seconds spent before the call): prefetched with their share of the batch's time,
        or generated now (0: the caller's clock runs)."""
        if (kind, prompt, seed) in self.images:
            return self.images.pop((kind, prompt, seed))
        original = self._originals([prompt], [seed])[0]
        return original, sd.generate_prompt(self.pipe, prompt, seed, **self.generation), 0.0

    def _emit(self, record: dict) -> dict:
        self.writer.write(record)
        self.done[unit_key(record)] = record
        self.bar.update(1)
        return record

    def _originals(self, prompts: list[str], seeds: list[int]) -> list:
        """The images of one call with every erasure disabled: from the cache of base images when there is one."""
        from ..generate import generate

        def make() -> list:
            with compose.disabled(self.pipe):
                return generate(self.pipe, prompts, seeds, **self.generation)

        return make() if self.base_images is None else self.base_images.images(prompts, seeds, make)

    def group(self, kind: str, prompt: str, seed: int) -> None:
        if kind == "target":
            target = self._target(prompt, seed)
            for plan in self.plans:
                self._attack(plan, prompt, seed, target)
        elif kind == "paraphrase":
            self._paraphrase(prompt, seed)
        else:
            self._preserve(prompt, seed)

    def _pair(self, kind: str, prompt: str, seed: int) -> tuple[dict, Any, Any]:
        from ..judges import verdict

        key = (kind, prompt, seed, "none")
        t0 = time.perf_counter()
        original, erased, generation_seconds = self._images(kind, prompt, seed)
        scores, hits = verdict(self.judge, [original, erased])
        record = {"kind": kind, "prompt": prompt, "seed": seed, "attack": "none",
                  "original_score": scores[0], "original_success": hits[0], "score": scores[1], "success": hits[1],
                  "original_image": save_image(original, self.out_dir, key, "original"),
                  "image": save_image(erased, self.out_dir, key, "erased")}
        record["seconds"] = round(time.perf_counter() - t0 + generation_seconds, 3)
        return record, original, erased

    def _target(self, prompt: str, seed: int) -> dict:
        key = ("target", prompt, seed, "none")
        if key in self.done:
            return self.done[key]
        record, _, _ = self._pair("target", prompt, seed)
        return self._emit(record)

    def _paraphrase(self, prompt: str, seed: int) -> None:
        if ("paraphrase", prompt, seed, "none") in self.done:
            return
        record, _, _ = self._pair("paraphrase", prompt, seed)
        record["group"] = self.paraphrase_groups.get(prompt, "paraphrase")
        self._emit(record)

    def _attack(self, plan: AttackPlan, prompt: str, seed: int, target: dict) -> None:
        from ..attacks import make_generator

        key = ("attack", prompt, seed, plan.label)
        if key in self.done:
            return
        record = {"kind": "attack", "prompt": prompt, "seed": seed, "attack": plan.label,
                  "pre_success": bool(target["success"])}
        if target["success"]:  # already broken: counted as a success, not attacked (UnlearnDiffAtk protocol)
            record.update(success=True, score=target["score"], steps=0, adv_prompt=prompt, image=target["image"],
                          info={"skipped": "pre-attack success"}, seconds=0.0)
            self._emit(record)
            return
        t0 = time.perf_counter()
        original = load_image(self.out_dir, target["original_image"])
        result = plan.module.attack(self.pipe, prompt, plan.config, self.judge,
                                    make_generator(None, seed, plan.label, prompt), seed=seed, target=original,
                                    state=self.states.get(plan.label), cache=self.base_images)
        record.update(success=bool(result.success), score=float(result.score), steps=int(result.steps),
                      adv_prompt=result.adv_prompt, info=result.info,
                      image=save_image(result.image, self.out_dir, key, "attacked") if result.image is not None else None,
                      seconds=round(time.perf_counter() - t0, 3))
        record["info"] = {k: v for k, v in record["info"].items() if k != "seconds"}  # wall time lives in "seconds"
        self._emit(record)

    def _preserve(self, prompt: str, seed: int) -> None:
        key = ("preserve", prompt, seed, "none")
        if key in self.done:
            return
        t0 = time.perf_counter()
        original, erased, generation_seconds = self._images("preserve", prompt, seed)
        record = {"kind": "preserve", "prompt": prompt, "seed": seed, "attack": "none"}
        if hasattr(self.judge, "judgement"):  # tinyworld: labels of every attribute
            from ..tinyworld import ATTRIBUTES
            from ..tinyworld.prompts import scene_of

            judgement = self.judge.judgement([original, erased])
            labels = {a: judgement.labels(a) for a in ATTRIBUTES}
            record["original_labels"] = {a: v[0] for a, v in labels.items()}
            record["labels"] = {a: v[1] for a, v in labels.items()}
            scene = scene_of(prompt)
            record["expected"] = dataclasses.asdict(scene) if scene is not None else None
            record["attribute"] = getattr(self.judge, "attribute", None)
        if hasattr(self.judge, "clip_score"):
            record["original_clip"], record["clip"] = self.judge.clip_score([original, erased], [prompt, prompt])
        record["original_image"] = save_image(original, self.out_dir, key, "original")
        record["image"] = save_image(erased, self.out_dir, key, "erased")
        record["seconds"] = round(time.perf_counter() - t0 + generation_seconds, 3)
        self._emit(record)




# ============================================================================================ the audit, in steps

@dataclass
class AuditRun:
    """An audit with every argument resolved and checked (nothing created yet); :meth:`execute` runs its steps."""

    pipe: Any
    concept: str
    prompts: list[str]
    seeds: list[int]
    paraphrases: list[tuple[str, str]]
    preserve_prompts: list[str]
    plans: list[AttackPlan]
    budget: str
    generation: dict
    judge: Any
    manifest: dict
    out_dir: Path
    proc: Any
    full_grid: bool | None  # None: the prompts were given (no note on tinyworld's default set)
    started: float
    base_cache: Path | None = None  # a folder of base-model images shared by audits (None: none)

    @property
    def rank_world(self) -> tuple[int, int]:
        return int(self.proc.process_index), int(self.proc.num_processes)

    def groups(self) -> list[tuple[str, str, int]]:
        """Every (kind, prompt, seed) unit of the audit, in the results' order."""
        return ([("target", p, s) for p in self.prompts for s in self.seeds]
                + [("paraphrase", p, s) for p, _ in self.paraphrases for s in self.seeds]
                + [("preserve", p, s) for p in self.preserve_prompts for s in self.seeds])

    def order(self) -> list[tuple]:
        """Every results line's key, in the results' order (each target followed by its attacks)."""
        order = []
        for kind, prompt, seed in self.groups():
            order.append((kind, prompt, seed, "none"))
            if kind == "target":
                order += [("attack", prompt, seed, p.label) for p in self.plans]
        return order

    def execute(self, batch_size: int, grids: bool, progress: bool) -> AuditReport | None:
        rank, world = self.rank_world
        mine = self.groups()[rank::world]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # one process per (folder, rank): a second identical audit is refused instead of computing the same lines
        with exclusive_lock(self.out_dir / f".audit.rank{rank}.lock", f"audit folder {str(self.out_dir)!r}"
                            + (f" (process {rank} of {world})" if world > 1 else "")):
            self.open_folder()
            own_file = self.out_dir / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")
            states = self.prepare(mine, progress)
            self.compute(mine, own_file, states, batch_size, progress)
            self.proc.wait_for_everyone()
            if self.proc.is_main_process:
                report = self.finish(states, grids)
        self.proc.wait_for_everyone()
        if self.proc.is_main_process:
            return report
        path = self.out_dir / "summary.json"
        return AuditReport(self.out_dir, json.loads(path.read_text())) if path.exists() else None

    def open_folder(self) -> None:
        """The main process clears a killed run's temporaries and writes the manifest (or checks it)."""
        if not self.proc.is_main_process:
            return
        remove_stale_temporaries(self.out_dir)
        manifest_path = self.out_dir / MANIFEST
        if manifest_path.exists():
            check_manifest(manifest_path, self.manifest)
        else:
            from ..core.provenance import run_record

            record = dict(self.manifest, created=run_record())
            atomic_write(manifest_path, json.dumps(record, indent=2, default=json_default).encode())

    def prepare(self, mine: list[tuple], progress: bool) -> dict[str, dict | None]:
        """Print the plan; the main process prepares each attack once per concept (saved in ``state/``), then
        every process loads the states."""
        from ..attacks import make_generator

        rank, world = self.rank_world
        prepared = [p for p in self.plans if hasattr(p.module, "prepare")] if self.prompts else []  # nothing to attack
        done = done_units(self.out_dir)
        pending = [u for u in mine if (*u, "none") not in done]
        pending_attacks = [plan.label for kind, p, s in mine if kind == "target" for plan in self.plans
                           if ("attack", p, s, plan.label) not in done]
        to_prepare = [p for p in prepared if load_state(self.out_dir, p.label) is None]
        if progress or logger.isEnabledFor(logging.INFO):  # the estimate times one image: only when it is read
            plan_text = _plan_text(self.pipe, self.concept, self.prompts, self.seeds, self.paraphrases,
                                   self.preserve_prompts, self.plans, self.budget, self.generation, pending,
                                   pending_attacks, to_prepare, len(mine), self.full_grid, (rank, world))
            logger.info("%s", plan_text)
            if progress:
                print(plan_text, file=sys.stderr, flush=True)
        judge_concept = getattr(self.judge, "concept", "") or self.concept
        if self.proc.is_main_process:
            for plan in to_prepare:
                logger.info("preparing %s for %r", plan.label, self.concept)
                if progress:
                    print(f"preparing {plan.label} for {self.concept!r} (once per concept)", file=sys.stderr,
                          flush=True)
                t0 = time.perf_counter()
                st = plan.module.prepare(self.pipe, judge_concept, plan.config,
                                         make_generator(None, 0, plan.label, self.concept))
                st["prepare_seconds"] = round(time.perf_counter() - t0, 2)  # once per concept (CCE's token, ...)
                save_state(self.out_dir, plan.label, st)
        self.proc.wait_for_everyone()
        states = {}
        for plan in prepared:
            states[plan.label] = load_state(self.out_dir, plan.label)
            if states[plan.label] is None:  # another process has not written it (in-process simulation)
                states[plan.label] = plan.module.prepare(self.pipe, judge_concept, plan.config,
                                                         make_generator(None, 0, plan.label, self.concept))
        return states

    def compute(self, mine: list[tuple], own_file: Path, states: dict, batch_size: int, progress: bool) -> None:
        """This process's share of the work: every line of its units not in the results yet."""
        rank, world = self.rank_world
        done = done_units(self.out_dir, repair=own_file)  # after the barrier: stale temporaries are cleared
        pending = sum(1 for u in mine if (*u, "none") not in done)
        pending += sum(1 for kind, p, s in mine if kind == "target" for plan in self.plans
                       if ("attack", p, s, plan.label) not in done)
        bar = tqdm(total=pending, unit="image pair or attack",
                   desc=f"audit {self.concept}" + (f" [{rank}/{world}]" if world > 1 else ""), disable=not progress)
        base_images = None if self.base_cache is None else BaseCache(self.base_cache, self.pipe, self.generation)
        runner = UnitRunner(self.pipe, self.judge, self.plans, states, self.out_dir, self.generation, done,
                            ResultsWriter(own_file), dict(self.paraphrases), bar, base_images)
        try:
            for i, unit in enumerate(mine):
                if batch_size > 1:
                    runner.prefetch(mine[i:i + batch_size])
                runner.group(*unit)
        finally:
            runner.writer.close()
            bar.close()

    def finish(self, states: dict, grids: bool) -> AuditReport:
        """Merge the processes' results, summarize the audit's lines and write the report (main process)."""
        order = self.order()
        records = merge_results(self.out_dir, order)
        wanted = set(order)
        selected = [r for r in records if unit_key(r) in wanted]
        labels = [p.label for p in self.plans]
        summary = summarize(selected, concept=self.concept, attacks=labels)
        for label, st in states.items():
            if st is not None and st.get("prepare_seconds") is not None:
                summary["attacks"][label]["prepare_seconds"] = st["prepare_seconds"]
        summary["run"] = {"judge": self.manifest["judge"], "generation": self.generation,
                          "model": self.manifest["model"], "budget": self.budget, "prompts": len(self.prompts),
                          "seeds": self.seeds, "paraphrases": len(self.paraphrases),
                          "preserve_prompts": len(self.preserve_prompts), "processes": self.rank_world[1],
                          "seconds_this_run": round(time.time() - self.started, 1)}
        write_report(self.out_dir, summary, selected, labels, grids=grids)
        return AuditReport(self.out_dir, summary, selected)
