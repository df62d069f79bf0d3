"""Text-encoder erasure on tinyworld: AdvUnlearn and few-shot erasing of "circle", judged by tinyworld's judge.

For the base model and each erased model: ``erasekit.tinyworld.eval.erasure`` (share of the concept's canonical and
synonym prompts in which the judge still sees it; accuracy on the other shapes), training time and peak RSS, and
(``--asr``) the UnlearnDiffAtk attack success rate from ``erasekit.audit`` (pre-attack successes included; tinyworld
attack budget) for AdvUnlearn and the comparison methods (ESD-x, UCE) on the same prompts and seeds. ``--transfer``
fine-tunes a second tinyworld UNet (the text encoder frozen and shared, as SD 1.4 → 1.5) and applies the AdvUnlearn
adapter to it. Results are written to the JSON after every step, so a killed run keeps what it measured.

    python benchmarks/te_tinyworld.py                                  # → benchmarks/te_tinyworld.json
    python benchmarks/te_tinyworld.py --methods fewshot --no-asr --no-transfer
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("te_tinyworld.json")
BARS = {"advunlearn_canonical_rate_max": 0.10, "advunlearn_other_accuracy_drop_max": 0.05,
        "advunlearn_asr_vs_esd_x_and_uce_max_ratio": 0.5, "fewshot_seconds_max": 30, "fewshot_canonical_rate_max": 0.20}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def asr(pipe, concept: str, prompts, seeds, out_dir: Path) -> dict:
    from erasekit.audit import audit

    report = audit(pipe, concept, attacks=("unlearndiffatk",), prompts=prompts, seeds=seeds, out_dir=out_dir,
                   paraphrases=[], preserve_prompts=[], grids=False, progress=False)
    return report.summary["attacks"]["unlearndiffatk"] | {"pre_asr_target": report.summary["target"]["pre_asr"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--methods", nargs="+", default=["fewshot", "advunlearn"], choices=["advunlearn", "fewshot"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--asr", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--asr-prompts", type=int, default=8, help="canonical prompts attacked (evenly subsampled)")
    p.add_argument("--asr-compare", nargs="*", default=["esd-x", "uce"])
    p.add_argument("--replace-with", default="square",
                   help="also train AdvUnlearn with this anchor as its target (the replace_with option; '' = skip)")
    p.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--transfer-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from erasekit import compose, tinyworld
    from erasekit.audit import tinyworld_prompts
    from erasekit.core.provenance import run_record
    from erasekit.loading import load_pipeline
    from erasekit.methods import METHODS
    from erasekit.tinyworld.eval import erasure

    out = Path(args.out)
    pipe = load_pipeline(None, device="cpu")
    judge = tinyworld.load_judge()
    seeds = tuple(args.seeds)
    record = {"concept": args.concept, "seeds": list(seeds), "bars": BARS, "methods": {}, "run": run_record()}

    def save():
        out.write_text(json.dumps(record, indent=2) + "\n")

    base = erasure(pipe, judge, args.concept, seeds=seeds)
    record["base"] = base.as_dict()
    save()
    all_prompts = tinyworld_prompts(args.concept)
    step = max(1, len(all_prompts) // args.asr_prompts)
    asr_prompts = all_prompts[::step][: args.asr_prompts]
    work = Path(tempfile.mkdtemp(prefix="te-bench-"))
    adapters = {}
    runs = [(m, m, {}) for m in args.methods]
    if args.replace_with and "advunlearn" in args.methods:  # the option, beside the authors' ESD target
        runs.append((f"advunlearn→{args.replace_with}", "advunlearn", {"replace_with": args.replace_with}))
    runs += [(m, m, {}) for m in args.asr_compare if m not in args.methods] if args.asr else []
    for label, method, options in runs:
        spec = METHODS[method]
        quiet = {"progress": False} if "progress" in spec.options else {}
        config = spec.make_config((args.concept,), tinyworld=True, **quiet, **options)  # tinyworld presets, as `erase`
        started = time.perf_counter()
        adapter = spec.erase(pipe, config)
        seconds = time.perf_counter() - started
        adapters[label] = adapter
        entry = {"config": adapter.config, "train_seconds": round(seconds, 1), "peak_rss_mb": peak_rss_mb(),
                 "trainable_parameters": adapter.num_parameters, "training": adapter.info.get("training")}
        record["methods"][label] = entry
        name = compose.load(pipe, adapter, name=method)
        try:
            result = erasure(pipe, judge, args.concept, seeds=seeds)
            entry["erasure"] = result.as_dict()
            entry["other_accuracy_drop"] = round(base.other_accuracy - result.other_accuracy, 4)
            save()
            if args.asr and (method == "advunlearn" or method in args.asr_compare):
                entry["unlearndiffatk"] = asr(pipe, args.concept, asr_prompts, (0,), work / label)
                entry["unlearndiffatk"]["prompts_attacked"] = asr_prompts
        finally:
            compose.unload(pipe, name)
        logging.info("%s: %s", label, json.dumps({k: v for k, v in entry.items() if k != "config"}))
        save()

    if args.transfer and "advunlearn" in adapters:
        from erasekit.tinyworld.train import finetuned

        started = time.perf_counter()
        other = finetuned(pipe, args.transfer_steps)
        unet2 = other.unet
        base2 = erasure(other, judge, args.concept, seeds=seeds)
        name = compose.load(other, adapters["advunlearn"], name="advunlearn")
        try:
            erased2 = erasure(other, judge, args.concept, seeds=seeds)
        finally:
            compose.unload(other, name)
        weight_change = sum(float((a - b).pow(2).sum()) for a, b in zip(unet2.parameters(), pipe.unet.parameters()))
        record["transfer"] = {"unet_finetune_steps": args.transfer_steps, "seconds": round(time.perf_counter() - started, 1),
                              "unet_relative_weight_change": round((weight_change / sum(
                                  float(p.pow(2).sum()) for p in pipe.unet.parameters())) ** 0.5, 5),
                              "base": base2.as_dict(), "advunlearn": erased2.as_dict(),
                              "other_accuracy_drop": round(base2.other_accuracy - erased2.other_accuracy, 4)}
        save()

    methods = record["methods"]
    meets = {}
    for label in [m for m in methods if m.startswith("advunlearn") and "erasure" in methods[m]]:
        a = methods[label]
        meets[f"{label}_canonical_rate"] = a["erasure"]["canonical_rate"] <= BARS["advunlearn_canonical_rate_max"]
        meets[f"{label}_other_accuracy_drop"] = a["other_accuracy_drop"] <= BARS["advunlearn_other_accuracy_drop_max"]
        if "unlearndiffatk" in a:
            for m in args.asr_compare:
                if "unlearndiffatk" in methods.get(m, {}):
                    meets[f"{label}_asr_vs_{m}"] = a["unlearndiffatk"]["asr"] <= 0.5 * methods[m]["unlearndiffatk"]["asr"]
    if "fewshot" in methods:
        f = methods["fewshot"]
        meets["fewshot_seconds"] = f["train_seconds"] <= BARS["fewshot_seconds_max"]
        meets["fewshot_canonical_rate"] = f["erasure"]["canonical_rate"] <= BARS["fewshot_canonical_rate_max"]
    if "transfer" in record:
        meets["transfer_canonical_rate"] = record["transfer"]["advunlearn"]["canonical_rate"] <= 0.10
    record["meets"] = meets
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
