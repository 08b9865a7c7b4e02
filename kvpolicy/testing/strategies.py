"""Hypothesis strategies for kvpolicy's tensors and layer views (and, re-exported from
`kvpolicy.testing.policy_strategies`, its configs and whole policies): ``kst`` in the tests.

One module the whole suite (and any plugin's suite) shares, in the spirit of attrs'
``tests/strategies.py``. Tensors are drawn from a seed (a torch generator fills them), so
examples stay small and reproducible; shapes, dtypes, layouts and edge cases (ties, one token,
one head, GQA groups) are drawn by hypothesis itself.

Tensor dimensions are ``batch, kv_heads, tokens, head_dim``; attention rows are
``[batch, kv_heads, queries, tokens]``.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from hypothesis import strategies as st

from kvpolicy.testing.policy_strategies import (
    budgets,
    component_configs,
    components,
    configs,
    field_strategy,
    policies,
    policy_overrides,
    pooler_refs,
    protections,
    schedules,
)
from kvpolicy.types import (
    Budget,
    LayerView,
    Protection,
    Requirements,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Everything a component may ask of the forward pass; views drawn with it serve any component.
EVERYTHING = Requirements(
    keys=True, attention_window=8, accumulated_attention=True, token_ids=True, reconstruction=True
)
VOCAB = 64

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- cache contents


@attrs.frozen
class CacheShape:
    """The layout of one layer's cache: ``groups`` query heads share each KV head (GQA)."""

    batch: int
    kv_heads: int
    groups: int
    tokens: int
    head_dim: int
    seen: int
    fresh: int
    dtype: torch.dtype

    @property
    def query_heads(self) -> int:
        return self.kv_heads * self.groups


def cache_shapes(
    max_batch: int = 3, max_kv_heads: int = 4, max_tokens: int = 40, dtypes: tuple[torch.dtype, ...] = DTYPES
) -> st.SearchStrategy[CacheShape]:
    """Cache layouts: ``tokens`` cached of ``seen`` entered, the newest ``fresh`` contiguous
    (written since the last eviction), GQA groups, several dtypes."""

    @st.composite
    def draw_shape(draw: st.DrawFn) -> CacheShape:
        tokens = draw(st.integers(min_value=1, max_value=max_tokens))
        fresh = draw(st.integers(min_value=1, max_value=tokens))
        evicted = draw(st.integers(min_value=0, max_value=3 * max_tokens))
        return CacheShape(
            batch=draw(st.integers(1, max_batch)),
            kv_heads=draw(st.integers(1, max_kv_heads)),
            groups=draw(st.sampled_from((1, 2, 3))),
            tokens=tokens,
            head_dim=draw(st.sampled_from((4, 8, 16))),
            seen=tokens + (evicted if tokens > fresh else 0),
            fresh=fresh,
            dtype=draw(st.sampled_from(dtypes)),
        )

    return draw_shape()


def positions_for(shape: CacheShape, seed: int, aligned: bool) -> torch.Tensor:
    """``[batch, kv_heads, tokens]`` ascending absolute positions: the ``fresh`` newest are
    contiguous up to ``seen - 1``; older ones are a random subset of what came before, per head
    unless ``aligned``."""
    generator = _generator(seed)
    newest = torch.arange(shape.seen - shape.fresh, shape.seen)
    older = shape.tokens - shape.fresh
    rows = []
    for _ in range(1 if aligned else shape.batch * shape.kv_heads):
        kept = torch.randperm(shape.seen - shape.fresh, generator=generator)[:older].sort().values
        rows.append(torch.cat([kept, newest]))
    stacked = torch.stack(rows)
    if aligned:
        stacked = stacked.expand(shape.batch * shape.kv_heads, -1)
    return stacked.reshape(shape.batch, shape.kv_heads, shape.tokens).contiguous()


def attention_rows(positions: torch.Tensor, query_positions: torch.Tensor, seed: int, sharpness: float = 1.0):
    """``[batch, kv_heads, queries, tokens]`` softmax rows: each sums to 1 over the tokens at or
    before its query's position (causal); later tokens get exactly 0."""
    batch, kv_heads, tokens = positions.shape
    logits = torch.randn(batch, kv_heads, len(query_positions), tokens, generator=_generator(seed)) * sharpness
    future = positions.unsqueeze(2) > query_positions.view(1, 1, -1, 1)
    rows = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.nan_to_num(rows, nan=0.0)  # a query with no visible token: an all-zero row


