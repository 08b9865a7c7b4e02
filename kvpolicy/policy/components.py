"""A component object from whatever a user gives: a registry name, a ``(name, config)`` pair, a
`ComponentRef`, a mapping with a ``name``, or an object that already follows the protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvpolicy.errors import InvalidConfigError
from kvpolicy.registry import Registry
from kvpolicy.types import ComponentKind, ComponentRef, span_pooler_ref

ComponentLike = str | ComponentRef | tuple[str, Mapping[str, Any]] | Any


def as_component(kind: ComponentKind, value: ComponentLike, registry: Registry) -> Any:
    """A component object from a name, a ``(name, config)`` pair, a ComponentRef or an object."""
    if isinstance(value, str):
        return registry.create(kind, value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return registry.create(kind, value[0], value[1])
    if isinstance(value, ComponentRef):
        return registry.create(kind, value.name, value.config)
    if isinstance(value, Mapping):
        if "name" not in value:
            raise InvalidConfigError(f"{kind} given as a mapping needs a 'name' key, got {sorted(value)}")
        return registry.create(kind, value["name"], value.get("config"))
    for attr in ("name", "config", "requirements"):
        if not hasattr(value, attr):
            raise InvalidConfigError(f"{kind} object {value!r} lacks `{attr}`; see kvpolicy.types for the protocol")
    return value


def as_pooler(pooler: ComponentLike | None, span: int | Mapping[str, Any] | None, registry: Registry) -> Any:
    """The pooler object from ``pooler`` (any registered pooler) or the ``span`` shorthand, or None."""
    if pooler is not None and span is not None:
        raise InvalidConfigError(
            f"give either pooler ({pooler!r}) or span ({span!r}), not both; span=k is shorthand for "
            "pooler=('span', {'kernel': k})"
        )
    if span is not None:
        ref = span_pooler_ref(span)
        return None if ref is None else as_component("pooler", ref, registry)
    return None if pooler is None else as_component("pooler", pooler, registry)


def expect(name: str, value: Any, cls: type, hint: str) -> None:
    if value is not None and not isinstance(value, cls):
        raise InvalidConfigError(f"{name} must be a {cls.__name__} or None, e.g. {hint}; got {value!r}")
