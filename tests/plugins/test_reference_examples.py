"""Hand-computed examples: for each reference policy, small tensors written out here and the
indices the paper's rule keeps, worked out by hand in the comments."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.types import LayerView


def view_of(tokens: int, heads: int = 1, *, seen: int | None = None, layer: int = 3, **fields) -> LayerView:
    positions = torch.arange(tokens).expand(1, heads, tokens).clone()
    return LayerView(layer=layer, num_layers=8, positions=positions, seen=seen or tokens, **fields)


def kept(selection) -> list[list[int]]:
    """Kept indices per head of batch row 0 (padding dropped)."""
    rows = []
    for head in range(selection.indices.shape[1]):
        idx = selection.indices[0, head]
        if selection.valid is not None:
            idx = idx[selection.valid[0, head]]
        rows.append(idx.tolist())
    return rows


# --------------------------------------------------------------------------- H2O


def test_h2o_keeps_heavy_hitters_and_recent_window() -> None:
    # budget 4 → 2 recent (indices 6, 7) + 2 heavy among the rest: acc 5.0 (0) and 3.0 (3)
    acc = torch.tensor([[[5.0, 1.0, 0.5, 3.0, 0.2, 0.1, 0.3, 0.4]]])
    policy = kvpolicy.build("h2o", budget=4)
    selection = policy.plan(view_of(8, accumulated_attention=acc))
    assert kept(selection) == [[0, 3, 6, 7]]


def test_h2o_heads_choose_their_own_heavy_hitters_and_the_split_is_configurable() -> None:
    acc = torch.tensor([[[5.0, 1.0, 0.5, 3.0, 0.2, 0.1, 0.3, 0.4], [0.1, 4.0, 0.5, 0.2, 2.0, 0.1, 0.3, 0.4]]])
    # budget 4 with recent_ratio 0.25 → 1 recent (7) + 3 heavy per head
    policy = kvpolicy.build("h2o", budget=4, selector={"recent_ratio": 0.25})
    assert kept(policy.plan(view_of(8, heads=2, accumulated_attention=acc))) == [[0, 1, 3, 7], [1, 2, 4, 7]]


def test_h2o_accumulated_attention_from_an_attention_matrix() -> None:
    # causal softmax rows of 4 queries over 4 tokens; H2O sums each column over the queries:
    # token 0: 1 + .5 + .6 + .4 = 2.5, token 1: .5 + .1 + .1 = .7, token 2: .3 + .2 = .5, token 3: .3
    rows = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.6, 0.1, 0.3, 0], [0.4, 0.1, 0.2, 0.3]])
    acc = rows.sum(0).view(1, 1, 4)
    torch.testing.assert_close(acc, torch.tensor([[[2.5, 0.7, 0.5, 0.3]]]))
    # budget 2 → recent 1 (index 3) + heavy 1 (index 0)
    assert kept(kvpolicy.build("h2o", budget=2).plan(view_of(4, accumulated_attention=acc))) == [[0, 3]]


# --------------------------------------------------------------------------- L2 norm


def test_l2_keeps_lowest_key_norms_and_skips_the_first_two_layers() -> None:
    keys = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [6.0, 8.0], [0.0, 0.5], [1.0, 1.0]]).view(1, 1, 6, 2)
    # norms 5, 1, 2, 10, 0.5, 1.41; budget 3 → newest (5) is protected, then the lowest: 4 (0.5), 1 (1.0)
    policy = kvpolicy.build("l2", budget=3)
    assert kept(policy.plan(view_of(6, keys=keys, layer=2))) == [[1, 4, 5]]
    assert policy.plan(view_of(6, keys=keys, layer=0)) is None
    assert policy.plan(view_of(6, keys=keys, layer=1)) is None
    assert policy.config.skip_layers == (0, 1)


# --------------------------------------------------------------------------- StreamingLLM


def test_streaming_llm_keeps_four_sinks_and_the_newest_tokens() -> None:
    # 12 tokens, budget 7 → sinks 0..3 + the 3 newest 9, 10, 11
    policy = kvpolicy.build("streaming_llm", budget=7)
    assert kept(policy.plan(view_of(12))) == [[0, 1, 2, 3, 9, 10, 11]]


def test_streaming_llm_after_earlier_evictions_uses_absolute_positions() -> None:
    positions = torch.tensor([[[0, 1, 2, 3, 20, 21, 22, 23, 24]]])
    view = LayerView(layer=0, num_layers=2, positions=positions, seen=25)
    assert kept(kvpolicy.build("streaming_llm", budget=6).plan(view)) == [[0, 1, 2, 3, 7, 8]]


# --------------------------------------------------------------------------- SnapKV


def test_snapkv_pools_window_votes_and_keeps_the_window() -> None:
    # window of 2 queries (positions 6, 7); rows over 8 tokens (row 6 cannot see token 7)
    attention = torch.tensor([[[[0.1, 0.0, 0.5, 0.0, 0.1, 0.1, 0.2, 0.0], [0.2, 0.0, 0.1, 0.0, 0.0, 0.05, 0.25, 0.4]]]])
    # votes of the prefix 0..5: [.3, 0, .6, 0, .1, .15]; avg pool, kernel 3, zero padding counted:
    # 0: .3/3=.1, 1: .9/3=.3, 2: .6/3=.2, 3: .7/3=.233, 4: .25/3=.083, 5: .25/3=.083
    # budget 4 → window {6, 7} + the two best pooled: 1 (.3) and 3 (.233). Token 2 had the
    # largest raw vote but loses to its neighbours: pooling keeps clusters.
    policy = kvpolicy.build(
        "snapkv",
        budget=4,
        extractor={"window_size": 2},
        scorer={"window_size": 2, "kernel_size": 3, "pooling": "avg"},
    )
    scores = policy.scorer.score(policy.extractor.extract(view_of(8, attention=attention)), view_of(8))
    torch.testing.assert_close(scores[0, 0, :6], torch.tensor([0.1, 0.3, 0.2, 0.7 / 3, 0.25 / 3, 0.25 / 3]))
    assert bool((scores[0, 0, 6:] > scores[0, 0, :6].max()).all())
    assert kept(policy.plan(view_of(8, attention=attention))) == [[1, 3, 6, 7]]


def test_snapkv_max_pooling_and_bad_kernel() -> None:
    attention = torch.tensor([[[[0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.1, 0.0]]]])
    # votes of the prefix 0..5: [0, 0, .9, 0, 0, 0]; max pool, kernel 3 → [0, .9, .9, .9, 0, 0];
    # budget 5 → window {6, 7} + 1, 2, 3
    policy = kvpolicy.build(
        "snapkv", budget=5, extractor={"window_size": 1}, scorer={"window_size": 2, "kernel_size": 3, "pooling": "max"}
    )
    assert kept(policy.plan(view_of(8, attention=attention))) == [[1, 2, 3, 6, 7]]
    with pytest.raises(InvalidConfigError, match="odd"):
        kvpolicy.build("snapkv", scorer={"kernel_size": 4})
    with pytest.raises(InvalidConfigError, match="'avg' or 'max'"):
        kvpolicy.build("snapkv", scorer={"pooling": "median"})


# --------------------------------------------------------------------------- TOVA


def test_tova_averages_the_last_query_over_heads() -> None:
    # last query's rows: head 0 [.5, .1, .1, .1, .2], head 1 [.1, .1, .3, .1, .4]
    # mean [.3, .1, .2, .1, .3]; budget 3 → newest (4) protected + 0 (.3) + 2 (.2), same in both heads
    # (head 0 alone would have kept token 0 and a tie; head 1 alone tokens 2 and a tie)
    attention = torch.tensor(
        [[[[0.2, 0.2, 0.2, 0.2, 0.2], [0.5, 0.1, 0.1, 0.1, 0.2]], [[1.0, 0, 0, 0, 0], [0.1, 0.1, 0.3, 0.1, 0.4]]]]
    )
    policy = kvpolicy.build("tova", budget=3)
    assert kept(policy.plan(view_of(5, heads=2, attention=attention))) == [[0, 2, 4], [0, 2, 4]]


def test_tova_averages_by_position_when_heads_hold_different_tokens() -> None:
    # head 0 holds positions 0, 1, 2, 4; head 1 holds 0, 2, 3, 4 (after some per-head eviction)
    # rows: head 0 [.4, .1, .2, .3] head 1 [.1, .5, .2, .2]; by position, summed over heads / 2:
    # 0: (.4 + .1)/2 = .25, 1: .1/2 = .05, 2: (.2 + .5)/2 = .35, 3: .2/2 = .1, 4: (.3 + .2)/2 = .25
    positions = torch.tensor([[[0, 1, 2, 4], [0, 2, 3, 4]]])
    attention = torch.tensor([[[[0.4, 0.1, 0.2, 0.3]], [[0.1, 0.5, 0.2, 0.2]]]])
    view = LayerView(layer=0, num_layers=1, positions=positions, seen=5, attention=attention)
    policy = kvpolicy.build("tova", budget=3)
    scores = policy.scorer.score(policy.extractor.extract(view), view)
    torch.testing.assert_close(scores, torch.tensor([[[0.25, 0.05, 0.35, 0.25], [0.25, 0.35, 0.1, 0.25]]]))
    # budget 3 → newest (position 4) + positions 2 (.35) and 0 (.25) in both heads
    assert kept(policy.plan(view)) == [[0, 2, 3], [0, 1, 3]]


# --------------------------------------------------------------------------- FastGen

SPECIAL, PERIOD = 1, 13


def fastgen_view() -> LayerView:
    ids = torch.tensor([SPECIAL, 50, 51, 52, PERIOD, 53, 54, PERIOD, 55, 56]).expand(1, 3, 10).clone()
    acc = torch.tensor(
        [
            # special-token head: token 0 holds 9 of 10 → "special" recovers .90 ≥ .85
            [9.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2],
            # special .05, +punct (4, 7) .28, +frequent (top 3: 8, 9, 7) {0,4,7,8,9} = 8.8/10 → "+frequent"
            [0.5, 0.2, 0.2, 0.2, 0.3, 0.2, 0.4, 2.0, 3.0, 3.0],
            # +frequent {0,4,7,8,9} = 8.1/10 < .85; +local (newest 4: 6..9) adds 1.5 → .96 → "+local"
            [0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 1.5, 2.5, 2.6, 2.7],
        ]
    ).unsqueeze(0)
    return view_of(10, heads=3, token_ids=ids, accumulated_attention=acc)


def fastgen_policy(**scorer):
    return kvpolicy.build(
        "fastgen",
        extractor={"special_ids": [SPECIAL], "punctuation_ids": [PERIOD]},
        scorer={"recovery": 0.85, "frequent_ratio": 0.3, "local_ratio": 0.4, **scorer},
    )


def test_fastgen_profiles_each_head_and_keeps_its_structure() -> None:
    view = fastgen_view()
    selection = fastgen_policy().plan(view)
    # head 0: special {0} + newest (protected) 9; head 1: {0, 4, 7, 8, 9}; head 2: {0, 4, 6, 7, 8, 9}
    assert kept(selection) == [[0, 9], [0, 4, 7, 8, 9], [0, 4, 6, 7, 8, 9]]
    assert selection.valid is not None and selection.valid.sum(-1).tolist() == [[2, 5, 6]]
    profile = view.state["fastgen.profile"]
    assert profile.shape == (1, 3, 10) and profile[0, :, 0].tolist() == [0, 2, 3]


def test_fastgen_full_when_nothing_cheaper_recovers_enough() -> None:
    # uniform attention, 1 frequent + 1 local token recover 2/4 < .85 → full cache
    view = view_of(4, token_ids=torch.tensor([[[60, 61, 62, 63]]]), accumulated_attention=torch.ones(1, 1, 4))
    policy = kvpolicy.build("fastgen", scorer={"frequent_ratio": 0.25, "local_ratio": 0.25})
    assert kept(policy.plan(view)) == [[0, 1, 2, 3]]
    assert view.state["fastgen.profile"][0, 0, 0].item() == 4


def test_fastgen_keeps_the_profile_through_generation() -> None:
    view = fastgen_view()
    policy = fastgen_policy()
    selection = policy.plan(view)
    # what the cache does on eviction: gather every per-token tensor with the selection
    index = selection.indices
    state = {k: v.gather(2, index) for k, v in view.state.items()}
    positions = view.positions.gather(2, index).masked_fill(~selection.valid, -1)
    # two generated tokens (positions 10, 11), ordinary ids; the special head (0) keeps token 0
    # and the newest only; the other heads keep their structure re-evaluated at 12 tokens seen
    positions = torch.cat([positions, torch.tensor([10, 11]).expand(1, 3, 2)], 2)
    ids = torch.cat([view.token_ids.gather(2, index), torch.tensor([57, 58]).expand(1, 3, 2)], 2)
    acc = torch.cat([view.accumulated_attention.gather(2, index), torch.full((1, 3, 2), 0.05)], 2)
    later = LayerView(0, 8, positions, 12, token_ids=ids, accumulated_attention=acc, state=state)
    selection = policy.plan(later)
    assert later.state["fastgen.profile"][0, :, 0].tolist() == [0, 2, 3]
    assert kept(selection)[0] == [0, 7]  # index 0 = position 0 (special), index 7 = position 11 (newest)
    kept_positions = later.positions.gather(2, selection.indices)
    valid = selection.valid if selection.valid is not None else torch.ones_like(kept_positions, dtype=torch.bool)
    assert bool((kept_positions[valid] >= 0).all()), "a padded slot was selected as a real token"


def test_fastgen_budget_caps_each_head_by_priority() -> None:
    # cap 3 per head: head 2's structure {0, 4, 6, 7, 8, 9} keeps the newest 9 (protected), special 0
    # (tier 4), then one punctuation token (tier 3): 7 (accumulated 2.5) beats 4 (0.1); head 0 keeps its 2
    selection = kvpolicy.build(
        "fastgen",
        budget=3,
        extractor={"special_ids": [SPECIAL], "punctuation_ids": [PERIOD]},
        scorer={"local_ratio": 0.4},
    ).plan(fastgen_view())
    assert kept(selection)[0] == [0, 9]
    assert kept(selection)[2] == [0, 7, 9]


class FakeTokenizer:
    """The three tokenizer members `token_classes` uses, over a tiny vocabulary."""

    vocab = ["<|endoftext|>", "Hello", ".", " ,", "world", "?!", " ", "a.b"]
    all_special_ids = [0]

    def __len__(self) -> int:
        return len(self.vocab)

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return [self.vocab[i[0]] for i in ids]


def test_token_classes_from_a_tokenizer_round_trip_through_json() -> None:
    from kvpolicy_plugins.fastgen import token_classes

    classes = token_classes(FakeTokenizer())
    assert classes == {"special_ids": [0], "punctuation_ids": [2, 3, 5]}
    policy = kvpolicy.build("fastgen", extractor=classes)
    rebuilt = kvpolicy.Policy.from_json(policy.to_json())
    assert rebuilt.extractor.config.punctuation_ids == (2, 3, 5)
    with pytest.raises(InvalidConfigError, match="batch_decode"):
        token_classes(object())


# --------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    ("preset", "missing"),
    [
        ("h2o", "accumulated_attention"),
        ("l2", "keys"),
        ("snapkv", "attention"),
        ("tova", "attention"),
        ("fastgen", "token_ids"),
    ],
)
def test_missing_statistics_name_what_is_missing(preset: str, missing: str) -> None:
    with pytest.raises(ShapeError, match=missing):
        kvpolicy.build(preset).plan(view_of(8, layer=5))


def test_bad_ratios_are_config_errors() -> None:
    with pytest.raises(InvalidConfigError, match="recent_ratio"):
        kvpolicy.build("h2o", selector={"recent_ratio": 1.5})
    with pytest.raises(InvalidConfigError, match="recovery"):
        kvpolicy.build("fastgen", scorer={"recovery": 2})
