"""Config helpers: attrs configs to and from JSON with errors that name the field, and the
validators every component's config uses (``positive``, ``non_negative``, …)."""

from __future__ import annotations

import json
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal, Union

import attrs

from kvpolicy.errors import InvalidConfigError


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of an attrs config (nested configs become dicts, tuples lists)."""
    return json.loads(json.dumps(attrs.asdict(config, recurse=True)))


def config_from_dict(config_cls: type, data: Mapping[str, Any] | None) -> Any:
    """Build ``config_cls`` from a dict, turning unknown keys and bad values into a clear error."""
    data = dict(data or {})
    try:
        attrs.resolve_types(config_cls)  # string annotations (postponed evaluation) → classes
    except NameError:
        pass
    fields = {f.name: f for f in attrs.fields(config_cls)}
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        raise InvalidConfigError(
            f"{config_cls.__name__} has no field(s) {', '.join(unknown)}; "
            f"its fields are: {', '.join(fields) or 'none'}."
        )
    for name, value in list(data.items()):
        nested = fields[name].type
        if isinstance(nested, type) and attrs.has(nested) and isinstance(value, Mapping):  # nested config
            data[name] = config_from_dict(nested, value)
        elif isinstance(value, list):
            data[name] = tuple(value)
    # The class's own validators speak first (their messages are the most specific); a value of
    # the wrong type that they do not catch, or that breaks them, is then named by its field.
    problems = (_wrong_type(config_cls, fields[name], value) for name, value in data.items())
    wrong_type = next((problem for problem in problems if problem), None)
    try:
        config = config_cls(**data)
    except InvalidConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise InvalidConfigError(wrong_type or f"invalid {config_cls.__name__}: {exc}") from exc
    except Exception as exc:
        if wrong_type is None:
            raise
        raise InvalidConfigError(wrong_type) from exc  # a value of the wrong type broke the class's own code
    if wrong_type:
        raise InvalidConfigError(wrong_type)
    return config


def _matches(value: Any, tp: Any) -> bool:
    """Whether JSON-ish ``value`` fits the annotation ``tp``; annotations it cannot judge pass."""
    if tp is Any or tp is object or isinstance(tp, str):
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin is ClassVar:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is tuple or origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args, strict=True)))
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(tp, type) and attrs.has(tp):
        return isinstance(value, tp)
    return True


def _wrong_type(config_cls: type, field: attrs.Attribute, value: Any) -> str | None:
    """Why JSON ``value`` has the wrong type for ``field``, or None: such a value must not reach a
    config (or a component's code, where ``"abc"`` for an int fails later, far from its cause). A
    field with a converter takes other types on purpose (``budget: "25%"``) and is left to it."""
    if field.converter is not None and field.converter is not tuple:
        return None
    if not _matches(value, field.type):
        if isinstance(field.type, type) and attrs.has(field.type):
            inner = ", ".join(f'"{f.name}": ...' for f in attrs.fields(field.type))
            expected = f"a {field.type.__name__} object ({{{inner}}} in JSON)"
        elif typing.get_origin(field.type) is Literal:
            expected = "one of " + ", ".join(repr(a) for a in typing.get_args(field.type))
        else:
            expected = getattr(field.type, "__name__", None) or str(field.type).replace("typing.", "")
        return f"{config_cls.__name__}.{field.name} must be {expected}, got {value!r}"
    return None


def _number(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidConfigError(f"{type(instance).__name__}.{attribute.name} must be a number, got {value!r}")


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    _number(instance, attribute, value)
    if not value > 0:
        raise InvalidConfigError(f"{type(instance).__name__}.{attribute.name} must be > 0, got {value}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    _number(instance, attribute, value)
    if not value >= 0:
        raise InvalidConfigError(f"{type(instance).__name__}.{attribute.name} must be >= 0, got {value}")


def _whole(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidConfigError(f"{type(instance).__name__}.{attribute.name} must be a whole number, got {value!r}")


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _whole(instance, attribute, value)
        _positive(instance, attribute, value)


def _non_negative_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    _whole(instance, attribute, value)
    _non_negative(instance, attribute, value)


positive = _positive
non_negative = _non_negative
positive_int = _positive_int
non_negative_int = _non_negative_int


def layer_indices(value: Any) -> tuple[int, ...]:
    """``skip_layers`` as a tuple of layer indices (whole numbers >= 0), or an `InvalidConfigError`
    (a string is iterable, so ``"abc"`` would otherwise become three "layers")."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise InvalidConfigError(f"skip_layers must be a list of layer indices, got {value!r}")
    layers = tuple(value)
    bad = [v for v in layers if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0]
    if bad:
        raise InvalidConfigError(f"skip_layers must hold layer indices (whole numbers >= 0); got {bad!r}")
    return tuple(int(v) for v in layers)


def _instance_of(cls: type, hint: str) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, cls):
            raise InvalidConfigError(
                f"{type(instance).__name__}.{attribute.name} must be {hint}, got {type(value).__name__} {value!r}"
            )

    return check


@attrs.frozen
class EmptyConfig:
    """Config of a component that has nothing to configure."""
