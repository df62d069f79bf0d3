"""Retrain tinyworld from its seed and check the result against the shipped weights.

Runs ``erasekit tinyworld train`` (resumable: an existing ``--work`` folder is continued, a finished ``--out``
folder is reused), then compares every shipped component tensor by tensor and the two judges on fresh renders
that no training run saw. Writes the training time (measured by the training itself, data rendering to the saved
pipeline) and the comparison.

    python benchmarks/tinyworld_train.py --out /tmp/tw --work /tmp/tw-work   # → benchmarks/tinyworld_train.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).with_name("tinyworld_train.json")
BAR_MINUTES = 60


def compare_weights(shipped: Path, trained: Path) -> dict:
    from safetensors.torch import load_file

    rows = {}
    for f in sorted(shipped.glob("*/*.safetensors")):
        a, b = load_file(f), load_file(trained / f.relative_to(shipped))
        same = {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        rows[f.parent.name] = {
            "tensors": len(a), "same_names_and_shapes": same,
            "max_abs_diff": max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if same else None,
            "bitwise_equal": same and all(torch.equal(a[k], b[k]) for k in a),
        }
    return rows


def compare_judges(shipped: Path, trained: Path, n: int, seed: int) -> dict:
    from erasekit.tinyworld import ATTRIBUTES, load_judge
    from erasekit.tinyworld.world import random_scene, render

    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s, rng) for s in scenes])
    truth = np.array([list(s.labels().values()) for s in scenes])
    a, b = load_judge(shipped)(images), load_judge(trained)(images)
    out = {}
    for i, attr in enumerate(ATTRIBUTES):
        pa, pb = a.probs[attr].argmax(-1).numpy(), b.probs[attr].argmax(-1).numpy()
        out[attr] = {"agreement": float((pa == pb).mean()), "shipped_accuracy": float((pa == truth[:, i]).mean()),
                     "retrained_accuracy": float((pb == truth[:, i]).mean())}
    return {"renders": n, "render_seed": seed, "per_attribute": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the retrained pipeline + judge")
    p.add_argument("--work", required=True, help="folder for data and resumable checkpoints")
    p.add_argument("--renders", type=int, default=2000, help="fresh renders on which the two judges are compared")
    p.add_argument("--json", default=str(OUT))
    args = p.parse_args()

    from erasekit import tinyworld
    from erasekit.core.provenance import run_record
    from erasekit.tinyworld.train import TrainConfig, train

    trained = Path(args.out)
    manifest_path = trained / "tinyworld.json"
    if not manifest_path.is_file():
        train(trained, args.work, TrainConfig())
    manifest = json.loads(manifest_path.read_text())
    shipped = tinyworld.path()
    weights = compare_weights(shipped, trained)
    judges = compare_judges(shipped, trained, args.renders, seed=12345)
    minutes = manifest["train_seconds"] / 60
    record = {
        "command": "erasekit tinyworld train --out DIR --work WORKDIR",
        "train_config": manifest["train_config"], "train_minutes": round(minutes, 1), "bar_minutes": BAR_MINUTES,
        "meets_bar": minutes <= BAR_MINUTES,
        "weights_vs_shipped": weights, "judges_on_fresh_renders": judges,
        "judge_heldout_accuracy": {"shipped": json.loads((shipped / "tinyworld.json").read_text())["judge_heldout_accuracy"],
                                   "retrained": manifest["judge_heldout_accuracy"]},
        "run": run_record(),
    }
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"trained in {minutes:.1f} min (bar {BAR_MINUTES}); bitwise equal to shipped: "
          + ", ".join(f"{k} {v['bitwise_equal']}" for k, v in weights.items()))
    print("judges agree on fresh renders: " + ", ".join(
        f"{k} {v['agreement']:.3f}" for k, v in judges["per_attribute"].items()))


if __name__ == "__main__":
    main()
