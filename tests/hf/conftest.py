"""Shared fixtures of the Hugging Face integration tests: tiny seeded models of every family."""

from __future__ import annotations

import functools

import pytest
import torch

from kvpolicy.integrations.hf.tiny import FAMILIES, tiny_model


@functools.cache
def _cached_model(family: str, implementation: str = "sdpa") -> torch.nn.Module:
    return tiny_model(family, attn_implementation=implementation)


@pytest.fixture(params=FAMILIES)
def family_model(request) -> torch.nn.Module:
    return _cached_model(request.param)


@pytest.fixture
def llama() -> torch.nn.Module:
    return _cached_model("llama")


@pytest.fixture
def gemma3() -> torch.nn.Module:
    return _cached_model("gemma3")
