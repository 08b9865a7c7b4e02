"""Properties of every reference policy on random layer views (hypothesis): the kept set is
exactly the top-scored one under the budget, protected tokens always survive, and the kept
fraction equals the requested ratio to rounding."""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import kvpolicy
from kvpolicy.types import LayerView

TOP_K_PRESETS = ("l2", "snapkv", "tova", "streaming_llm")
FASTGEN_CLASSES = {"special_ids": [0], "punctuation_ids": [1, 2]}


@st.composite
def views(draw) -> LayerView:
    batch = draw(st.integers(1, 2))
    heads = draw(st.integers(1, 3))
    tokens = draw(st.integers(2, 40))
    evicted_before = draw(st.integers(0, 10))  # tokens seen and already dropped
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    queries = draw(st.integers(1, 4))
    seen = tokens + evicted_before
    # ascending absolute positions, the newest always cached (as an evicting cache holds them)
    kept_old = torch.randperm(seen - 1, generator=generator)[: tokens - 1].sort().values
    positions = torch.cat([kept_old, torch.tensor([seen - 1])]).expand(batch, heads, tokens).clone()
    logits = torch.randn(batch, heads, queries, tokens, generator=generator)
    return LayerView(
        layer=draw(st.integers(2, 5)),
        num_layers=6,
        positions=positions,
        seen=seen,
        keys=torch.randn(batch, heads, tokens, 8, generator=generator),
        attention=logits.softmax(-1),
        query_positions=torch.arange(seen - queries, seen),
        accumulated_attention=torch.rand(batch, heads, tokens, generator=generator) * 5,
        token_ids=torch.randint(0, 12, (batch, heads, tokens), generator=generator),
    )


budgets = st.one_of(st.integers(1, 48), st.floats(0.05, 1.0))
protections = st.tuples(st.integers(0, 3), st.integers(0, 4))


def _plan(preset: str, view: LayerView, budget, protect, **overrides):
    sinks, recent = protect
    if isinstance(budget, int):
        assume(budget >= sinks + max(recent, 1))
    policy = kvpolicy.build(preset, budget=budget, sinks=sinks, recent=recent, **overrides)
    features = policy.extractor.extract(view)
    scores = policy.scorer.score(features, view)
    protected = policy.protected_mask(view)
    return policy, scores, protected, policy.plan(view)


def _kept_mask(selection, tokens: int) -> torch.Tensor:
    valid = selection.valid if selection.valid is not None else torch.ones_like(selection.indices, dtype=torch.bool)
    counts = torch.zeros(*selection.indices.shape[:2], tokens, dtype=torch.long)
    return counts.scatter_add(-1, selection.indices, valid.long()) > 0


def _check_top_scored(scores, always, kept, capacity: int) -> None:
    """Every head keeps ``always`` plus the best-scored others, ``max(capacity, |always|)`` in all."""
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            k, a, s = kept[b, h], always[b, h], scores[b, h]
            assert not bool((a & ~k).any()), "a protected token was evicted"
            assert int(k.sum()) == max(capacity, int(a.sum())), "kept count differs from the budget"
            free_kept, evicted = s[k & ~a], s[~k]
            if free_kept.numel() and evicted.numel():
                assert float(free_kept.min()) >= float(evicted.max()), "an evicted token outscored a kept one"


def _capacity(policy, view: LayerView) -> int:
    return min(policy.budget.capacity(view.seen), view.tokens)


@given(view=views(), budget=budgets, protect=protections, preset=st.sampled_from(TOP_K_PRESETS))
def test_top_k_presets_keep_exactly_the_top_scored_tokens(view, budget, protect, preset) -> None:
    policy, scores, protected, selection = _plan(preset, view, budget, protect)
    _check_top_scored(scores, protected, _kept_mask(selection, view.tokens), _capacity(policy, view))
    assert bool((selection.indices.diff(dim=-1) > 0).all()), "kept indices must ascend"


@given(view=views(), budget=budgets, protect=protections, recent_ratio=st.floats(0.0, 1.0))
def test_h2o_keeps_recent_window_plus_top_accumulated(view, budget, protect, recent_ratio) -> None:
    policy, scores, protected, selection = _plan("h2o", view, budget, protect, selector={"recent_ratio": recent_ratio})
    capacity = _capacity(policy, view)
    recent = round(capacity * recent_ratio)
    window = torch.zeros_like(protected)
    if recent:
        window.scatter_(-1, view.positions.topk(recent, dim=-1).indices, True)
    # ranking H2O applies below the protected tokens: the window (newest first), then the score
    ranked = torch.where(window, 1e6 + view.positions.float(), scores)
    _check_top_scored(ranked, protected, _kept_mask(selection, view.tokens), capacity)


@given(view=views(), protect=protections, ratio=st.floats(0.05, 1.0), preset=st.sampled_from((*TOP_K_PRESETS, "h2o")))
def test_kept_fraction_equals_the_requested_ratio(view, protect, ratio, preset) -> None:
    policy, _, protected, selection = _plan(preset, view, ratio, protect)
    wanted = max(1, round(ratio * view.seen))
    assume(ratio * view.seen >= 0.5 and wanted <= view.tokens and int(protected.sum(-1).max()) <= wanted)
    kept = _kept_mask(selection, view.tokens).sum(-1).float()
    assert bool((kept == wanted).all())
    assert bool(((kept / view.seen - ratio).abs() <= 0.5 / view.seen + 1e-6).all())


@given(view=views(), protect=protections, budget=st.one_of(st.just(1.0), st.integers(6, 48)))
def test_fastgen_keeps_structure_members_and_protected_tokens_only(view, protect, budget) -> None:
    policy, scores, protected, selection = _plan("fastgen", view, budget, protect, extractor=FASTGEN_CLASSES)
    kept = _kept_mask(selection, view.tokens)
    members = scores >= 0
    capacity = _capacity(policy, view)
    assert not bool((protected & ~kept).any()), "a protected token was evicted"
    assert not bool((kept & ~members & ~protected).any()), "a token outside the head's structure was kept"
    wanted = (members | protected).sum(-1)
    expected = torch.minimum(wanted, protected.sum(-1).clamp(min=capacity))
    assert torch.equal(kept.sum(-1), expected)
    profile = view.state["fastgen.profile"]
    assert profile.shape == view.positions.shape and bool((profile == profile[..., :1]).all())


@given(view=views(), budget=st.integers(4, 48), min_per_head=st.integers(0, 6))
def test_head_wise_budget_shares_slots_across_a_layers_heads(view, budget, min_per_head) -> None:
    policy, scores, protected, selection = _plan(
        "l2", view, budget, (0, 0), selector={"shared_across_heads": True, "min_per_head": min_per_head}
    )
    kept = _kept_mask(selection, view.tokens)
    capacity = _capacity(policy, view)
    floor = min(max(min_per_head, 1), view.tokens)
    assert bool((kept.sum(-1) >= floor).all())
    assert bool((kept.sum((-2, -1)) == max(capacity * view.kv_heads, floor * view.kv_heads)).all())
    assert not bool((protected & ~kept).any())
