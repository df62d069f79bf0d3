"""Regenerate nothing: these files are format-1 fixtures kept forever (tests/test_examples.py loads them).

This script records how they were first made, on the packaged tinyworld model (run once, at format 1.0):

    python adapters/examples/make_examples.py
"""

from pathlib import Path

import torch

import erasekit

HERE = Path(__file__).parent
EXAMPLES = {  # file -> (method, concepts, options)
    "uce-circle.safetensors": ("uce", ["circle"], {"expand_prompts": "none", "key_mode": "last_token",
                                                     "negative_guidance": 0.0, "preserve_related": False}),
    "time-red.safetensors": ("time", ["red"], {}),
    "rece-striped.safetensors": ("rece", ["striped"], {}),
    "esd-x-circle-short.safetensors": ("esd-x", ["circle"], {"iterations": 2, "rank": 2}),
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    pipe = erasekit.load_pipeline()
    for name, (method, concepts, options) in EXAMPLES.items():
        if (HERE / name).exists():
            continue  # fixtures are never overwritten
        erasekit.erase(pipe, method, concepts, **options).save(HERE / name)
        print("wrote", name)
