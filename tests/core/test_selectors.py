"""The generic selectors on hand-computed examples."""

from __future__ import annotations

import torch

from kvpolicy import Budget
from kvpolicy.types import LayerView
from kvpolicy_plugins.selectors import ThresholdSelector, TopKConfig, TopKSelector


def _view(tokens: int, heads: int) -> LayerView:
    return LayerView(
        layer=0, num_layers=1, positions=torch.arange(tokens).expand(1, heads, tokens).clone(), seen=tokens
    )


def test_top_k_per_head_keeps_best_plus_protected():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 0.0, 3.0, 2.0], [0.0, 9.0, 8.0, 7.0, 1.0, 2.0]]])
    protected = torch.zeros(1, 2, 6, dtype=torch.bool)
    protected[..., -1] = True
    selection = TopKSelector().select(scores, protected, Budget(tokens=3), _view(6, 2))
    assert selection.indices.tolist() == [[[0, 2, 5], [1, 2, 5]]]
    assert selection.valid is None


def test_top_k_ratio_budget():
    scores = torch.arange(8.0).expand(1, 1, 8)
    selection = TopKSelector().select(scores, torch.zeros(1, 1, 8, dtype=torch.bool), Budget(ratio=0.25), _view(8, 1))
    assert selection.indices.tolist() == [[[6, 7]]]


def test_top_k_shared_across_heads_gives_slots_to_the_best_tokens_anywhere():
    # head 0 has three strong tokens, head 1 none; budget 2 per head = 4 slots for the layer,
    # at least 1 per head.
    scores = torch.tensor([[[9.0, 8.0, 7.0, 0.0], [0.1, 0.3, 0.2, 0.0]]])
    protected = torch.zeros(1, 2, 4, dtype=torch.bool)
    selector = TopKSelector(TopKConfig(shared_across_heads=True, min_per_head=1))
    selection = selector.select(scores, protected, Budget(tokens=2), _view(4, 2))
    assert selection.indices.tolist() == [[[0, 1, 2], [1, 0, 0]]]
    assert selection.valid.tolist() == [[[True, True, True], [True, False, False]]]
    assert int(selection.valid.sum()) == 4


def test_threshold_keeps_non_negative_and_equalises_heads():
    scores = torch.tensor([[[1.0, -1.0, -2.0, 0.5], [-3.0, -1.0, -0.5, -4.0]]])
    protected = torch.zeros(1, 2, 4, dtype=torch.bool)
    protected[..., -1] = True
    selection = ThresholdSelector().select(scores, protected, Budget(), _view(4, 2))
    # head 0 wants {0, 3}; head 1 wants only the newest {3}; both keep 2 → head 1 adds its best (2)
    assert selection.indices.tolist() == [[[0, 3], [2, 3]]]


def test_threshold_with_zero_scores_keeps_everything():
    scores = torch.zeros(2, 3, 7)
    protected = torch.zeros(2, 3, 7, dtype=torch.bool)
    selection = ThresholdSelector().select(scores, protected, Budget(), _view(7, 3))
    assert selection.indices.shape == (2, 3, 7)
    assert torch.equal(selection.indices, torch.arange(7).expand(2, 3, 7))


def test_threshold_counts_per_batch_row_so_population_members_do_not_interact():
    # row 0 wants 1 token per head, row 1 wants 3: row 0 keeps 1 (padded), row 1 keeps 3.
    scores = torch.tensor([[[-1.0, -2.0, -3.0, 0.0]], [[1.0, 1.0, -3.0, 0.0]]])
    protected = torch.zeros(2, 1, 4, dtype=torch.bool)
    protected[..., -1] = True
    selection = ThresholdSelector().select(scores, protected, Budget(), _view(4, 1))
    assert selection.valid.sum(-1).tolist() == [[1], [3]]
    assert selection.indices[0, 0][selection.valid[0, 0]].tolist() == [3]
    assert selection.indices[1, 0][selection.valid[1, 0]].tolist() == [0, 1, 3]


def test_protected_tokens_beat_scores_pinned_at_infinity():
    scores = torch.full((1, 1, 6), float("inf"))
    protected = torch.zeros(1, 1, 6, dtype=torch.bool)
    protected[..., -1] = True
    selection = TopKSelector().select(scores, protected, Budget(tokens=1), _view(6, 1))
    assert selection.indices.tolist() == [[[5]]]


def test_top_k_dropping_few_keeps_what_ranking_all_keeps():
    """A decoding step drops a token or two of many: the selector then finds the dropped ones
    instead of ranking every kept token; it must keep exactly the tokens ranking all keeps."""
    generator = torch.Generator().manual_seed(0)
    for tokens, capacity in ((9, 8), (40, 37), (40, 21), (40, 20), (40, 3), (7, 7)):
        scores = torch.rand(2, 3, tokens, generator=generator)  # distinct values: no ties to break
        protected = torch.zeros(2, 3, tokens, dtype=torch.bool)
        protected[..., -2:] = True
        protected[0, 1, 0] = True
        selection = TopKSelector().select(scores, protected, Budget(tokens=capacity), _view(tokens, 3))
        keyed = scores.masked_fill(protected, float("inf"))
        expected = keyed.topk(max(capacity, 3), dim=-1).indices.sort(dim=-1).values
        assert torch.equal(selection.indices, expected), (tokens, capacity)
        assert selection.valid is None


def test_threshold_per_head_keeps_each_heads_own_count():
    scores = torch.tensor([[[1.0, -1.0, -2.0, 0.5], [-3.0, -1.0, -0.5, -4.0]]])
    protected = torch.zeros(1, 2, 4, dtype=torch.bool)
    protected[..., -1] = True
    selector = ThresholdSelector(ThresholdSelector.Config(per_head=True))
    selection = selector.select(scores, protected, Budget(), _view(4, 2))
    # head 0 wants {0, 3}; head 1 only the newest {3}: it keeps 1, padded to 2 and masked out
    assert selection.valid.tolist() == [[[True, True], [True, False]]]
    assert selection.indices[0, 0].tolist() == [0, 3]
    assert selection.indices[0, 1][selection.valid[0, 1]].tolist() == [3]


def test_threshold_per_head_with_equal_wants_is_rectangular():
    scores = torch.tensor([[[1.0, -1.0, 2.0], [-1.0, 3.0, 2.0]]])
    protected = torch.zeros(1, 2, 3, dtype=torch.bool)
    selection = ThresholdSelector(ThresholdSelector.Config(per_head=True)).select(
        scores, protected, Budget(), _view(3, 2)
    )
    assert selection.valid is None
    assert selection.indices.tolist() == [[[0, 2], [1, 2]]]
