"""adapters/examples/: format-1 files kept forever; every release must load them and apply them as before.

Also the CLI verbs that work on adapter files: inspect, export, merge, fuse.
"""

import warnings
from pathlib import Path

import pytest
import torch

from erasekit import compose
from erasekit.adapter import check_compatible, load_adapter
from erasekit.cli import main
from erasekit.generate import generate
from erasekit.methods import METHODS

EXAMPLES = sorted((Path(__file__).parents[1] / "adapters" / "examples").glob("*.safetensors"))
PROMPTS = {"circle": "a solid red circle on a black background", "red": "a solid red square on a black background",
           "striped": "a striped blue star on a black background"}


def test_there_are_examples_of_several_methods():
    methods = {load_adapter(p).method for p in EXAMPLES}
    assert len(EXAMPLES) >= 3 and len(methods) >= 3 and methods <= set(METHODS)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_loads_fits_and_changes_only_its_modules(path, tinyworld_pipe):
    adapter = load_adapter(path)
    assert adapter.concepts and adapter.method in METHODS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # made on this very tinyworld checkpoint: not even a warning
        check_compatible(adapter, tinyworld_pipe, strict=True)
    before = {n: p.detach().clone() for n, p in tinyworld_pipe.unet.named_parameters()}
    prompt = PROMPTS[adapter.concepts[0]]
    base = generate(tinyworld_pipe, [prompt], [0], output_type="np")
    name = compose.load(tinyworld_pipe, adapter)
    try:
        erased = generate(tinyworld_pipe, [prompt], [0], output_type="np")
    finally:
        compose.unload(tinyworld_pipe, name)
    assert abs(erased - base).max() > 1e-3  # the erasure acts
    after = generate(tinyworld_pipe, [prompt], [0], output_type="np")
    assert (after == base).all()  # and leaves nothing behind
    assert all(torch.equal(p, before[n]) for n, p in tinyworld_pipe.unet.named_parameters())


def _example(method):
    return next(p for p in EXAMPLES if load_adapter(p).method == method)


def test_cli_inspect_export_merge(tmp_path, capsys):
    uce = _example("uce")
    assert main(["inspect", str(uce)]) == 0
    shown = capsys.readouterr().out
    assert "uce erasing circle" in shown and '"rank": 1' in shown  # what the erase recorded, too
    out = tmp_path / "lora.safetensors"
    assert main(["export", str(uce), "--to", "diffusers", "--out", str(out)]) == 0 and out.is_file()
    assert main(["export", str(uce), "--to", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(uce), str(_example("time")), "--out", str(merged)]) == 0
    m = load_adapter(merged)
    assert m.info["merge"] == "weighted stack" and set(m.concepts) == {"circle", "red"}
    assert main(["merge", str(uce), "--out", str(tmp_path / "x.safetensors")]) == 2  # one adapter: clear error
    assert "at least two" in capsys.readouterr().err


def test_stack_merge_equals_sum_of_deltas():
    from erasekit.merge import stack

    a, b = load_adapter(_example("uce")), load_adapter(_example("rece"))
    merged = stack([a, b], [1.0, 0.5])
    for key, d in merged.deltas.items():
        expected = sum(w * x.deltas[key].dense() for x, w in ((a, 1.0), (b, 0.5)) if key in x.deltas)
        torch.testing.assert_close(d.dense(), expected, rtol=1e-5, atol=1e-6)


def test_exact_merge_of_uce_adapters_equals_joint_solve(tinyworld_pipe):
    from erasekit import erase
    from erasekit.merge import merge

    opts = dict(expand_prompts="none", key_mode="last_token", preserve_related=False, negative_guidance=0.0,
                save_stats=True)
    a, b = erase(tinyworld_pipe, "uce", ["circle"], **opts), erase(tinyworld_pipe, "uce", ["red"], **opts)
    merged = merge([a, b], pipe=tinyworld_pipe)
    joint = erase(tinyworld_pipe, "uce", ["circle", "red"], **opts)
    assert merged.info["merge"] == "exact re-solve"
    for key, d in joint.deltas.items():
        torch.testing.assert_close(merged.deltas[key].dense(), d.dense(), rtol=1e-5, atol=1e-7)


def test_cli_fuse_writes_a_stock_pipeline_without_partial_files(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "baked"
    assert main(["fuse", "--adapter", str(_example("uce")), "--out", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet is not None and "uce" in (out / "README.md").read_text()
    bad = tmp_path / "bad"
    assert main(["fuse", "--adapter", str(tmp_path / "missing.safetensors"), "--out", str(bad)]) == 2
    assert not bad.exists() and "missing.safetensors" in capsys.readouterr().err
