"""Shared test configuration: hypothesis profiles (derandomised under CI) and small fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from kvpolicy.testing import load_profile

load_profile()  # derandomised and bounded under CI, random locally

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def registry():
    """A fresh registry loaded from the installed entry points (built-ins + example plugin)."""
    from kvpolicy import Registry

    return Registry()
