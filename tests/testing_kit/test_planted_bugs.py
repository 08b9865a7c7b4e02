"""Proof the kit can fail: deliberately broken components and caches are reported."""

from __future__ import annotations

import pytest
import torch
from hypothesis.stateful import run_state_machine_as_test

import kvpolicy
from kvpolicy.errors import InvalidSelectionError
from kvpolicy.testing import ConformanceError, InvariantViolation, check_component, parametrize_with_checks
from kvpolicy.testing import strategies as kst
from kvpolicy.testing.machine import cache_machine, machine_settings
from kvpolicy.types import EmptyConfig, Selection
from kvpolicy_plugins.basic import RandomScorer


class DropsOldestProtected:
    """A top_k that 'forgets' protection: it evicts the oldest protected token of every head."""

    name = "drops_protected"
    Config = EmptyConfig
    needs_budget = True

    def __init__(self, config=None):
        self.config = config or self.Config()
        self.inner = kvpolicy.default_registry().create("selector", "top_k")

    @property
    def requirements(self):
        return kvpolicy.Requirements()

    def select(self, scores, protected, budget, view):
        first_protected = protected.float().argmax(-1, keepdim=True)  # oldest protected slot per head
        pinned = scores.float().scatter(-1, first_protected, float("-inf"))
        unprotected = protected.scatter(-1, first_protected, False)
        return self.inner.select(pinned, unprotected, budget, view)


@pytest.fixture
def no_shrinking():
    """A failure is expected: report it unshrunk (shrinking would rerun it many times)."""
    from hypothesis import Phase, settings

    previous = settings.get_current_profile_name()
    settings.register_profile("kvpolicy-no-shrink", settings(settings(), phases=[Phase.generate]))
    settings.load_profile("kvpolicy-no-shrink")
    yield
    settings.load_profile(previous)


def test_conformance_reports_dropped_protected_token(no_shrinking):
    with pytest.raises(ConformanceError, match="protected tokens evicted"):
        check_component(DropsOldestProtected())


class BatchDependentScorer(RandomScorer):
    """Planted bug: scores drawn for the whole batch at once, so a row's scores depend on its place."""

    def score(self, features, view):
        generator = torch.Generator().manual_seed(self.config.seed)
        return torch.rand(features.shape[:3], generator=generator)


def test_conformance_reports_a_batch_dependent_scorer(no_shrinking):
    with pytest.raises(ConformanceError, match="batch_permutation"):
        check_component(BatchDependentScorer(), skip=["population_rows"])


def _streaming(selector=None):
    policy = kvpolicy.build("streaming_llm", budget=6, sinks=2, schedule=kvpolicy.Schedule("every_step"))
    if selector is not None:
        policy.selector = selector
    return policy


def test_machine_reports_dropped_protected_token():
    machine = cache_machine(kst.policies(presets=["streaming_llm"]).map(lambda p: _streaming(DropsOldestProtected())))
    # Policy.choose checks every selection at run time, so the run fails there, before the
    # machine's own invariant would see the damaged cache.
    with pytest.raises(InvalidSelectionError, match="selector 'drops_protected' .* dropped .* protected"):
        run_state_machine_as_test(machine, settings=machine_settings())


def test_machine_reports_a_cache_that_forgets_to_gather_positions(monkeypatch):
    from kvpolicy.integrations.hf.cache import EvictingLayer

    original = EvictingLayer._take

    def take_without_positions(self, indices):
        positions = self.positions
        original(self, indices)
        self.positions = positions[..., : indices.shape[-1]].contiguous()  # the oldest, not the kept

    monkeypatch.setattr(EvictingLayer, "_take", take_without_positions)
    machine = cache_machine(kst.policies(presets=["streaming_llm"]).map(lambda p: _streaming()))
    with pytest.raises(InvariantViolation, match="kept keys differ|protected position"):
        run_state_machine_as_test(machine, settings=machine_settings())


def test_machine_passes_the_unbroken_cache():
    machine = cache_machine(kst.policies(presets=["streaming_llm"]).map(lambda p: _streaming()))
    run_state_machine_as_test(machine, settings=machine_settings())


def test_selection_invariants_accept_padding_and_catch_disorder():
    from kvpolicy.testing import selection_violations

    scores = torch.tensor([[[3.0, 1.0, 2.0, 0.0]]])
    protected = torch.tensor([[[False, False, False, True]]])
    good = Selection(torch.tensor([[[0, 3, 0]]]), torch.tensor([[[True, True, False]]]))
    assert selection_violations(good, scores, protected, 2) == []
    unordered = Selection(torch.tensor([[[3, 0]]]))
    assert "not strictly ascending" in selection_violations(unordered, scores, protected, 2)[0]
    worse = Selection(torch.tensor([[[1, 3]]]))  # keeps 1.0, evicts 3.0
    assert "scored 3" in selection_violations(worse, scores, protected, 2)[0]


@parametrize_with_checks(select=lambda t: t.id == "selector:top_k")
def test_parametrize_selects_targets(target, check):
    assert target.id == "selector:top_k"
    check(target)
