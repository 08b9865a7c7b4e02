"""Every hook, and every argument of it, is documented on the hooks reference page."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from kvpolicy import hookspecs

DOC = (Path(__file__).resolve().parents[2] / "docs" / "hooks.md").read_text()
HOOKS = [(n, f) for n, f in vars(hookspecs).items() if n.startswith("kvpolicy_") and callable(f)]


def test_there_are_hooks():
    assert len(HOOKS) >= 6


@pytest.mark.parametrize(("name", "function"), HOOKS, ids=[n for n, _ in HOOKS])
def test_hook_and_its_arguments_are_documented(name, function):
    heading = next((line for line in DOC.splitlines() if line.startswith("### ") and f"`{name}(" in line), None)
    assert heading is not None, f"docs/hooks.md has no '### `{name}(...)`' section"
    for argument in inspect.signature(function).parameters:
        assert argument in heading, f"argument {argument!r} of {name} is missing from its heading in docs/hooks.md"
    assert function.__doc__ and "versionadded" in function.__doc__
