"""BAM and MLP scorers: parameter count, zero start, counter-causal mask, populations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvpolicy
from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.types import LayerView, Parametric
from kvpolicy_plugins.bam import BamConfig, BamScorer
from kvpolicy_plugins.mlp import MlpConfig, MlpScorer


def view_for(positions: torch.Tensor) -> LayerView:
    return LayerView(layer=0, num_layers=1, positions=positions, seen=int(positions.max()) + 1)


def random_params(scorer, seed: int, members: int | None = None, scale: float = 0.3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (scorer.num_params,) if members is None else (members, scorer.num_params)
    return torch.randn(shape, generator=generator) * scale


def test_bam_has_the_papers_4172_parameters_and_starts_at_zero():
    scorer = BamScorer()
    assert isinstance(scorer, Parametric)
    assert scorer.num_params == 4172 == (25 * 96 + 96) + (32 * 50 + 50) + (25 + 1)
    assert torch.equal(scorer.get_flat(), torch.zeros(4172))
    features = torch.randn(2, 3, 40, 25)
    scores = scorer.score(features, view_for(torch.arange(40).expand(2, 3, 40)))
    assert scores.shape == (2, 3, 40)
    assert torch.equal(scores, torch.zeros(2, 3, 40))


def test_zero_namm_evicts_nothing_and_random_namm_evicts():
    policy = kvpolicy.build("namm-bam")
    assert policy.num_params == 4172 and policy.schedule.every == 512 and not policy.budget.is_set
    torch.manual_seed(0)
    positions = torch.arange(64).expand(1, 2, 64)
    attention = torch.softmax(
        torch.randn(1, 2, 48, 64).masked_fill(
            positions[:, :, None, :] > torch.arange(16, 64).view(1, 1, 48, 1), float("-inf")
        ),
        -1,
    )
    view = LayerView(
        layer=0, num_layers=1, positions=positions, seen=64, attention=attention, query_positions=torch.arange(16, 64)
    )
    selection = policy.plan(view)
    assert selection.kept == 64
    policy.set_flat(random_params(policy, seed=3, scale=0.5))
    fresh = LayerView(
        layer=0, num_layers=1, positions=positions, seen=64, attention=attention, query_positions=torch.arange(16, 64)
    )
    selection = policy.plan(fresh)
    assert 1 <= selection.kept < 64
    assert bool((selection.indices[..., -1] == 63).all())  # the newest token is always kept


@given(
    seed=st.integers(0, 2**16),
    tokens=st.integers(2, 24),
    changed=st.data(),
    shuffle=st.booleans(),
)
def test_changing_an_older_token_never_changes_a_newer_tokens_score(seed, tokens, changed, shuffle):
    generator = torch.Generator().manual_seed(seed)
    scorer = BamScorer()
    scorer.set_flat(torch.randn(scorer.num_params, generator=generator) * 0.5)
    positions = torch.randperm(tokens, generator=generator) if shuffle else torch.arange(tokens)
    positions = (positions * 3 + 5).view(1, 1, tokens)  # gaps, like a cache after eviction
    features = torch.randn(1, 1, tokens, 25, generator=generator)
    slot = changed.draw(st.integers(0, tokens - 1))
    before = scorer.score(features, view_for(positions))
    edited = features.clone()
    edited[0, 0, slot] = torch.randn(25, generator=generator) * 3
    after = scorer.score(edited, view_for(positions))
    newer = positions[0, 0] > positions[0, 0, slot]
    torch.testing.assert_close(after[0, 0, newer], before[0, 0, newer], atol=1e-5, rtol=1e-5)


def test_information_flows_from_newer_to_older_tokens():
    """The mask is counter-causal, not absent: a newer token's features do reach older scores."""
    scorer = BamScorer()
    scorer.set_flat(random_params(scorer, seed=7, scale=0.5))
    positions = torch.arange(10).view(1, 1, 10)
    features = torch.randn(1, 1, 10, 25)
    before = scorer.score(features, view_for(positions))
    edited = features.clone()
    edited[0, 0, 9] += 3.0
    after = scorer.score(edited, view_for(positions))
    assert not torch.allclose(after[0, 0, :9], before[0, 0, :9])


@pytest.mark.parametrize("make", [BamScorer, lambda: MlpScorer(MlpConfig(hidden=16, depth=2))])
def test_a_population_scores_like_its_members_one_by_one(make):
    scorer = make()
    members = 4
    population = random_params(scorer, seed=11, members=members)
    features = torch.randn(members, 3, 30, 25)
    positions = torch.arange(30).expand(members, 3, 30)
    scorer.set_flat(population)
    assert scorer.get_flat().shape == (members, scorer.num_params)
    together = scorer.score(features, view_for(positions))
    for i in range(members):
        scorer.set_flat(population[i])
        assert scorer.get_flat().shape == (scorer.num_params,)
        alone = scorer.score(features[i : i + 1], view_for(positions[i : i + 1]))
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    # one set is shared by every batch row
    shared = scorer.score(features, view_for(positions))
    torch.testing.assert_close(shared[-1:], together[-1:], atol=1e-5, rtol=1e-5)


def test_policy_set_flat_routes_a_population_to_the_scorer():
    policy = kvpolicy.build("namm-bam")
    population = random_params(policy.scorer, seed=2, members=3)
    policy.set_flat(population)
    torch.testing.assert_close(policy.scorer.get_flat(), population)
    with pytest.raises(ShapeError, match="batch of 2"):
        policy.scorer.score(torch.randn(2, 1, 5, 25), view_for(torch.arange(5).expand(2, 1, 5)))


def test_bad_parameters_and_features_are_named():
    scorer = BamScorer()
    with pytest.raises(ShapeError, match="4172 parameters"):
        scorer.set_flat(torch.zeros(10))
    with pytest.raises(ShapeError, match="finite"):
        scorer.set_flat(torch.full((4172,), float("nan")))
    with pytest.raises(ShapeError, match="features \\[batch, kv_heads, tokens, 25\\]"):
        scorer.score(torch.randn(1, 1, 5, 17), view_for(torch.arange(5).view(1, 1, 5)))
    assert BamScorer(BamConfig(features=17, hidden=8)).num_params == (17 * 24 + 24) + (8 * 34 + 34) + 18
    with pytest.raises(InvalidConfigError, match="hidden"):
        BamConfig(hidden=0)


def test_mlp_is_per_token_and_sized_by_its_config():
    cfg = MlpConfig(features=25, hidden=8, depth=2)
    scorer = MlpScorer(cfg)
    assert scorer.num_params == (25 * 8 + 8) + (8 * 8 + 8) + (8 + 1)
    assert MlpScorer(MlpConfig(depth=0)).num_params == 26
    positions = torch.arange(12).view(1, 1, 12)
    features = torch.randn(1, 1, 12, 25)
    assert torch.equal(scorer.score(features, view_for(positions)), torch.zeros(1, 1, 12))
    scorer.set_flat(random_params(scorer, seed=4))
    before = scorer.score(features, view_for(positions))
    edited = features.clone()
    edited[0, 0, 5] += 2.0
    after = scorer.score(edited, view_for(positions))
    changed = ~torch.isclose(after, before)
    assert changed[0, 0].tolist() == [i == 5 for i in range(12)]
    with pytest.raises(InvalidConfigError, match="activation"):
        MlpConfig(activation="swish")
