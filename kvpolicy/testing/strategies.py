"""Hypothesis strategies for kvpolicy's value types, tensors and whole policies.

One module the whole suite (and any plugin's suite) shares, in the spirit of attrs'
``tests/strategies.py``. Tensors are drawn from a seed (a torch generator fills them), so
examples stay small and reproducible; shapes, dtypes, layouts and edge cases (ties, one token,
one head, GQA groups) are drawn by hypothesis itself.

Tensor dimensions are ``batch, kv_heads, tokens, head_dim``; attention rows are
``[batch, kv_heads, queries, tokens]``.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import attrs
import torch
from hypothesis import assume
from hypothesis import strategies as st

from kvpolicy.policy import Policy, build
from kvpolicy.registry import Registry, default_registry
from kvpolicy.types import (
    Budget,
    ComponentKind,
    ComponentRef,
    LayerView,
    Protection,
    Requirements,
    Schedule,
    capabilities,
    config_to_dict,
    non_negative,
    positive,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Everything a component may ask of the forward pass; views drawn with it serve any component.
EVERYTHING = Requirements(keys=True, attention_window=8, accumulated_attention=True, token_ids=True)
VOCAB = 64

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- configs from attrs


def _bounds_from(validator: Any, low: float | None, high: float | None, options: list | None):
    """Read numeric bounds and allowed options out of attrs / kvpolicy validators."""
    if validator is None:
        return low, high, options
    if validator is positive:
        return max(low, 1) if low is not None else 1, high, options
    if validator is non_negative:
        return max(low, 0) if low is not None else 0, high, options
    inner = getattr(validator, "_validators", None)  # attrs.validators.and_
    if inner is not None:
        for v in inner:
            low, high, options = _bounds_from(v, low, high, options)
        return low, high, options
    if hasattr(validator, "validator") and type(validator).__name__ == "_OptionalValidator":
        return _bounds_from(validator.validator, low, high, options)
    if hasattr(validator, "options"):  # attrs.validators.in_
        return low, high, list(validator.options)
    bound, op = getattr(validator, "bound", None), getattr(validator, "compare_op", None)
    if bound is not None and op in (">", ">="):  # gt / ge: value must be above
        return bound if low is None else max(low, bound), high, options
    if bound is not None and op in ("<", "<="):
        return low, bound if high is None else min(high, bound), options
    return low, high, options


def _type_strategy(tp: Any, low: float | None, high: float | None, default: Any) -> st.SearchStrategy:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_strategy(a, low, high, default) for a in args if a is not type(None)]
        return st.one_of(*parts, st.none()) if type(None) in args else st.one_of(*parts)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(_type_strategy(args[0], low, high, None), max_size=4).map(tuple)
        return st.tuples(*(_type_strategy(a, low, high, None) for a in args))
    if tp is bool:
        return st.booleans()
    if tp is int:
        lo = int(low) if low is not None else -8
        hi = int(high) if high is not None else lo + 64
        return st.integers(min_value=lo, max_value=hi)
    if tp is float:
        lo = float(low) if low is not None else -100.0
        hi = float(high) if high is not None else lo + 200.0
        return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False, width=32)
    if tp is str:
        return st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
    if isinstance(tp, type) and attrs.has(tp):
        return configs(tp)
    if default is not attrs.NOTHING:
        return st.just(default)  # a type we cannot draw (a mapping, a callable): keep the default
    raise TypeError(f"cannot draw values of type {tp!r}; pass a strategy for this field in `overrides`")


def field_strategy(field: attrs.Attribute) -> st.SearchStrategy:
    """Values for one attrs field, bounded by its validators, its default drawn often."""
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory() if not default.takes_self else attrs.NOTHING
    low, high, options = _bounds_from(field.validator, None, None, None)
    if options is not None:
        drawn: st.SearchStrategy = st.sampled_from(options)
    else:
        drawn = _type_strategy(field.type, low, high, default)
    return st.one_of(st.just(default), drawn) if default is not attrs.NOTHING else drawn


def configs(config_cls: type, **overrides: st.SearchStrategy) -> st.SearchStrategy:
    """Valid instances of an attrs config class, drawn from its fields' types and validators.

    Values a validator the kit cannot read rejects (e.g. a cross-field check) are filtered out;
    pass a strategy per field name in ``overrides`` to steer a field.
    """
    try:
        attrs.resolve_types(config_cls)
    except NameError:
        pass
    fields = {f.name: overrides.get(f.name) or field_strategy(f) for f in attrs.fields(config_cls) if f.init}

    @st.composite
    def build_config(draw: st.DrawFn) -> Any:
        values = draw(st.fixed_dictionaries(fields))
        try:
            return config_cls(**values)
        except (ValueError, TypeError):
            assume(False)

    return build_config()


def component_configs(kind: ComponentKind, name: str, registry: Registry | None = None) -> st.SearchStrategy:
    """Configs of a registered component."""
    return configs((registry or default_registry()).spec(kind, name).config_cls)


# --------------------------------------------------------------------------- policy-level values


def budgets(min_tokens: int = 1, max_tokens: int = 48, allow_none: bool = False) -> st.SearchStrategy[Budget]:
    """Absolute budgets, ratios and (optionally) no budget."""
    options = [
        st.integers(min_value=min_tokens, max_value=max(min_tokens, max_tokens)).map(lambda t: Budget(tokens=t)),
        st.floats(min_value=0.05, max_value=1.0, exclude_min=False).map(lambda r: Budget(ratio=r)),
    ]
    if allow_none:
        options.append(st.just(Budget()))
    return st.one_of(*options)


def protections(max_sinks: int = 4, max_recent: int = 8) -> st.SearchStrategy[Protection]:
    return st.builds(Protection, sinks=st.integers(min_value=0, max_value=max_sinks), recent=st.integers(0, max_recent))


def schedules(max_every: int = 16, max_slack: int = 8) -> st.SearchStrategy[Schedule]:
    return st.one_of(
        st.builds(Schedule, kind=st.just("every_n"), every=st.integers(1, max_every)),
        st.builds(Schedule, kind=st.just("every_step"), slack=st.integers(0, max_slack)),
        st.builds(Schedule, kind=st.just("after_prefill")),
    )


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


# --------------------------------------------------------------------------- components and policies


def components(kind: ComponentKind, registry: Registry | None = None) -> st.SearchStrategy:
    """Any registered component of ``kind``, built from a drawn config."""
    registry = registry or default_registry()
    names = registry.names(kind)
    if not names:
        return st.nothing()
    return st.sampled_from(names).flatmap(
        lambda name: component_configs(kind, name, registry).map(lambda c: registry.create(kind, name, c))
    )


def pooler_refs(registry: Registry | None = None) -> st.SearchStrategy[ComponentRef]:
    """A registered pooler with a drawn config, as a `ComponentRef` (what a `PolicyConfig` holds)."""
    registry = registry or default_registry()
    names = registry.names("pooler")
    if not names:
        return st.nothing()
    return st.sampled_from(names).flatmap(
        lambda name: component_configs("pooler", name, registry).map(lambda c: ComponentRef(name, config_to_dict(c)))
    )


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


def policy_overrides(policy: Policy, max_budget: int = 32) -> st.SearchStrategy[dict[str, Any]]:
    """Overrides of a policy's protection, budget and schedule scaled to a tiny model's cache."""

    @st.composite
    def draw_overrides(draw: st.DrawFn) -> dict[str, Any]:
        sinks = draw(st.integers(0, 3))
        recent = draw(st.integers(0, 4))
        minimum = sinks + max(recent, 1)
        out: dict[str, Any] = {"sinks": sinks, "recent": recent}
        if capabilities(policy.selector).needs_budget:
            out["budget"] = draw(budgets(min_tokens=minimum, max_tokens=max(minimum, max_budget)))
        kind = policy.schedule.kind
        if kind == "every_n":
            out["schedule"] = Schedule("every_n", every=draw(st.integers(1, 12)))
        elif kind == "every_step":
            out["schedule"] = Schedule("every_step", slack=draw(st.integers(0, 4)))
        # a pooler composes with every scorer: the invariants then hold for the pooled scores
        out["pooler"] = draw(st.one_of(st.none(), pooler_refs(policy.registry)))
        return out

    return draw_overrides()


def policies(
    registry: Registry | None = None, presets: list[str] | None = None, max_budget: int = 32
) -> st.SearchStrategy[Policy]:
    """Registered presets with drawn protection, budget and schedule (every preset by default)."""
    registry = registry or default_registry()
    names = presets if presets is not None else registry.preset_names()

    def with_overrides(name: str) -> st.SearchStrategy[Policy]:
        base = build(name, registry=registry)
        return policy_overrides(base, max_budget).map(lambda o: build(name, registry=registry, **o))

    return st.sampled_from(names).flatmap(with_overrides)


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
