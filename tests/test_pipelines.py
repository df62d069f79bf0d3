"""The erasure pipelines (docs/design.md §3): parity with the stock pipelines, the diffusers-style verbs, and loading the
packaged custom pipeline (and the checkout's ``pipelines/erasekit_sd``) through
``DiffusionPipeline.from_pretrained(custom_pipeline=...)``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import erasekit.adapter
import erasekit.pipelines
from erasekit import compose
from erasekit.adapter import Adapter, ModuleDelta
from erasekit.errors import AdapterError, ConfigError
from erasekit.pipelines import ErasureStableDiffusionPipeline, ErasureStableDiffusionXLPipeline, custom_pipeline_path
from erasekit.testing import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
ERASURE_CLASSES = {"sd1": ErasureStableDiffusionPipeline, "sdxl": ErasureStableDiffusionXLPipeline}


def random_adapter(pipe, suffixes=("attn2.to_k", "attn2.to_v"), *, rank=2, seed=0, scale=0.3, concepts=("cat",)):
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for path, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and path.endswith(suffixes):
            w = module.weight
            deltas[f"unet.{path}"] = ModuleDelta(down=torch.randn(rank, w.shape[1], generator=g) * scale,
                                                 up=torch.randn(w.shape[0], rank, generator=g) * scale)
    return Adapter(method="test", concepts=concepts, config={}, deltas=deltas)


def generate(pipe, prompt="a cat", seed=0):
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_no_adapters_equals_stock_pipeline_and_verbs_work(family):
    stock = tiny_pipeline(family)
    pipe = ERASURE_CLASSES[family].from_pipe(stock)
    pipe.set_progress_bar_config(disable=True)
    base = generate(stock)
    assert np.array_equal(generate(pipe), base)  # parity: the parent's __call__, unchanged

    assert pipe.load_erasure(random_adapter(pipe, seed=1), name="a") == "a"
    pipe.load_erasure(random_adapter(pipe, ("attn2.to_v",), seed=2, concepts=("dog",)), name="b", weight=0.5)
    assert [(e["name"], e["weight"], e["enabled"]) for e in pipe.erasures] == [("a", 1.0, True), ("b", 0.5, True)]
    assert compose.list_erasures(stock) == pipe.erasures  # one state per UNet: from_pipe siblings share it
    both = generate(pipe)
    assert np.abs(both - base).max() > 1e-3

    pipe.set_erasures(["a"])  # like set_adapters: only "a" active, weights kept
    assert [e["enabled"] for e in pipe.erasures] == [True, False]
    only_a = generate(pipe)
    pipe.set_erasures(["a", "b"], weights=[1.0, 0.5])
    assert np.array_equal(generate(pipe), both)
    with pytest.raises(AdapterError, match="unknown erasure 'c'"):
        pipe.set_erasures(["c"])

    with pipe.erasures_disabled():
        assert np.array_equal(generate(pipe), base)
    assert np.array_equal(generate(pipe), both)

    assert pipe.fuse_erasures() == ["a", "b"]
    np.testing.assert_allclose(generate(pipe), both, atol=1e-5)
    pipe.unfuse_erasures()
    assert np.array_equal(generate(pipe), both)

    pipe.unload_erasures("b")
    assert np.array_equal(generate(pipe), only_a)
    pipe.unload_erasures()
    assert pipe.erasures == []
    assert np.array_equal(generate(pipe), base)
    assert np.array_equal(generate(stock), base)  # the stock pipeline shares the modules: back to base too


def test_load_erasure_from_file(tmp_path):
    save_adapter = getattr(erasekit.adapter, "save_adapter", None)
    if save_adapter is None:
        pytest.skip("erasekit.adapter.save_adapter is not available yet")
    pipe = ErasureStableDiffusionPipeline.from_pipe(tiny_pipeline("sd1"))
    pipe.set_progress_bar_config(disable=True)
    adapter = random_adapter(pipe)
    save_adapter(adapter, tmp_path / "cat.test.safetensors")
    assert pipe.load_erasure(tmp_path / "cat.test.safetensors") == "cat.test"  # default name: the file's
    from_file = generate(pipe)
    pipe.unload_erasures()
    pipe.load_erasure(adapter, name="memory")
    np.testing.assert_allclose(generate(pipe), from_file, atol=1e-6)
    pipe.unload_erasures()


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Point diffusers' dynamic-module cache (HF_MODULES_CACHE) into tmp_path; undo sys.path/sys.modules after."""
    from diffusers.utils import dynamic_modules_utils

    cache = tmp_path / "modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(cache))  # read at import time
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield cache
    for name in set(sys.modules) - before:
        if name.startswith("diffusers_modules"):
            del sys.modules[name]


@pytest.mark.parametrize("where", ["package", "checkout"])
def test_custom_pipeline_loads_from_folder(tmp_path, modules_cache, monkeypatch, where):
    """The packaged folder from any working directory; the checkout's relative path from the repository root."""
    from diffusers import DiffusionPipeline

    stock = tiny_pipeline("sd1")
    stock.save_pretrained(tmp_path / "model")
    if where == "package":
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        custom_pipeline = custom_pipeline_path()
    else:
        monkeypatch.chdir(REPO)
        custom_pipeline = "pipelines/erasekit_sd"
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "model", custom_pipeline=custom_pipeline,
                                             trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "ErasureStableDiffusionPipeline"
    assert isinstance(pipe, ErasureStableDiffusionPipeline)
    assert any(modules_cache.rglob("pipeline.py"))  # diffusers copied the file into the (temporary) cache
    base = generate(stock)
    assert np.array_equal(generate(pipe), base)
    pipe.load_erasure(random_adapter(pipe), name="a")
    assert np.abs(generate(pipe) - base).max() > 1e-3
    pipe.unload_erasures()
    assert np.array_equal(generate(pipe), base)


def test_custom_pipeline_path_is_absolute_and_names_unknown_pipelines():
    path = Path(custom_pipeline_path())
    assert path.is_absolute() and (path / "pipeline.py").is_file()
    assert path.is_relative_to(Path(erasekit.pipelines.__file__).parent)  # inside the package, not the checkout
    with pytest.raises(ConfigError, match="unknown custom pipeline 'erasekit_sdxl'; erasekit ships: erasekit_sd"):
        custom_pipeline_path("erasekit_sdxl")


def test_wheel_ships_the_custom_pipeline(tmp_path):
    """A non-editable install has no checkout: the wheel itself must carry pipeline.py (package data)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "erasekit", src / "erasekit", ignore=shutil.ignore_patterns("weights", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("erasekit-*.whl")
    packaged = Path(custom_pipeline_path()).relative_to(Path(erasekit.__file__).parents[1]) / "pipeline.py"
    assert packaged.as_posix() in zipfile.ZipFile(wheel).namelist()
