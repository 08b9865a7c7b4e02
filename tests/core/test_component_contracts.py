"""Component contracts declared, not probed: feature widths checked when a policy is built,
capabilities read from one place, and the retired ``h2o`` / ``l2`` scorer names still loading."""

from __future__ import annotations

import json

import pytest
import torch

import kvpolicy
from kvpolicy import FeatureWidthError, Policy
from kvpolicy.checkpoint import write_policy_file
from kvpolicy.testing.strategies import CacheShape, make_view
from kvpolicy.types import Capabilities, ComponentRef, EmptyConfig, FeatureWidth, Requirements, capabilities

SHAPE = CacheShape(batch=2, kv_heads=2, groups=2, tokens=40, head_dim=8, seen=64, fresh=8, dtype=torch.float32)


def _old_file(tmp_path, config: dict) -> str:
    """A policy file as written before the scorer was the ``feature`` scorer (no parameters)."""
    path = tmp_path / "old.safetensors"
    write_policy_file(path, json.dumps(config, sort_keys=True), torch.zeros(0), {})
    return str(path)


@pytest.mark.parametrize(
    ("preset", "old_scorer", "sign"),
    [("h2o", "h2o", 1.0), ("l2", "l2", -1.0)],
)
def test_a_file_naming_the_retired_scorer_loads_and_plans_identically(tmp_path, preset, old_scorer, sign):
    current = kvpolicy.build(preset, budget=16)
    old = json.loads(current.to_json())
    old["scorer"] = {"name": old_scorer, "config": {}}  # how the file was written before
    loaded = Policy.load(_old_file(tmp_path, old))
    assert loaded.config == current.config
    assert loaded.scorer.config.index == 0 and loaded.scorer.config.sign == sign
    for layer in (2, 3):
        view = make_view(SHAPE, seed=layer, requirements=current.requirements, layer=layer, num_layers=4)
        features = current.extract(view)
        torch.testing.assert_close(loaded.scorer.score(features, view), sign * features[..., 0], rtol=0, atol=0)
        again = make_view(SHAPE, seed=layer, requirements=current.requirements, layer=layer, num_layers=4)
        a, b = current.plan(view), loaded.plan(again)
        assert torch.equal(a.indices, b.indices)
    # and a JSON config or a component given by the old name builds the same policy
    assert Policy.from_json(json.dumps(old)).config == current.config
    assert kvpolicy.build(preset, budget=16, scorer=old_scorer).config == current.config


def test_a_scorer_that_cannot_take_the_extractors_width_is_refused_when_built():
    with pytest.raises(FeatureWidthError, match=r"'stft' gives 25 features.*'bam' takes exactly 30"):
        Policy("stft", ("bam", {"features": 30}), "threshold")
    with pytest.raises(FeatureWidthError, match=r"'position' gives 1 features.*'feature' takes at least 3"):
        Policy("position", ("feature", {"index": 2}), "top_k", budget=8)
    with pytest.raises(FeatureWidthError, match=r"takes at least 3"):
        kvpolicy.build("fastgen", extractor="position")
    assert issubclass(FeatureWidthError, kvpolicy.InvalidConfigError)
    Policy("stft_votes", ("bam", {"features": 26}), "threshold")  # widths that agree build


class _Undeclared:
    """A third party's components written before widths and capabilities could be declared."""

    name = "undeclared"
    Config = EmptyConfig

    def __init__(self, config=None):
        self.config = config or EmptyConfig()

    @property
    def requirements(self):
        return Requirements()

    def extract(self, view):
        return torch.zeros((*view.positions.shape, 7))

    def score(self, features, view):
        return features[..., 0]


def test_components_that_declare_nothing_get_the_old_defaults():
    assert capabilities(_Undeclared()) == Capabilities(
        needs_budget=True, keeps_highest_scores=True, requires_aligned_heads=False
    )
    Policy(_Undeclared(), ("bam", {"features": 3}), "threshold")  # no declared width: nothing to check
    Policy("stft", _Undeclared(), "top_k", budget=8)
    with pytest.raises(kvpolicy.InvalidBudgetError, match="needs a budget"):
        Policy("position", "feature", _Selector())


class _Selector:
    name = "undeclared_selector"
    Config = EmptyConfig
    config = EmptyConfig()
    requirements = Requirements()

    def select(self, scores, protected, budget, view):  # pragma: no cover - never run
        raise AssertionError


def test_declared_capabilities_are_read_from_the_class():
    assert not capabilities(kvpolicy.build("namm-bam").selector).needs_budget
    assert not capabilities(kvpolicy.build("h2o").selector).keeps_highest_scores
    assert capabilities(kvpolicy.build("snapkv").selector) == Capabilities()
    assert str(FeatureWidth.exactly(25)) == "exactly 25" and FeatureWidth.at_least(1).admits(30)
    assert ComponentRef("h2o") != ComponentRef("feature")
