"""Shared test configuration: hypothesis profiles (derandomised under CI) and small fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def registry():
    """A fresh registry loaded from the installed entry points (built-ins + example plugin)."""
    from kvpolicy import Registry

    return Registry()
