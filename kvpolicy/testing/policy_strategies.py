"""Hypothesis strategies for kvpolicy's configs and whole policies: component configs read from
their attrs fields and validators, budgets, protections, schedules, registered components and
presets with drawn overrides. Part of `kvpolicy.testing.strategies`, which re-exports them."""

from __future__ import annotations

import types
import typing
from typing import Any

import attrs
from hypothesis import assume
from hypothesis import strategies as st

from kvpolicy.policy import Policy, build
from kvpolicy.registry import Registry, default_registry
from kvpolicy.types import (
    Budget,
    ComponentKind,
    ComponentRef,
    Protection,
    Schedule,
    capabilities,
    config_to_dict,
    non_negative,
    positive,
)

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
