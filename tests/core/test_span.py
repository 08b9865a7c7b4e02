"""The ``span`` pooler: scores pooled over neighbouring cached tokens before selection, for any policy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy.errors import InvalidConfigError
from kvpolicy.selection import pool_neighbours
from kvpolicy.testing import examples
from kvpolicy.types import ComponentRef, LayerView, PolicyConfig, span_pooler_ref


def test_max_pooling_spreads_a_peak_to_its_neighbours_only():
    scores = torch.zeros(1, 1, 9)
    scores[0, 0, 4] = 5.0
    pooled = pool_neighbours(scores, 3, "max")
    assert pooled[0, 0].tolist() == [0, 0, 0, 5, 5, 5, 0, 0, 0]


def test_avg_pooling_ignores_padded_slots_and_keeps_them_last():
    scores = torch.tensor([[[1.0, 3.0, 5.0, float("-inf")]]])
    padded = torch.tensor([[[False, False, False, True]]])
    pooled = pool_neighbours(scores, 3, "avg", padded)
    # token 2's neighbours are tokens 1 and 2 (the padded slot lends nothing): (3 + 5) / 2
    assert pooled[0, 0, :3].tolist() == pytest.approx([2.0, 3.0, 4.0])
    assert pooled[0, 0, 3] == float("-inf")


def test_max_pooling_never_lifts_a_padded_slot():
    scores = torch.tensor([[[1.0, 9.0, float("-inf")]]])
    padded = torch.tensor([[[False, False, True]]])
    assert pool_neighbours(scores, 3, "max", padded)[0, 0, 2] == float("-inf")


def test_pinned_scores_stay_finite_and_nan_free():
    scores = torch.tensor([[[float("inf"), 0.0, float("nan"), -1.0]]])
    for mode in ("max", "avg"):
        pooled = pool_neighbours(scores, 3, mode)
        assert not torch.isnan(pooled).any()


@settings(max_examples=examples(50), deadline=None)
@given(
    tokens=st.integers(1, 40),
    kernel=st.sampled_from([1, 3, 5, 15]),
    mode=st.sampled_from(["max", "avg"]),
    seed=st.integers(0, 10_000),
)
def test_pooling_properties(tokens, kernel, mode, seed):
    scores = torch.randn(2, 3, tokens, generator=torch.Generator().manual_seed(seed))
    pooled = pool_neighbours(scores, kernel, mode)
    assert pooled.shape == scores.shape
    if mode == "max":
        assert (pooled >= scores).all()  # max pooling never lowers a token
    else:
        assert (pooled <= scores.amax(-1, keepdim=True) + 1e-5).all()
        assert (pooled >= scores.amin(-1, keepdim=True) - 1e-5).all()
    if kernel == 1:
        assert torch.equal(pooled, scores)


def test_span_config_is_validated_and_round_trips():
    assert span_pooler_ref(15) == ComponentRef("span", {"kernel": 15, "mode": "max"})
    assert span_pooler_ref({"kernel": 5, "mode": "avg"}) == ComponentRef("span", {"kernel": 5, "mode": "avg"})
    assert kvpolicy.build("h2o", budget=64, span=None).pooler is None
    for bad in (4, 0, "15", True, {"kernel": 3, "mode": "median"}):
        with pytest.raises(InvalidConfigError):
            kvpolicy.build("h2o", budget=64, span=bad)
    policy = kvpolicy.build("h2o", budget=64, span=15)
    again = kvpolicy.Policy.from_json(policy.to_json())
    assert again.config.pooler == ComponentRef("span", {"kernel": 15, "mode": "max"})
    # files written before poolers existed still load: the field defaults to none
    data = policy.config.to_dict()
    del data["pooler"]
    assert PolicyConfig.from_dict(data).pooler is None


def test_a_policy_with_a_span_keeps_whole_neighbourhoods():
    """The selection of a top_k policy with max pooling keeps the peak's neighbours too."""
    policy = kvpolicy.Policy("position", ("feature", {"index": 0}), "top_k", budget=6, span=5)
    positions = torch.arange(40).view(1, 1, 40)
    view = LayerView(layer=0, num_layers=1, positions=positions, seen=40)
    features = torch.full((1, 1, 40, 1), -1.0)
    features[0, 0, 20, 0] = 10.0
    kept = policy.choose(view, features).indices[0, 0].tolist()
    assert {18, 19, 20, 21, 22} <= set(kept) and 39 in kept  # the span, and the newest token


@pytest.mark.parametrize("name", ["h2o", "tova", "l2"])
def test_span_presets_are_the_faithful_presets_with_the_span_pooler(name):
    faithful = kvpolicy.build(name).config
    assert faithful.pooler is None  # the papers' policies stay as published
    spanned = kvpolicy.build(f"{name}-span").config
    assert spanned == faithful.with_span(31)
    assert spanned.pooler == ComponentRef("span", {"kernel": 31, "mode": "max"})