def scores_for(shape: tuple[int, ...], seed: int, kind: str) -> torch.Tensor:
    """Score tensors: ``normal``; ``ties`` (few distinct values); ``constant``; ``wide`` range;
    ``infinite`` (some ±inf, as scorers that pin tokens produce)."""
    generator = _generator(seed)
    if kind == "ties":
        return torch.randint(-2, 3, shape, generator=generator).float()
    if kind == "constant":
        return torch.zeros(shape)
    if kind == "wide":
        return torch.randn(shape, generator=generator) * 1e4
    scores = torch.randn(shape, generator=generator)
    if kind == "infinite":  # scorers may pin tokens with ±inf (SnapKV's observation window)
        pick = torch.rand(shape, generator=generator)
        scores = scores.masked_fill(pick < 0.3, float("inf")).masked_fill(pick > 0.85, float("-inf"))
    return scores


def score_tensors(shape: tuple[int, ...]) -> st.SearchStrategy[torch.Tensor]:
    """Float32 scores of ``shape``: ties, constants, a wide range and ±inf among them (never NaN)."""
    kinds = st.sampled_from(("normal", "ties", "constant", "wide", "infinite"))
    return st.builds(scores_for, st.just(shape), seeds, kinds)


@attrs.define(eq=False)
class CacheContents:
    """Keys, values and absolute positions of one layer's cache."""

    shape: CacheShape
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


def cache_contents(**shape_kwargs: Any) -> st.SearchStrategy[CacheContents]:
    """Keys and values ``[batch, kv_heads, tokens, head_dim]`` in a drawn dtype, with positions."""

    @st.composite
    def draw_contents(draw: st.DrawFn) -> CacheContents:
        shape = draw(cache_shapes(**shape_kwargs))
        seed = draw(seeds)
        generator = _generator(seed)
        dims = (shape.batch, shape.kv_heads, shape.tokens, shape.head_dim)
        keys = torch.randn(dims, generator=generator).to(shape.dtype)
        values = torch.randn(dims, generator=generator).to(shape.dtype)
        return CacheContents(shape, keys, values, positions_for(shape, seed, draw(st.booleans())))

    return draw_contents()


def make_view(
    shape: CacheShape,
    seed: int,
    requirements: Requirements = EVERYTHING,
    *,
    aligned: bool = False,
    layer: int = 0,
    num_layers: int = 4,
    sharpness: float = 1.0,
) -> LayerView:
    """A `LayerView` of ``shape`` carrying what ``requirements`` asks for, built from ``seed``."""
    generator = _generator(seed)
    dims = (shape.batch, shape.kv_heads, shape.tokens, shape.head_dim)
    positions = positions_for(shape, seed, aligned)
    view = LayerView(layer=layer, num_layers=num_layers, positions=positions, seen=shape.seen)
    if requirements.keys:
        view.keys = torch.randn(dims, generator=generator).to(shape.dtype)
    if requirements.attention_window:
        queries = min(requirements.attention_window, shape.fresh)
        view.query_positions = torch.arange(shape.seen - queries, shape.seen)
        view.attention = attention_rows(positions, view.query_positions, seed, sharpness)
    if requirements.accumulated_attention:
        view.accumulated_attention = attention_rows(positions, torch.arange(shape.seen), seed + 1).sum(dim=2)
    if requirements.token_ids:
        ids = torch.randint(0, VOCAB, (shape.batch, 1, shape.tokens), generator=_generator(seed + 2))
        view.token_ids = ids.expand(-1, shape.kv_heads, -1).contiguous()
    if requirements.reconstruction:  # a max of attention probabilities, padded slots 0
        rows = attention_rows(positions, torch.arange(shape.seen), seed + 3, sharpness)
        view.reconstruction_attention = rows.amax(dim=2)
    return view


