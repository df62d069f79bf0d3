"""What composed adapters' hooks cost per denoising step, in work that does not depend on the machine's load: the
aten operations each step dispatches (on a GPU, each compute operation is a kernel launch, and an fp16 step of SD 1.5
or SDXL at batch 2 is bound by launches and Python: ``benchmarks/compose_overhead-cuda.json``) and the process's CPU
time per step.

The model is the packaged tinyworld (whose layers are small, so the hooks' fixed cost shows), one UNet step on a CFG
batch of 2 with a real prompt's context, fp32, one thread. Adapters are those of
:mod:`erasekit.bench.perf.compose_overhead`: static = UCE-shaped (rank 1 on every ``attn2.to_k`` / ``to_v``),
gated = SPM-shaped (rank 1 on every Linear/Conv2d of the transformer blocks, prompt-similarity gate). The CPU time
is measured in blocks of 10 steps, the adapters switched on and off between blocks (``compose.disable`` /
``enable``) 40 times, medians.

    python benchmarks/hook_cost.py                    # → benchmarks/hook_cost.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


#: aten operations that only relabel a tensor's memory (no kernel on a GPU)
VIEWS = ("view", "_unsafe_view", "t", "expand", "reshape", "transpose", "unsqueeze", "squeeze", "as_strided",
         "detach", "alias", "permute", "slice", "select", "split")


def is_view(op: str) -> bool:
    return op.split(".")[1] in VIEWS


def main(argv=None) -> dict:
    import erasekit
    from erasekit import compose
    from erasekit.bench.perf.compose_overhead import make_adapter, model_inputs
    from erasekit.bench.perf.peers import machine_load
    from erasekit.core import sd
    from erasekit.core.provenance import run_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="on/off alternations (blocks of 10 steps each)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("hook_cost.json")))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = machine_load()
    pipe = erasekit.load_pipeline()
    inputs = model_inputs(pipe)
    denoiser = sd.denoiser(pipe)

    def step():
        denoiser(**inputs)

    def ops() -> collections.Counter:
        step()
        with CountOps() as counter:
            step()
        return counter.counts

    def cpu_ms(steps: int = 10) -> float:
        started = time.process_time()
        for _ in range(steps):
            step()
        return (time.process_time() - started) / steps * 1e3

    rows = {}
    with torch.no_grad():
        plain = ops()
        for kind in ("static", "gated"):
            for count in (1, 4):
                adapters = [make_adapter(pipe, kind, seed) for seed in range(count)]
                names = [compose.load(pipe, a, name=f"{kind}{i}") for i, a in enumerate(adapters)]
                added = ops() - plain
                on, off = [], []
                step()
                for _ in range(args.rounds):
                    on.append(cpu_ms())
                    for name in names:
                        compose.disable(pipe, name)
                    off.append(cpu_ms())
                    for name in names:
                        compose.enable(pipe, name)
                    step()  # the first step after a switch is not timed
                compose.unload(pipe, names)
                modules = len(adapters[0].deltas)
                on_ms, off_ms = statistics.median(on), statistics.median(off)
                rows[f"{kind}_{count}"] = {
                    "adapted_modules": modules,
                    "ops_added_per_step": sum(added.values()),
                    "compute_ops_added_per_step": sum(n for op, n in added.items() if not is_view(op)),
                    "compute_ops_per_module": round(sum(n for op, n in added.items() if not is_view(op)) / modules, 2),
                    "ops_added": dict(sorted(added.items())),
                    "cpu_ms_per_step": round(on_ms, 3), "plain_cpu_ms_per_step": round(off_ms, 3),
                    "cpu_ms_added_per_step": round(on_ms - off_ms, 3),
                    "cpu_us_added_per_module": round((on_ms - off_ms) / modules * 1e3, 1),
                }
                print(kind, count, {k: v for k, v in rows[f"{kind}_{count}"].items() if k != "ops_added"}, flush=True)
    record = {"benchmark": "hook_cost", "model": "tinyworld UNet, CFG batch 2, fp32, 1 thread",
              "plain_ops_per_step": sum(plain.values()),
              "plain_compute_ops_per_step": sum(n for op, n in plain.items() if not is_view(op)),
              "rows": rows, "load_before": load_before, "load_after": machine_load(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "run": run_record()}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
