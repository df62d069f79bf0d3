"""The runnable examples in the public API's docstrings run and say what they show."""

import doctest
import importlib

import pytest

MODULES = ["erasekit.loading", "erasekit.api", "erasekit.compose", "erasekit.audit"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"tmp": tmp_path}, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_every_command_has_examples_in_its_help(capsys):
    from erasekit.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        if name == "erase":
            continue  # erase builds its own parser per method; its examples are tested in test_cli
        assert "example" in (sub.epilog or ""), name
