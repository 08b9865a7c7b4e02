"""Presets that ship learned weights: ``register(..., weights=path)`` and ``build(name)``."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy import Registry, hookimpl
from kvpolicy.errors import CheckpointError
from kvpolicy.types import Budget, ComponentRef, PolicyConfig


def _config() -> PolicyConfig:
    return PolicyConfig(
        extractor=ComponentRef("stft"),
        scorer=ComponentRef("mlp"),
        selector=ComponentRef("top_k"),
        budget=Budget(ratio=0.5),
    )


def _registry(weights) -> Registry:
    class Shipped:
        @hookimpl
        def kvpolicy_register_presets(self, register) -> None:
            register("shipped", _config(), description="with weights", weights=weights)

    registry = Registry()
    registry.register_plugin(Shipped(), name="shipped-plugin")
    return registry


def test_a_preset_starts_with_its_shipped_parameters_and_buffers(tmp_path):
    trained = kvpolicy.Policy.from_config(_config())
    trained.set_flat(torch.randn(trained.num_params, generator=torch.Generator().manual_seed(0)))
    trained.extractor.load_state_dict(
        {"mean": torch.arange(17.0), "var": torch.full((17,), 2.0), "count": torch.ones(1)}
    )
    trained.save(tmp_path / "weights.safetensors")
    registry = _registry(tmp_path / "weights.safetensors")
    policy = kvpolicy.build("shipped", registry=registry)
    assert torch.equal(policy.get_flat(), trained.get_flat())
    assert torch.equal(policy.buffers()["extractor.mean"], torch.arange(17.0, dtype=torch.float64))
    # overrides keep the weights: only the budget changes
    smaller = kvpolicy.build("shipped", registry=registry, budget="12.5%")
    assert smaller.budget == Budget(ratio=0.125) and torch.equal(smaller.get_flat(), trained.get_flat())


def test_missing_or_mismatched_weights_are_named_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no saved policy"):
        kvpolicy.build("shipped", registry=_registry(tmp_path / "absent.safetensors"))
    other = kvpolicy.Policy("stft", "bam", "threshold")
    other.save(tmp_path / "bam.safetensors")
    with pytest.raises(CheckpointError, match="parameters"):
        kvpolicy.build("shipped", registry=_registry(tmp_path / "bam.safetensors"))
