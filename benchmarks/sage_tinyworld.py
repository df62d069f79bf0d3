"""SAGE on tinyworld: its tinyworld preset on circle's 24 canonical prompts (the audit's full grid) × seeds, against
the base model (nothing erased: the attack must succeed on >= 90 % of the prompts) and against UCE's circle erasure
(the attack success rate as the audit counts it: pre-attack successes count, the others are attacked).

Records per model: success rate, pre-attack rate, seconds per attacked prompt (mean, max), iterations and
pipeline-judged generations per attacked prompt, and every prompt's adversarial prompt and latent change.

    python benchmarks/sage_tinyworld.py                          # → benchmarks/sage_tinyworld.json
    python benchmarks/sage_tinyworld.py --presets tinyworld tinyworld-latent --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

OUT = Path(__file__).with_name("sage_tinyworld.json")
BAR_BASE_SUCCESS = 0.90


def attack_all(pipe, judge, prompts, seeds, config, label: str) -> dict:
    """Every (prompt, seed): the pre-attack judgement, and SAGE where the image does not already show the concept
    (on the base model: every pair is attacked, so that the rate is the attack's own)."""
    from erasekit.attacks import run
    from erasekit.attacks.base import evaluate_prompt

    rows, attacked = [], []
    for prompt in tqdm(prompts, desc=label):
        for seed in seeds:
            _, pre_score, pre_hit = evaluate_prompt(pipe, prompt, seed, config, judge)
            row = {"prompt": prompt, "seed": seed, "pre_success": bool(pre_hit), "pre_score": round(pre_score, 4)}
            if not pre_hit or label == "base":
                t0 = time.perf_counter()
                result = run("sage", pipe, prompt, judge, config=config, seed=seed)
                row.update(success=bool(result.success), score=round(result.score, 4), adv_prompt=result.adv_prompt,
                           steps=result.steps, queries=result.info["queries"],
                           seconds=round(time.perf_counter() - t0, 2),
                           latent_relative_change=result.info.get("latent", {}).get("relative_change"))
                attacked.append(row)
            else:
                row.update(success=True, skipped="pre-attack success")
            rows.append(row)
    n = len(rows)
    seconds = [r["seconds"] for r in attacked]
    return {"pairs": n, "attacked": len(attacked),
            "success_rate": round(sum(r["success"] for r in rows) / n, 4),
            "pre_attack_rate": round(sum(r["pre_success"] for r in rows) / n, 4),
            "attacked_success_rate": (round(sum(r["success"] for r in attacked) / len(attacked), 4)
                                      if attacked else None),
            "seconds_per_attacked_prompt": round(sum(seconds) / len(seconds), 2) if seconds else None,
            "max_seconds": max(seconds) if seconds else None,
            "mean_steps": round(sum(r["steps"] for r in attacked) / len(attacked), 2) if attacked else None,
            "mean_queries": round(sum(r["queries"] for r in attacked) / len(attacked), 2) if attacked else None,
            "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--presets", nargs="+", default=["tinyworld"])
    p.add_argument("--erasures", nargs="+", default=["uce"], help="methods whose erasure is attacked")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import erasekit
    from erasekit import compose
    from erasekit.attacks import config
    from erasekit.core.provenance import run_record
    from erasekit.judges.tinyworld import TinyworldConceptJudge
    from erasekit.loading import load_pipeline
    from erasekit.tinyworld.prompts import concept_prompts

    pipe = load_pipeline(None, device="cpu")
    judge = TinyworldConceptJudge(args.concept, pipe=pipe)
    prompts = concept_prompts(args.concept)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    record.update(concept=args.concept, seeds=args.seeds, prompts=len(prompts), bar_base_success=BAR_BASE_SUCCESS,
                  presets=record.get("presets", {}))

    def save():
        record["run"] = run_record()
        out.write_text(json.dumps(record, indent=1) + "\n")

    for preset_name in args.presets:
        cfg = config("sage", preset_name)
        entry = record["presets"].setdefault(preset_name, {})
        entry["config"] = json.loads(json.dumps(cfg.__dict__, default=str))
        entry["load"] = os.getloadavg()[0]  # the 1-minute load when this preset started (2 cores, shared)
        entry["base"] = attack_all(pipe, judge, prompts, args.seeds, cfg, "base")
        entry["base"]["bar_met"] = entry["base"]["success_rate"] >= BAR_BASE_SUCCESS
        logging.info("%s base: success %.3f, %.1f s per prompt", preset_name, entry["base"]["success_rate"],
                     entry["base"]["seconds_per_attacked_prompt"])
        save()
        for method in args.erasures:
            names = compose.load(pipe, erasekit.erase(pipe, method, [args.concept]))
            try:
                entry[method] = attack_all(pipe, judge, prompts, args.seeds, cfg, method)
            finally:
                compose.unload(pipe, names)
            logging.info("%s %s: ASR %.3f (pre-attack %.3f), %.1f s per attacked prompt", preset_name, method,
                         entry[method]["success_rate"], entry[method]["pre_attack_rate"],
                         entry[method]["seconds_per_attacked_prompt"] or 0.0)
            save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
