import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tinyworld_pipe():
    """The packaged tinyworld pipeline on CPU (session-wide; tests must not leave adapters loaded)."""
    from erasekit.loading import load_pipeline

    return load_pipeline(None, device="cpu")


@pytest.fixture(scope="session")
def tinyworld_mmdit_pipe():
    """tinyworld-mmdit (SD3's architecture, flow matching) on CPU, without T5 as it was trained (session-wide; tests
    must not leave adapters loaded)."""
    from erasekit.loading import load_pipeline

    return load_pipeline("tinyworld-mmdit", device="cpu")


@pytest.fixture(scope="session")
def judge():
    from erasekit import tinyworld

    return tinyworld.load_judge()
