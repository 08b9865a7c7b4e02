"""Component contracts declared, not probed: feature widths checked when a policy is built and
capabilities read from one place."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy import FeatureWidthError, Policy
from kvpolicy.types import Capabilities, ComponentRef, EmptyConfig, FeatureWidth, Requirements, capabilities


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
    assert capabilities(kvpolicy.build("snapkv").selector) == Capabilities(plans_layers_together=True)
    assert capabilities(kvpolicy.build("snapkv").scorer) == Capabilities()  # declares nothing: the defaults
    assert str(FeatureWidth.exactly(25)) == "exactly 25" and FeatureWidth.at_least(1).admits(30)
    assert ComponentRef("h2o") != ComponentRef("feature")
