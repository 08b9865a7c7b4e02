"""Saving and loading a policy: one atomic safetensors file; damaged files fail clearly."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch

import kvpolicy
from kvpolicy import CheckpointError, Policy, Registry
from kvpolicy.types import Requirements


@attrs.frozen
class LinearConfig:
    features: int = 1


class LinearScorer:
    """A learnable linear scorer, enough to exercise parameter save/load."""

    name: ClassVar[str] = "linear_test"
    Config = LinearConfig

    def __init__(self, config=None):
        self.config = config or LinearConfig()
        self.weight = torch.zeros(self.config.features + 1)

    @property
    def requirements(self):
        return Requirements()

    @property
    def num_params(self):
        return self.weight.numel()

    def get_flat(self):
        return self.weight.clone()

    def set_flat(self, vector):
        self.weight = torch.as_tensor(vector, dtype=torch.float32).clone()

    def score(self, features, view):
        return features @ self.weight[:-1] + self.weight[-1]

    # Stateful: a frozen buffer saved with the policy
    def state_dict(self):
        return {"scale": torch.tensor([2.0])}

    def load_state_dict(self, state):
        if set(state) != {"scale"}:
            raise KeyError(f"unexpected buffers {sorted(state)}")
        self.loaded_scale = state["scale"]


class _Plugin:
    @kvpolicy.hookimpl
    def kvpolicy_register_scorers(self, register):
        register("linear_test", LinearScorer)


@pytest.fixture
def registry():
    registry = Registry()
    registry.register_plugin(_Plugin(), name="linear-test")
    return registry


def test_round_trip_keeps_config_parameters_and_buffers(tmp_path, registry):
    policy = Policy("position", ("linear_test", {"features": 1}), "top_k", budget=16, sinks=2, registry=registry)
    policy.set_flat(torch.tensor([0.5, -1.0]))
    path = tmp_path / "policy.safetensors"
    policy.save(path)
    loaded = Policy.load(path, registry=registry)
    assert loaded.config == policy.config
    assert torch.equal(loaded.get_flat(), torch.tensor([0.5, -1.0]))
    assert torch.equal(loaded.scorer.loaded_scale, torch.tensor([2.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["policy.safetensors"]  # no temp file left


def test_population_parameters_are_rejected_with_shape_named(registry):
    policy = Policy("position", "linear_test", "top_k", budget=16, registry=registry)
    with pytest.raises(kvpolicy.ShapeError, match=r"\[members, 2\]"):
        policy.set_flat(torch.zeros(3, 5))


def test_truncated_file_is_a_checkpoint_error(tmp_path, registry):
    policy = Policy("position", "linear_test", "top_k", budget=16, registry=registry)
    path = tmp_path / "p.safetensors"
    policy.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Policy.load(path, registry=registry)


def test_missing_and_foreign_files_are_named(tmp_path, registry):
    with pytest.raises(CheckpointError, match="no saved policy"):
        Policy.load(tmp_path / "nope.safetensors", registry=registry)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a kvpolicy policy file"):
        Policy.load(tmp_path / "other.safetensors", registry=registry)


def test_parameter_count_mismatch_is_detected(tmp_path, registry):
    policy = Policy("position", ("linear_test", {"features": 3}), "top_k", budget=16, registry=registry)
    path = tmp_path / "p.safetensors"
    policy.save(path)
    # Rewrite the file with a config that expects fewer parameters.
    from safetensors import safe_open

    from kvpolicy.checkpoint import write_policy_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    edited = meta["policy"].replace('"features": 3', '"features": 1')
    write_policy_file(path, edited, tensors["params"], {})  # signed again: only the count is wrong
    with pytest.raises(CheckpointError, match="holds 4 parameters but its policy .* has 2"):
        Policy.load(path, registry=registry)


def test_policy_naming_a_missing_plugin_is_a_checkpoint_error(tmp_path, registry):
    policy = Policy("position", "linear_test", "top_k", budget=16, registry=registry)
    path = tmp_path / "p.safetensors"
    policy.save(path)
    with pytest.raises(CheckpointError, match="cannot be rebuilt here: unknown scorer 'linear_test'"):
        Policy.load(path, registry=Registry())


def test_building_a_saved_policy_with_overrides_keeps_parameters_and_validates(tmp_path, registry):
    policy = Policy("position", "linear_test", "top_k", budget=16, sinks=2, registry=registry)
    policy.set_flat(torch.tensor([0.25, 0.5]))
    path = tmp_path / "p.safetensors"
    policy.save(path)
    loaded = kvpolicy.build(path, registry=registry, budget="50%", recent=3)
    assert loaded.budget == kvpolicy.Budget(ratio=0.5) and loaded.protect.recent == 3 and loaded.protect.sinks == 2
    assert torch.equal(loaded.get_flat(), torch.tensor([0.25, 0.5]))
    with pytest.raises(kvpolicy.InvalidBudgetError, match="smaller than"):
        kvpolicy.build(path, registry=registry, budget=3, recent=3)  # 2 sinks + 3 recent
