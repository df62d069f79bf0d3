"""SAFREE's generation overhead on Stable Diffusion 1.5's shapes: one image (text encoding, the denoising loop, the
decode) with a SAFREE guard loaded against the bare model, timed side by side in interleaved rounds.

The model is ``erasekit.testing.real_shape_pipeline("sd15")``: SD 1.5's UNet and CLIP ViT-L text encoder with random
weights (timing does not depend on them), a tiny VAE, fp32 on the CPU, 512 px, a few DDIM steps. Two guards:

* ``authors``: the authors' settings (α = 0.01, self-validating filter, re-attention), as a user would run them;
* ``worst``: every token a trigger and the filter off: the prompt is projected and the skip features filtered at
  every step (the most work a guard does).

The guard's fixed cost (the masked prompts' encodings, once per prompt) is spread over the steps, so fewer steps
overstate it: SD is usually sampled with 25–50 steps. Bar: ≤ 10 % per image over the bare model.

Each image is timed as the process's CPU time (one thread): on a CPU shared with other work, wall time follows the
others' load (a 3-step image took 170–230 s wall in one round, whatever the guard), CPU time follows the work done.
Wall times are recorded beside it.

    python benchmarks/safree_overhead.py                    # → benchmarks/safree_overhead.json
    python benchmarks/safree_overhead.py --rounds 1 --steps 2 --out /tmp/o.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

OUT = Path(__file__).with_name("safree_overhead.json")
BAR = 0.10
PROMPT = "a picture of a striped red circle and a dotted blue square on a white background, a cat and a dog"
CONCEPTS = ("cat", "dog", "car")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import erasekit
    from erasekit import compose
    from erasekit.core.provenance import run_record
    from erasekit.testing import real_shape_pipeline

    pipe = real_shape_pipeline("sd15")
    guards = {"authors": erasekit.erase(pipe, "safree", list(CONCEPTS)),
              "worst": erasekit.erase(pipe, "safree", list(CONCEPTS), alpha=-0.9, svf=False)}
    tokens = len(sd_tokens(pipe, PROMPT))
    record = {"model": "sd15 shapes (random weights), fp32, cpu, 512 px", "steps": args.steps, "prompt": PROMPT,
              "prompt_tokens": tokens, "concepts": list(CONCEPTS), "threads": args.threads, "bar_max": BAR,
              "rounds": [], "plans": {}}

    def one_image(label: str) -> tuple[float, float]:
        name = compose.load(pipe, guards[label]) if label != "bare" else None
        try:
            started, cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
                     generator=torch.Generator().manual_seed(0))
            seconds = (time.process_time() - cpu, time.perf_counter() - started)
            if name is not None:
                plan = compose.Composer.of(pipe).guards.plan(name)
                record["plans"][label] = plan.details if plan is not None else "no trigger token"
        finally:
            if name is not None:
                compose.unload(pipe, name)
        return seconds

    one_image("bare")  # warm-up (allocator, kernels)
    labels = ["bare", *guards]
    for r in range(args.rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]  # rotate, so that drift cancels
        times = {label: one_image(label) for label in order}
        record["rounds"].append({k: {"cpu_s": round(c, 3), "wall_s": round(w, 3)} for k, (c, w) in times.items()})
        print(f"round {r}: " + ", ".join(f"{k} {c:.2f} s cpu ({w:.2f} s wall)" for k, (c, w) in times.items()),
              flush=True)
    for clock in ("cpu_s", "wall_s"):
        record[f"per_image_{clock}"] = {k: round(statistics.median(r[k][clock] for r in record["rounds"]), 3)
                                        for k in labels}
        record[f"overhead_{clock[:-2]}"] = {
            k: round(statistics.median(r[k][clock] / r["bare"][clock] - 1 for r in record["rounds"]), 4)
            for k in guards}
    record["overhead"] = record["overhead_cpu"]
    record["bar_met"] = {k: v <= BAR for k, v in record["overhead"].items()}
    record["run"] = run_record()
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"per_image_cpu_s": record["per_image_cpu_s"], "overhead_cpu": record["overhead_cpu"],
                      "overhead_wall": record["overhead_wall"]}))
    return 0


def sd_tokens(pipe, prompt: str) -> list[int]:
    from erasekit.core import sd

    return sd.token_ids(pipe.tokenizer, prompt)


if __name__ == "__main__":
    raise SystemExit(main())
