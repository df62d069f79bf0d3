"""Training time of the ``paired`` tinyworld preset on two CPU threads, alone (issue #22 §2's "training ≤ 30
minutes"): 100 of its updates (each after its 10-step soft-prompt attack), timed, and the preset's 1600 extrapolated
with the rendering of its pairs. The full suite's rows measure the whole run at one thread beside a second row.

    python benchmarks/paired_rate_tinyworld.py      # → paired_rate_tinyworld.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from erasekit.api import erase
from erasekit.core.files import atomic_write
from erasekit.core.provenance import run_record
from erasekit.loading import load_pipeline
from erasekit.methods import METHODS

OUT = Path(__file__).with_suffix(".json")
UPDATES = 100


def main() -> None:
    torch.set_num_threads(2)
    load = os.getloadavg()[0]
    pipe = load_pipeline(None, device="cpu")
    started = time.time()
    adapter = erase(pipe, "paired", ["circle"], iterations=UPDATES, progress=False)
    total = time.time() - started
    training = adapter.info["training"]["seconds"]
    preset = METHODS["paired"].make_config("circle", tinyworld=True).iterations
    result = {"updates": UPDATES, "threads": 2, "load_before": round(load, 2), "training_seconds": training,
              "data_seconds": round(total - training, 1), "seconds_per_update": round(training / UPDATES, 3),
              "preset_updates": preset,
              "preset_minutes": round((preset * training / UPDATES + total - training) / 60, 1), "run": run_record()}
    atomic_write(OUT, json.dumps(result, indent=1).encode())
    print(json.dumps({k: v for k, v in result.items() if k != "run"}))


if __name__ == "__main__":
    main()
