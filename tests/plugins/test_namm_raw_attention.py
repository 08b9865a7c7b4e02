"""The ``raw_attention`` extractor: the attention rows themselves, or their mean / sum / max."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.types import LayerView
from kvpolicy_plugins.raw_attention import RawAttentionConfig, RawAttentionExtractor


def view_with(queries: int, tokens: int) -> LayerView:
    query_positions = torch.arange(tokens - queries, tokens)
    positions = torch.arange(tokens).expand(1, 2, tokens)
    logits = torch.randn(1, 2, queries, tokens).masked_fill(
        positions[:, :, None, :] > query_positions.view(1, 1, -1, 1), float("-inf")
    )
    return LayerView(
        layer=0,
        num_layers=1,
        positions=positions,
        seen=tokens,
        attention=torch.softmax(logits, -1),
        query_positions=query_positions,
    )


def test_rows_are_the_newest_attention_values_left_padded():
    view = view_with(queries=3, tokens=10)
    features = RawAttentionExtractor(RawAttentionConfig(window=5, reduce="rows")).extract(view)
    assert features.shape == (1, 2, 10, 5)
    assert torch.equal(features[..., :2], torch.zeros(1, 2, 10, 2))
    assert torch.equal(features[..., 2:], view.attention.transpose(2, 3))


def test_reductions_over_the_queries_each_token_existed_for():
    view = view_with(queries=4, tokens=10)
    rows = view.attention
    mean = RawAttentionExtractor(RawAttentionConfig(window=4, reduce="mean")).extract(view)
    total = RawAttentionExtractor(RawAttentionConfig(window=4, reduce="sum")).extract(view)
    peak = RawAttentionExtractor(RawAttentionConfig(window=2, reduce="max")).extract(view)
    torch.testing.assert_close(total[..., 0], rows.sum(2))
    torch.testing.assert_close(peak[..., 0], rows[:, :, -2:].amax(2))
    existed = torch.tensor([4.0] * 7 + [3.0, 2.0, 1.0])  # token 7 appears at the 2nd of queries 6..9
    torch.testing.assert_close(mean[..., 0], rows.sum(2) / existed)


def test_builds_a_policy_and_names_bad_input():
    policy = kvpolicy.Policy(("raw_attention", {"window": 8, "reduce": "sum"}), "feature", "top_k", budget=4, every=8)
    assert policy.requirements.attention_window == 8
    selection = policy.plan(view_with(queries=8, tokens=12))
    assert selection.kept == 4
    with pytest.raises(InvalidConfigError, match="rows, mean, sum, max"):
        RawAttentionConfig(reduce="median")
    bare = LayerView(layer=0, num_layers=1, positions=torch.arange(4).view(1, 1, 4), seen=4)
    with pytest.raises(ShapeError, match="needs view.attention"):
        RawAttentionExtractor().extract(bare)
