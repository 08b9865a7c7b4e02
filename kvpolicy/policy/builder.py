"""`build`: a policy from a spec (preset name, ``name:{json}``, config, policy file) with overrides.

The one override merge: the spec's own overrides first, then the keywords; a component given as
a dict of fields is merged into the base's config of that component, a name or object replaces
it. A preset registered with ``weights``, or a saved policy file, starts with those learned
parameters and buffers, so ``build(path, budget="50%")`` is how a loaded policy changes its budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from kvpolicy.errors import InvalidConfigError
from kvpolicy.policy.components import ComponentLike
from kvpolicy.policy.policy import Policy
from kvpolicy.registry import Registry, default_registry
from kvpolicy.spec import PolicySpec, read_spec
from kvpolicy.types import Budget, ComponentRef, PolicyConfig, Protection, Schedule
from kvpolicy.types.configs import config_from_dict


def build(
    spec: PolicySpec | None = None,
    *,
    registry: Registry | None = None,
    extractor: ComponentLike | None = None,
    scorer: ComponentLike | None = None,
    selector: ComponentLike | None = None,
    budget: Budget | int | float | str | None = ...,  # type: ignore[assignment]
    schedule: Schedule | None = None,
    every: int | None = None,
    sinks: int | None = None,
    recent: int | None = None,
    skip_layers: tuple[int, ...] | None = None,
    pooler: ComponentLike | None = ...,  # type: ignore[assignment]
    span: int | Mapping[str, Any] | None = ...,  # type: ignore[assignment]
) -> Policy:
    """Build a policy from a spec (`kvpolicy.spec`: a preset name, ``name:{json}``, a
    `PolicyConfig` or its dict, ``{"preset": name, ...}``, a .json or .safetensors file), or from
    components alone, with overrides.

    Overrides replace the base's values: ``build("h2o", budget=256, recent=32)``; the spec's own
    overrides (``'h2o:{"recent": 32}'``) come first, the keywords after. Component overrides given
    as a dict of fields (``scorer={"heavy": 0.5}``) are merged into the base's config of that
    component; a name or object replaces it. ``pooler`` (or its shorthand ``span``) replaces the
    base's pooler, None removes it. A preset registered with ``weights``, or a saved policy file,
    starts with those learned parameters and buffers.
    """
    registry = registry or default_registry()
    given = {
        name: value
        for name, value in (
            ("extractor", extractor), ("scorer", scorer), ("selector", selector), ("budget", budget),
            ("schedule", schedule), ("every", every), ("sinks", sinks), ("recent", recent),
            ("skip_layers", skip_layers), ("pooler", pooler), ("span", span),
        )
        if value is not (... if name in _UNSET_BY_ELLIPSIS else None)
    }  # fmt: skip
    if spec is None:
        if extractor is None or scorer is None or selector is None:
            raise InvalidConfigError("without a preset, build() needs extractor, scorer and selector")
        source = None
    else:
        source = read_spec(spec, registry)
        given = {**_checked_overrides(source.overrides), **given}
    policy = _merged(source.config if source is not None else None, given, registry)
    if source is not None and source.weights is not None:  # a shipped NAMM, or a saved policy file
        policy.load_weights(source.weights)
    return policy


#: `build`'s override keywords, and those whose "not given" is ``...`` (None is a value for them)
OVERRIDES = ("extractor", "scorer", "selector", "budget", "schedule", "every", "sinks", "recent",
             "skip_layers", "pooler", "span")  # fmt: skip
_UNSET_BY_ELLIPSIS = frozenset({"budget", "pooler", "span"})


def _checked_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(map(str, set(overrides) - set(OVERRIDES)))
    if unknown:
        raise InvalidConfigError(f"unknown override(s) {', '.join(unknown)}; accepted: {', '.join(OVERRIDES)}")
    return dict(overrides)


def _merged_pooler(base: PolicyConfig | None, pooler: Any, span: Any) -> ComponentLike | None:
    """The pooler `build` passes on: the base's unless ``pooler`` or ``span`` overrides it (a dict
    of fields without ``name`` is merged into the base's pooler config, like components)."""
    base_pooler = base.pooler if base is not None else None
    if span is not ...:
        return None if pooler is ... else pooler  # Policy refuses pooler and span together
    if pooler is ...:
        return base_pooler
    if isinstance(pooler, Mapping) and "name" not in pooler:
        if base_pooler is None:
            raise InvalidConfigError(
                f"pooler fields {sorted(pooler)} need a pooler to change; the base policy has none: "
                "name one, e.g. pooler=('span', {'kernel': 15})"
            )
        return ComponentRef(base_pooler.name, {**base_pooler.config, **pooler})
    return pooler


def _merged(base: PolicyConfig | None, given: Mapping[str, Any], registry: Registry) -> Policy:
    """The one override merge: ``given`` (override name → value, only those given) applied to ``base``."""

    def merged(role: str) -> ComponentLike:
        override = given.get(role)
        if base is None:
            return override
        ref: ComponentRef = getattr(base, role)
        if override is None:
            return ref
        if isinstance(override, Mapping) and "name" not in override:
            return ComponentRef(ref.name, {**ref.config, **override})
        return override

    protect = base.protect if base is not None else Protection()
    sinks, recent = given.get("sinks"), given.get("recent")
    if sinks is not None or recent is not None:
        protect = attrs.evolve(protect, **{k: v for k, v in (("sinks", sinks), ("recent", recent)) if v is not None})
    schedule = given.get("schedule")
    if isinstance(schedule, Mapping):  # the JSON form: a spec's overrides, a variant's file
        schedule = config_from_dict(Schedule, schedule)
    if given.get("every") is not None:
        schedule = Schedule("every_n", every=given["every"])
    skip_layers = given.get("skip_layers")
    return Policy(
        merged("extractor"),
        merged("scorer"),
        merged("selector"),
        schedule=schedule or (base.schedule if base is not None else None),
        protect=protect,
        budget=given["budget"] if "budget" in given else (base.budget if base is not None else None),
        skip_layers=skip_layers if skip_layers is not None else (base.skip_layers if base is not None else ()),
        pooler=_merged_pooler(base, given.get("pooler", ...), given.get("span", ...)),
        span=given.get("span"),
        registry=registry,
    )
