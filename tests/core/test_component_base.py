"""The scorer CONTRIBUTING.md walks through, exactly as printed there: it registers, passes the
conformance kit and runs in a policy; and what `ComponentBase` and its two variants take care of."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import kvpolicy
from kvpolicy.errors import CheckpointError, ShapeError
from kvpolicy.parameters import ParametricComponent
from kvpolicy.testing import check_component, load_profile
from kvpolicy.types import BufferedComponent, ComponentBase, EmptyConfig

load_profile()

CONTRIBUTING = (Path(__file__).resolve().parents[2] / "CONTRIBUTING.md").read_text()


def _walkthrough_module() -> types.ModuleType:
    section = CONTRIBUTING.split("## Write a scorer", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 30, "the walkthrough promises a scorer in 30 lines"
    module = types.ModuleType("kvpolicy_fading")
    exec(compile(code, "CONTRIBUTING.md", "exec"), module.__dict__)
    return module


def _registry_with_fading() -> tuple[kvpolicy.Registry, types.ModuleType]:
    module = _walkthrough_module()
    registry = kvpolicy.Registry()
    registry.register_plugin(module, name="fading")
    return registry, module


def test_the_walkthrough_scorer_passes_the_conformance_kit():
    registry, module = _registry_with_fading()
    assert "fading" in registry.names("scorer")
    passed = check_component(
        module.FadingScorer(), registry=registry, extractor=registry.create("extractor", "key_norm")
    )
    assert {"protocol", "config_roundtrip", "output_shape", "batch_permutation"} <= set(passed)


def test_the_walkthrough_scorer_keeps_the_newest_of_equal_keys():
    registry, _ = _registry_with_fading()
    policy = kvpolicy.Policy("key_norm", ("fading", {"rate": 0.1}), "top_k", budget=4, registry=registry)
    keys = torch.nn.functional.normalize(torch.randn(1, 1, 10, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    view = kvpolicy.LayerView(layer=0, num_layers=1, positions=torch.arange(10).view(1, 1, 10), seen=10, keys=keys)
    scores = policy.scorer.score(policy.extract(view), view)
    torch.testing.assert_close(scores[0, 0], 1.0 - 0.1 * torch.arange(9, -1, -1).float())
    assert policy.plan(view).indices[0, 0].tolist() == [6, 7, 8, 9]
    assert kvpolicy.Policy.from_config(policy.config, registry=registry).scorer.config.rate == 0.1


class _Reader(ComponentBase):
    name = "reader"

    def score(self, features, view):
        return self.read_feature(features, 2, "the third one")


def test_the_base_builds_the_default_config_and_names_the_component_in_errors():
    reader = _Reader()
    assert reader.config == EmptyConfig() and reader.requirements == kvpolicy.Requirements()
    assert reader.label == "scorer 'reader'"
    with pytest.raises(ShapeError, match=r"scorer 'reader' reads feature 2 \(the third one\).*\(1, 1, 4, 2\)"):
        reader.score(torch.zeros(1, 1, 4, 2), None)


class _Counted(BufferedComponent):
    name = "counted"

    def initial_buffers(self):
        return {"count": torch.zeros(3, dtype=torch.float64)}

    def extract(self, view):  # pragma: no cover - never run
        raise AssertionError


def test_buffers_round_trip_and_refuse_another_shape():
    counted = _Counted()
    counted.load_state_dict({"count": torch.arange(3, dtype=torch.float32)})
    assert counted.state_dict()["count"].dtype == torch.float64  # loaded as the dtype it declares
    assert counted.state_dict()["count"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match=r"extractor 'counted' buffer 'count' has shape \(4,\), expected \(3,\)"):
        counted.load_state_dict({"count": torch.zeros(4)})
    with pytest.raises(KeyError, match="lack"):
        counted.load_state_dict({})


def test_a_policy_file_with_buffers_of_another_shape_is_a_checkpoint_error(tmp_path):
    saved = kvpolicy.Policy(("stft", {"n_fft": 16, "hop": 8}), "feature", "top_k", budget=8)
    saved.save(tmp_path / "small.safetensors")
    other = kvpolicy.Policy("stft", "feature", "top_k", budget=8)
    with pytest.raises(CheckpointError, match="buffer 'mean' has shape"):
        other.load_weights(tmp_path / "small.safetensors")


class _Linear(ParametricComponent):
    name = "linear"

    def parameter_shapes(self):
        return {"w": (3,), "b": (1,)}

    def score(self, features, view):
        p = self.params.unpack(features.shape[0], features.device, features.dtype)
        return torch.einsum("bhtf,bf->bht", features, p["w"]) + p["b"].view(-1, 1, 1)


def test_declared_parameter_shapes_become_one_flat_vector():
    linear = _Linear()
    assert linear.num_params == 4 and torch.equal(linear.get_flat(), torch.zeros(4))
    linear.set_flat(torch.tensor([1.0, 2.0, 3.0, 0.5]))
    scores = linear.score(torch.ones(1, 1, 2, 3), None)
    assert scores.tolist() == [[[6.5, 6.5]]]
    with pytest.raises(ShapeError, match="scorer 'linear' has 4 parameters"):
        linear.set_flat(torch.zeros(5))