def layer_views(
    requirements: Requirements = EVERYTHING, num_layers: int = 4, aligned: bool | None = None, **shape_kwargs: Any
):
    """`LayerView`s carrying what ``requirements`` asks for (all of it by default), as the
    integration builds them between forward calls. ``aligned=True`` gives every KV head the same
    positions (a policy whose heads evict together); None draws both layouts."""

    @st.composite
    def draw_view(draw: st.DrawFn) -> LayerView:
        return make_view(
            draw(cache_shapes(**shape_kwargs)),
            draw(seeds),
            requirements,
            aligned=draw(st.booleans()) if aligned is None else aligned,
            layer=draw(st.integers(0, num_layers - 1)),
            num_layers=num_layers,
            sharpness=draw(st.sampled_from((0.1, 1.0, 8.0))),
        )

    return draw_view()


def protected_for(view: LayerView, protect: Protection) -> torch.Tensor:
    """The mask `Policy.protected_mask` computes for ``protect``."""
    newest = view.seen - 1
    protected = view.positions >= newest - max(protect.recent, 1) + 1
    if protect.sinks:
        protected |= view.positions < protect.sinks
    return protected


@attrs.define(eq=False)
class SelectorInputs:
    """One call of `Selector.select`: scores, protected mask, budget and the view."""

    scores: torch.Tensor
    protected: torch.Tensor
    budget: Budget
    view: LayerView
    protect: Protection


def selector_inputs(needs_budget: bool = True, **shape_kwargs: Any) -> st.SearchStrategy[SelectorInputs]:
    """Arguments for `Selector.select`; budgets are at least the protected count, as `Policy`
    guarantees for absolute budgets."""

    @st.composite
    def draw_inputs(draw: st.DrawFn) -> SelectorInputs:
        view = draw(layer_views(Requirements(), **shape_kwargs))
        protect = draw(protections())
        scores = draw(score_tensors((view.batch, view.kv_heads, view.tokens)))
        budget = (
            draw(budgets(min_tokens=protect.minimum, max_tokens=protect.minimum + 48)) if needs_budget else Budget()
        )
        return SelectorInputs(scores, protected_for(view, protect), budget, view, protect)

    return draw_inputs()


@attrs.define(eq=False)
class PoolerInputs:
    """One call of `Pooler.pool`: scores as `Policy` passes them (padded slots at -inf) and the view."""

    scores: torch.Tensor
    view: LayerView

    @property
    def padded(self) -> torch.Tensor:
        return self.view.positions < 0


def pooler_inputs(
    requirements: Requirements | None = None, padded: bool | None = None, **view_kwargs: Any
) -> st.SearchStrategy[PoolerInputs]:
    """Arguments for `Pooler.pool`: a view carrying ``requirements``, scores with ties, constants
    and ±inf among them, and padded slots (always with ``padded=True``, never with False, in some
    examples with None): heads keeping fewer tokens than the layer's longest hold their tokens
    first and padding last, at position -1 with score -inf, as the integration lays them out."""

    @st.composite
    def draw_inputs(draw: st.DrawFn) -> PoolerInputs:
        view = draw(layer_views(requirements or Requirements(), **view_kwargs))
        scores = draw(score_tensors((view.batch, view.kv_heads, view.tokens)))
        if padded or (padded is None and draw(st.booleans())):
            generator = _generator(draw(seeds))
            low = 1 if padded and view.tokens > 1 else 0  # at least one padded slot per head when asked
            pads = torch.randint(low, max(view.tokens, low + 1), (view.batch, view.kv_heads, 1), generator=generator)
            mask = torch.arange(view.tokens) >= view.tokens - pads  # the last `pads` slots of each head
            view.positions = view.positions.masked_fill(mask, -1)
            scores = scores.masked_fill(mask, float("-inf"))
        return PoolerInputs(scores, view)

    return draw_inputs()


__all__ = [
    "DTYPES",
    "EVERYTHING",
    "CacheContents",
    "CacheShape",
    "PoolerInputs",
    "SelectorInputs",
    "attention_rows",
    "budgets",
    "cache_contents",
    "cache_shapes",
    "component_configs",
    "components",
    "configs",
    "field_strategy",
    "layer_views",
    "make_view",
    "policies",
    "policy_overrides",
    "pooler_inputs",
    "pooler_refs",
    "positions_for",
    "protected_for",
    "protections",
    "schedules",
    "score_tensors",
    "scores_for",
    "seeds",
    "selector_inputs",
]
