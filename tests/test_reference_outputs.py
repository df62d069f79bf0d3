"""Behaviour is pinned: the commands of ``tests/reference/make.py`` make the same adapters (tensors bit for bit,
records equal but for their write time), the same audit records and the same ``erasekit demo`` table as the files
committed beside it. A refactor that changes any of them changes behaviour."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REF = Path(__file__).parent / "reference"
spec = importlib.util.spec_from_file_location("reference_make", REF / "make.py")
make = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make)


def _read(path: Path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    record = json.loads(meta.pop("erasekit.adapter"))
    return tensors, record, meta


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    import erasekit

    folder = tmp_path_factory.mktemp("reference")
    pipe = erasekit.load_pipeline(device="cpu")
    paths = make.make_adapters(pipe, folder)
    return pipe, folder, paths


def _close(a, b, tol: float = 1e-4) -> bool:
    """Equal, numbers within ``tol`` relative (kernels of another CPU round differently in the last bits)."""
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
                and abs(a - b) <= tol * max(1.0, abs(a), abs(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("stem", [stem for stem, _, _ in make.ADAPTERS])
def test_adapter_is_reproduced(made, stem):
    """Same tensors (to float rounding, which Adam amplifies in AdvUnlearn: the references were made on another CPU, whose kernels round differently in
    the last bits; any change of behaviour moves them by far more), same record and metadata but the checksum."""
    _, folder, _ = made
    new_tensors, new_record, new_meta = _read(folder / f"{stem}.safetensors")
    old_tensors, old_record, old_meta = _read(REF / f"{stem}.safetensors")
    assert sorted(new_tensors) == sorted(old_tensors)
    for key, old in old_tensors.items():
        new = new_tensors[key]
        assert new.dtype == old.dtype and new.shape == old.shape, key
        if new.is_floating_point():
            torch.testing.assert_close(new, old, rtol=1e-3, atol=1e-3, msg=lambda m: f"{stem}: {key}: {m}")
        else:
            assert torch.equal(new, old), key
    stable = [{k: v for k, v in make.stable_record(r).items() if k != "tensor_sha256"} for r in (new_record, old_record)]
    assert _close(stable[0], stable[1])
    assert {k for k in new_meta} == {k for k in old_meta}


def test_audit_records_are_reproduced(made):
    pipe, folder, _ = made
    results = make.make_audit(pipe, folder)
    assert _close(make.stable_audit(results), json.loads((REF / "audit.json").read_text()))


def test_demo_the_readmes_main_command(tmp_path):
    """`erasekit demo` (README, first command) prints the committed table (the concept is gone after, the other
    shapes stay, one column each) and writes the adapter and the two images."""
    table = make.demo_table(make.demo_output(tmp_path))
    assert table == (REF / "demo.txt").read_text().splitlines()
    rows = {line[:line.index(":")]: line.split()[-2:] for line in table[1:]}
    assert rows["'circle' prompts"] == ["6/6", "0/6"] and rows["via synonym 'round shape'"][1] == "0/6", table
    assert rows["other shapes"][1] == rows["other shapes"][0], table
    assert len({len(line) for line in table}) == 1, table  # one column each, however long the label
    assert {p.name for p in tmp_path.iterdir()} == {"circle.uce.safetensors", "before.png", "after.png"}
