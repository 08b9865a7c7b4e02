"""The README's example runs as printed, on the real shipped model, and the README stays a front
door: two commands first, at most 10 KB."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_the_readme_fits_on_two_screens():
    assert len(README.encode()) <= 10_240
    first = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first is not None
    assert len([line for line in first.group(1).splitlines() if line.strip()]) == 2


@pytest.mark.real_model
def test_the_readme_example_runs(capsys):
    code = re.search(r"## A policy in fifteen lines\n\n```python\n(.*?)```", README, re.S)
    assert code is not None
    namespace: dict = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    printed = capsys.readouterr().out
    assert printed.count("tokens seen") == 2
    assert namespace["out"].new_tokens.shape[-1] >= 1
