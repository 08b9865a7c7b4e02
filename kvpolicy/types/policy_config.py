"""A policy as data: its `Budget`, `Schedule`, `Protection`, components named by `ComponentRef`,
and the whole `PolicyConfig`, which round-trips through JSON."""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from kvpolicy.errors import InvalidBudgetError, InvalidConfigError
from kvpolicy.types.configs import (
    _instance_of,
    _non_negative_int,
    _positive_int,
    config_from_dict,
    config_to_dict,
    layer_indices,
)


@attrs.frozen
class Budget:
    """How many tokens each layer keeps per KV head: an absolute count, a ratio of the tokens
    seen, or neither (the selector decides, e.g. NAMM's threshold)."""

    tokens: int | None = attrs.field(default=None)
    ratio: float | None = attrs.field(default=None)

    @tokens.validator
    def _check_tokens(self, attribute: attrs.Attribute, value: int | None) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidBudgetError(f"Budget.tokens must be a whole number of tokens, got {value!r}")
        if value <= 0:
            raise InvalidBudgetError(f"Budget.tokens must be > 0, got {value}")

    @ratio.validator
    def _check_ratio(self, attribute: attrs.Attribute, value: float | None) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidBudgetError(f"Budget.ratio must be a number in (0, 1], got {value!r}")
        if not 0.0 < value <= 1.0:
            raise InvalidBudgetError(f"Budget.ratio {value} is out of range: a ratio must be in (0, 1]")
        if self.tokens is not None:
            raise InvalidBudgetError("give a Budget either tokens or ratio, not both")

    @property
    def is_set(self) -> bool:
        return self.tokens is not None or self.ratio is not None

    def capacity(self, seen: int) -> int | None:
        """Tokens to keep per head after ``seen`` tokens have entered the layer (None = no cap)."""
        if self.tokens is not None:
            return min(self.tokens, seen)
        if self.ratio is not None:
            return max(1, min(seen, round(self.ratio * seen)))
        return None

    @classmethod
    def parse(cls, value: Budget | int | float | str | None) -> Budget:
        """``512`` → 512 tokens, ``0.25`` or ``"25%"`` → ratio, ``None`` → no budget."""
        if isinstance(value, Budget):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            text = value.strip()
            number = _read_number(text[:-1] if text.endswith("%") else text)
            if number is None:
                raise InvalidBudgetError(
                    f"cannot read budget {value!r}: use a token count (512), a ratio (0.25) or a percentage (25%)"
                )
            if text.endswith("%"):
                if not 0.0 < number <= 100.0:  # only the parse is guarded: a range error says so
                    raise InvalidBudgetError(f"budget {value!r} is out of range: a percentage must be in (0%, 100%]")
                return cls(ratio=number / 100)
            value = number
        if isinstance(value, bool):
            raise InvalidBudgetError(f"budget must be a number, got {value!r}")
        if isinstance(value, numbers.Integral):
            return cls(tokens=int(value))
        if isinstance(value, numbers.Real):
            value = float(value)
            if value.is_integer() and value > 1:
                return cls(tokens=int(value))
            return cls(ratio=value)
        raise InvalidBudgetError(
            f"cannot read budget {value!r}: use a token count (512), a ratio (0.25) or a percentage (25%)"
        )


def _read_number(text: str) -> int | float | None:
    """``"512"`` → 512, ``"0.25"`` / ``"1e3"`` → float, anything else → None."""
    for read in (int, float):
        try:
            return read(text)
        except ValueError:
            continue
    return None


ScheduleKind = Literal["every_n", "after_prefill", "every_step", "never"]
SCHEDULE_KINDS: tuple[str, ...] = ("every_n", "after_prefill", "every_step", "never")


