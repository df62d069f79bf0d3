"""SPM membranes on tinyworld: one membrane erasing "circle", then four membranes (a shape, another shape, a colour,
a texture) composed at once, with Facilitated Transport (the default gates) and without it (γ fixed to 1), then the
circle membrane on a second tinyworld checkpoint (the base UNet fine-tuned ``--transfer-steps`` more steps).

For each erased concept, ``erasekit.tinyworld.eval.erasure`` gives the share of its canonical prompts and of its
synonym prompts in which the judge still sees it, and the judge's accuracy on the other values of its attribute.
With several membranes loaded, the preservation grid of each concept leaves out the scenes that show another erased
concept (those are meant to change); the base model is measured on the same grids. Also recorded: training time per
concept, adapter size (and the size on SD 1.5's shapes, computed on a meta-device UNet), the generation overhead of
the four gated membranes, and the gates of a few prompts. Results are written after every measurement.

    python benchmarks/spm_tinyworld.py                    # → benchmarks/spm_tinyworld.json
    python benchmarks/spm_tinyworld.py --seeds 0 --concepts circle square
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

OUT = Path(__file__).with_name("spm_tinyworld.json")
BARS = {"canonical_rate_max": 0.15, "other_accuracy_drop_max_single": 0.02, "other_accuracy_drop_max_composed": 0.04,
        "transfer_canonical_rate_max": 0.20, "train_minutes_max": 15}


def sd15_membrane_size() -> dict:
    """Modules, parameters and fp32 bytes of a membrane on SD 1.5's UNet shapes (no weights allocated)."""
    from erasekit.methods.spm import transformer_modules
    from erasekit.testing import sd15_unet

    with torch.device("meta"):
        unet = sd15_unet()
    modules = dict(unet.named_modules())
    params = 0
    for name in transformer_modules(unet):
        w = modules[name].weight
        params += w[0].numel() + w.shape[0]  # down [1, in(, kh, kw)] + up [out, 1]
    return {"modules": len(transformer_modules(unet)), "parameters": params, "megabytes_fp32": round(params * 4 / 1e6, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", nargs="+", default=["circle", "square", "red", "striped"],
                   help="the first is the single-membrane concept; all are composed")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--adapters", default="", help="folder to save (and reuse) the trained membranes")
    p.add_argument("--transfer-steps", type=int, default=300, help="fine-tuning steps of the second checkpoint")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from erasekit import compose, tinyworld
    from erasekit.adapter import load_adapter
    from erasekit.core.provenance import run_record
    from erasekit.generate import generate
    from erasekit.loading import load_pipeline
    from erasekit.methods import METHODS, spm
    from erasekit.tinyworld import concept_attribute
    from erasekit.tinyworld.eval import erasure, standard_grid

    pipe = load_pipeline(None, device="cpu")
    judge = tinyworld.load_judge()
    seeds, concepts = tuple(args.seeds), list(args.concepts)
    record = {"concepts": concepts, "seeds": list(seeds), "bars": BARS, "sd15_membrane": sd15_membrane_size(),
              "train": {}, "single": {}, "composed": {}}

    def save():
        record["run"] = run_record()
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    def measure(concept, grid=None) -> dict:
        return erasure(pipe, judge, concept, seeds=seeds, grid=grid).as_dict()

    def grid_without(others):
        """The standard grid without scenes that show any of ``others`` (erased too, so meant to change)."""
        return [s for s in standard_grid() if not any(getattr(s, concept_attribute(o)) == o for o in others)]

    # 1. membranes (trained, or read back from --adapters)
    membranes = {}
    folder = Path(args.adapters) if args.adapters else None
    for concept in concepts:
        path = folder / f"{concept}.spm.safetensors" if folder else None
        if path is not None and path.exists():
            membranes[concept] = load_adapter(path)
            info = membranes[concept].info.get("training", {})
        else:
            config = METHODS["spm"].make_config((concept,), progress=False)
            started = time.perf_counter()
            membranes[concept] = METHODS["spm"].erase(pipe, config)
            info = dict(membranes[concept].info["training"], wall_seconds=round(time.perf_counter() - started, 1))
            if path is not None:
                membranes[concept].save(path)
        record["train"][concept] = {
            "minutes": round(info.get("seconds", 0) / 60, 2), "loss_first": info.get("loss_first"),
            "loss_last": info.get("loss_last"), "parameters": membranes[concept].num_parameters,
            "config": membranes[concept].config}
        logging.info("trained %s: %s", concept, record["train"][concept])
        save()
    first = concepts[0]
    record["adapter_bytes"] = {"parameters": membranes[first].num_parameters,
                               "fp32_deltas": membranes[first].num_parameters * 4}

    # 2. one membrane
    base = measure(first)
    record["single"] = {"concept": first, "base": base}
    for label, adapter in (("ft", membranes[first]), ("no_ft", spm.with_gate(membranes[first], static=True))):
        compose.load(pipe, adapter, name=first)
        try:
            result = measure(first)
        finally:
            compose.unload(pipe)
        drop = base["other_accuracy"] - result["other_accuracy"]
        record["single"][label] = result | {"other_accuracy_drop": round(drop, 4), "meets": {
            "canonical_rate": result["canonical_rate"] <= BARS["canonical_rate_max"],
            "other_accuracy_drop": drop <= BARS["other_accuracy_drop_max_single"]}}
        logging.info("single %s %s: %s", first, label, record["single"][label])
        save()

    # 3. all membranes composed
    if len(concepts) > 1:
        grids = {c: grid_without([o for o in concepts if o != c]) for c in concepts}
        record["composed"]["base"] = {c: measure(c, grids[c]) for c in concepts}
        save()
        probes = ["a red solid circle on a black background", "a blue dotted triangle on a white background",
                  "a green striped square", "a yellow outlined star", ""]
        for label in ("ft", "no_ft"):
            for c in concepts:
                compose.load(pipe, membranes[c] if label == "ft" else spm.with_gate(membranes[c], static=True), name=c)
            try:
                if label == "ft":
                    record["composed"]["gates"] = dict(zip(probes, compose.gates(pipe, probes)))
                entry = {}
                for c in concepts:
                    result = measure(c, grids[c])
                    drop = record["composed"]["base"][c]["other_accuracy"] - result["other_accuracy"]
                    entry[c] = result | {"other_accuracy_drop": round(drop, 4), "meets": {
                        "canonical_rate": result["canonical_rate"] <= BARS["canonical_rate_max"],
                        "other_accuracy_drop": drop <= BARS["other_accuracy_drop_max_composed"]}}
                    logging.info("composed %s %s: %s", label, c, entry[c])
                    record["composed"][label] = entry
                    save()
                if label == "ft":  # generation overhead of the gated membranes (96 images, one batch)
                    prompts = [s.prompt() for s in standard_grid()[:96]]
                    timings = {}
                    for which in ("with", "without"):
                        ctx = compose.disabled(pipe) if which == "without" else contextlib.nullcontext()
                        with ctx:
                            generate(pipe, prompts[:8], list(range(8)), output_type="np")  # warm-up
                            started = time.perf_counter()
                            generate(pipe, prompts, list(range(96)), output_type="np", batch_size=96)
                            timings[which] = time.perf_counter() - started
                    record["composed"]["generation_seconds_96"] = {k: round(v, 2) for k, v in timings.items()}
                    record["composed"]["generation_overhead"] = round(timings["with"] / timings["without"] - 1, 3)
                    save()
            finally:
                compose.unload(pipe)

    # 4. transfer: the first membrane on a second checkpoint of the same architecture
    if args.transfer_steps > 0:
        from erasekit.errors import BaseModelMismatchWarning
        from erasekit.tinyworld.train import finetuned

        started = time.perf_counter()
        other = finetuned(pipe, args.transfer_steps)
        change = sum(float((a - b).pow(2).sum()) for a, b in zip(other.unet.parameters(), pipe.unet.parameters()))
        base2 = erasure(other, judge, first, seeds=seeds).as_dict()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compose.load(other, membranes[first], name=first)
        try:
            erased2 = erasure(other, judge, first, seeds=seeds).as_dict()
        finally:
            compose.unload(other)
        record["transfer"] = {
            "concept": first, "unet_finetune_steps": args.transfer_steps,
            "unet_relative_weight_change": round((change / sum(float(p.pow(2).sum()) for p in pipe.unet.parameters()))
                                                 ** 0.5, 5),
            "fingerprint_warning": any(issubclass(w.category, BaseModelMismatchWarning) for w in caught),
            "base": base2, "spm": erased2,
            "other_accuracy_drop": round(base2["other_accuracy"] - erased2["other_accuracy"], 4),
            "seconds": round(time.perf_counter() - started, 1),
            "meets": {"canonical_rate": erased2["canonical_rate"] <= BARS["transfer_canonical_rate_max"]}}
        logging.info("transfer: %s", record["transfer"])
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
