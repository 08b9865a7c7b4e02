"""Fixtures shared by the evolution tests."""

from __future__ import annotations

import pytest
from evolve_support import TINY_HF

from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.runner import Evolution


@pytest.fixture(scope="session")
def tiny_inprocess_run(tmp_path_factory):
    """``(result, out dir)`` of the tiny real-path run in this process: the reference every
    other executor must reproduce bit for bit (run once per session: it costs ~10-30 s)."""
    out = tmp_path_factory.mktemp("tiny-inprocess")
    return Evolution(EvolveConfig.from_dict(TINY_HF), out).run(), out