@attrs.frozen
class Schedule:
    """When a policy runs its eviction pass (extract → score → select → gather), always between
    forward calls.

    ``every_n``: whenever ``every`` new tokens have entered the cache since the last eviction pass
    (NAMM: 512); ``every_step``: after every forward call (greedy, H2O); ``after_prefill``: once,
    after the prompt (SnapKV); ``never``: keep everything (baseline).

    ``slack`` lets a budgeted cache grow that many tokens past its budget before evicting back
    down, so the gather runs once per ``slack`` tokens instead of on every decode step.
    """

    kind: ScheduleKind = attrs.field(default="every_n")
    every: int = attrs.field(default=512, validator=_positive_int)
    slack: int = attrs.field(default=0, validator=_non_negative_int)

    @kind.validator
    def _check_kind(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in SCHEDULE_KINDS:
            raise InvalidConfigError(f"Schedule.kind must be one of {', '.join(SCHEDULE_KINDS)}; got {value!r}")


@attrs.frozen
class Protection:
    """Tokens no selector may evict: the first ``sinks`` positions (attention sinks) and the
    ``recent`` newest positions. The newest token is always protected."""

    sinks: int = attrs.field(default=0, validator=_non_negative_int)
    recent: int = attrs.field(default=0, validator=_non_negative_int)

    @property
    def minimum(self) -> int:
        """Tokens that are always kept once enough have been seen."""
        return self.sinks + max(self.recent, 1)


#: the registered name of the built-in pooler the ``span`` shorthand stands for
SPAN_POOLER = "span"


def span_pooler_ref(value: int | Mapping[str, Any]) -> ComponentRef | None:
    """The ``span=`` shorthand of `kvpolicy.build` as a reference to the built-in ``span`` pooler:
    ``15`` → max over 15 cached neighbours, ``{"kernel": 15, "mode": "avg"}`` → those fields
    (absent ones: kernel 1, mode max). A kernel of 1 pools nothing, so it is no pooler at all.
    Other values are checked by the pooler's own config when the policy is built, so its errors
    name the problem."""
    if isinstance(value, Mapping):
        config = {"kernel": 1, "mode": "max", **value}
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidConfigError(f"span must be an odd kernel size or {{'kernel': k, 'mode': ...}}, got {value!r}")
    else:
        config = {"kernel": int(value), "mode": "max"}
    kernel = config["kernel"]
    if isinstance(kernel, numbers.Integral) and not isinstance(kernel, bool) and kernel == 1:
        unknown = sorted(map(str, set(config) - {"kernel", "mode"}))
        if unknown:
            raise InvalidConfigError(f"span has no field(s) {', '.join(unknown)}; its fields are: kernel, mode")
        if config["mode"] not in ("max", "avg"):
            raise InvalidConfigError(f"span mode must be 'max' or 'avg', got {config['mode']!r}")
        return None
    return ComponentRef(SPAN_POOLER, config)


def _config_mapping(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidConfigError(f"a component's config must be a mapping of its fields, got {value!r}")
    return dict(value)


@attrs.frozen
class ComponentRef:
    """A component named in the registry, with its config as plain JSON data."""

    name: str = attrs.field(validator=_instance_of(str, "a component name"))
    config: Mapping[str, Any] = attrs.field(factory=dict, converter=lambda d: _config_mapping(d))

    def __hash__(self) -> int:  # dicts are unhashable; refs are compared by value
        return hash((self.name, json.dumps(self.config, sort_keys=True, default=str)))


#: fields a policy config given as data must state: each has a default that changes what it does
REQUIRED_FIELDS = ("extractor", "scorer", "selector", "schedule", "protect", "budget")


@attrs.frozen
class PolicyConfig:
    """A whole policy as data: three components, an optional ``pooler`` run between scorer and
    selector (e.g. ``span``: scores pooled over neighbouring cached tokens), when it runs, what it
    protects and its budget.

    ``skip_layers`` lists layers the policy never evicts (e.g. L2-norm leaves the first layers
    uncompressed). Round-trips through JSON (`to_json` / `from_json`). A policy given as data must
    state `REQUIRED_FIELDS` (a missing schedule is an error, not a silent every-512-tokens).
    """

    extractor: ComponentRef = attrs.field(validator=_instance_of(ComponentRef, "a ComponentRef"))
    scorer: ComponentRef = attrs.field(validator=_instance_of(ComponentRef, "a ComponentRef"))
    selector: ComponentRef = attrs.field(validator=_instance_of(ComponentRef, "a ComponentRef"))
    schedule: Schedule = attrs.field(
        default=Schedule(), validator=_instance_of(Schedule, 'a Schedule, in JSON {"kind": "every_step", ...}')
    )
    protect: Protection = attrs.field(
        default=Protection(), validator=_instance_of(Protection, 'a Protection, in JSON {"sinks": 4, "recent": 0}')
    )
    budget: Budget = attrs.field(default=Budget(), converter=lambda b: Budget.parse(b))
    skip_layers: tuple[int, ...] = attrs.field(default=(), converter=layer_indices)
    pooler: ComponentRef | None = attrs.field(
        default=None, validator=attrs.validators.optional(_instance_of(ComponentRef, "a ComponentRef or None"))
    )

    def with_span(self, kernel: int = 31, mode: str = "max") -> PolicyConfig:
        """The same policy with the built-in ``span`` pooler: its scores pooled over ``kernel``
        cached neighbours (how the ``*-span`` presets are made from the faithful ones)."""
        return attrs.evolve(self, pooler=ComponentRef(SPAN_POOLER, {"kernel": kernel, "mode": mode}))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyConfig:
        if not isinstance(data, Mapping):
            raise InvalidConfigError(f"a policy config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        missing = [k for k in REQUIRED_FIELDS if k not in data]
        if missing:
            raise InvalidConfigError(
                f"policy config lacks {', '.join(missing)}: a policy given as data states every field whose default "
                'would change what it does (e.g. "schedule": {"kind": "every_n", "every": 512}, '
                '"protect": {"sinks": 0, "recent": 0}, "budget": null)'
            )
        for key in ("extractor", "scorer", "selector", "pooler"):
            ref = data.get(key)
            if key == "pooler" and ref is None:
                continue
            if not isinstance(ref, str | Mapping):
                raise InvalidConfigError(
                    f'policy config {key} must be a name or {{"name": ..., "config": {{...}}}}'
                    + (" or null" if key == "pooler" else "")
                    + f", got {ref!r}"
                )
            data[key] = ComponentRef(ref) if isinstance(ref, str) else config_from_dict(ComponentRef, ref)
        return config_from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str | bytes) -> PolicyConfig:
        if not isinstance(text, str | bytes | bytearray):
            raise InvalidConfigError(f"policy config JSON must be text, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidConfigError(f"policy config is not valid JSON: {exc}") from exc
        except RecursionError as exc:  # json's own limit on nesting depth
            raise InvalidConfigError("policy config JSON is nested too deeply to be a policy") from exc
        return cls.from_dict(data)
