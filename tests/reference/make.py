"""Reference outputs that a refactor must reproduce: adapters of seven methods made with short seeded configs on
tinyworld, one audit's records, and ``erasekit demo``'s table.

``python tests/reference/make.py`` writes them beside this file; ``tests/test_reference_outputs.py`` makes them
again and compares: adapter tensors bit for bit and records equal (the write time aside), the audit's records equal
(timings aside), the demo's table line for line. Regenerate only when a change of behaviour is intended, and say so
in the commit.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (file stem, method, options): short, seeded, each a few seconds on a 2-core CPU.
ADAPTERS = [
    ("uce", "uce", {}),
    ("rece", "rece", {"epochs": 1, "validation_judge": ""}),
    ("time", "time", {}),
    ("esd-x", "esd-x", {"iterations": 2, "num_inference_steps": 2, "batch_size": 1, "seed": 0,
               "progress": False}),
    ("spm", "spm", {"iterations": 2, "num_inference_steps": 2, "batch_size": 1, "seed": 0,
               "progress": False}),
    ("advunlearn", "advunlearn", {"iterations": 2, "attack_steps": 1, "num_inference_steps": 2, "batch_size": 1,
                                  "retain_batch": 1, "warmup": 0, "seed": 0, "progress": False}),
    ("fewshot", "fewshot", {"epochs": 1, "num_images": 4, "seed": 0, "progress": False}),
]
CONCEPT = "circle"
AUDIT = {"attacks": ["paraphrase"], "prompts": ["a red circle on a black background"], "seeds": [0],
         "paraphrases": ["a crimson disc"], "preserve_prompts": ["a red square on a black background"]}
#: fields that differ between two identical runs (write time, measured seconds, the installed libraries' versions),
#: at any depth
VOLATILE = {"created", "seconds", "elapsed", "erasekit_version", "torch_version", "diffusers_version",
            "transformers_version"}


@contextlib.contextmanager
def one_thread():
    """Bitwise reproducible float reductions: torch's CPU kernels split work by thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_adapters(pipe, folder: Path) -> list[Path]:
    import erasekit

    paths = []
    with one_thread():
        for stem, method, options in ADAPTERS:
            path = folder / f"{stem}.safetensors"
            erasekit.erase(pipe, method, [CONCEPT], **options).save(path)
            paths.append(path)
    return paths


def make_audit(pipe, folder: Path) -> Path:
    from erasekit import compose
    from erasekit.audit import audit

    name = compose.load(pipe, str(folder / "uce.safetensors"))
    try:
        with one_thread():
            audit(pipe, CONCEPT, out_dir=folder / "audit", progress=False, grids=False, **AUDIT)
    finally:
        compose.unload(pipe, [name])
    return folder / "audit" / "results.jsonl"


def demo_output(folder: Path) -> list[str]:
    """What ``erasekit demo --seed 0 --out-dir FOLDER`` prints, line by line (one thread)."""
    from erasekit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), one_thread():
        assert main(["demo", "--seed", "0", "--out-dir", str(folder)]) == 0
    return out.getvalue().splitlines()


def demo_table(lines: list[str]) -> list[str]:
    """The demo's table: the lines between the adapter line and the images line."""
    start = next(i for i, line in enumerate(lines) if line.startswith("what the judge sees"))
    end = next(i for i, line in enumerate(lines) if line.startswith("images:"))
    return [line for line in lines[start:end] if line.strip()]


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def stable_record(record: dict) -> dict:
    """The record without what differs between runs; the base model's folder (where the checkout is) as a name."""
    record = _strip(record)
    if Path(record.get("base_model", "")).parts[-3:] == ("erasekit", "tinyworld", "weights"):
        record["base_model"] = "tinyworld"
    return record


def stable_audit(path: Path) -> list[dict]:
    return [_strip(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    import erasekit

    pipe = erasekit.load_pipeline(device="cpu")
    make_adapters(pipe, HERE)
    audit_file = make_audit(pipe, HERE)
    (HERE / "audit.json").write_text(json.dumps(stable_audit(audit_file), indent=1, sort_keys=True) + "\n")
    import shutil

    shutil.rmtree(HERE / "audit")
    (HERE / "demo.txt").write_text("\n".join(demo_table(demo_output(HERE / "demo"))) + "\n")
    shutil.rmtree(HERE / "demo")
    print("written:", ", ".join(sorted(p.name for p in HERE.iterdir() if p.suffix != ".py")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
