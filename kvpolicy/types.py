"""Value types and component protocols (tier 0).

Configs are frozen attrs classes with validators, serialisable to JSON. Tensors appear only in
`eq=False` state objects (`LayerView`, `Selection`). Tensor dimensions are always named
``batch, kv_heads, tokens, head_dim`` (and ``queries`` for attention rows).

Four component kinds form the pipeline run on each layer when a policy updates (the pooler is
optional)::

    FeatureExtractor.extract(view)            -> features  [batch, kv_heads, tokens, features]
    Scorer.score(features, view)              -> scores    [batch, kv_heads, tokens]  (higher = keep)
    Pooler.pool(scores, view)                 -> scores    [batch, kv_heads, tokens]  (over neighbours)
    Selector.select(scores, protected, budget, view) -> Selection (indices of kept tokens)

and an Optimizer searches the flat parameter vector of any `Parametric` component.
"""

from __future__ import annotations

import json
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal, Protocol, Union, runtime_checkable

import attrs
import torch

from kvpolicy.errors import InvalidBudgetError, InvalidConfigError, ShapeError

ComponentKind = Literal["extractor", "scorer", "pooler", "selector", "optimizer"]
COMPONENT_KINDS: tuple[ComponentKind, ...] = ("extractor", "scorer", "pooler", "selector", "optimizer")


# --------------------------------------------------------------------------- config helpers


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


# --------------------------------------------------------------------------- requirements


@attrs.frozen
class Requirements:
    """What a component needs the forward pass to compute, so the integration computes no more.

    Attributes
    ----------
    keys:
        The cached keys themselves (`LayerView.keys`).
    attention_window:
        Attention rows (post-softmax, averaged over each GQA group) of up to this many of the
        newest queries since the last update, in `LayerView.attention`. 0 = none.
    accumulated_attention:
        For every cached token, the attention it received summed over all queries so far
        (H2O), in `LayerView.accumulated_attention`.
    token_ids:
        The token id of every cached token (FastGen's special / punctuation classes).
    """

    keys: bool = False
    attention_window: int = attrs.field(default=0, validator=_non_negative)
    accumulated_attention: bool = False
    token_ids: bool = False

    def __or__(self, other: Requirements) -> Requirements:
        return Requirements(
            keys=self.keys or other.keys,
            attention_window=max(self.attention_window, other.attention_window),
            accumulated_attention=self.accumulated_attention or other.accumulated_attention,
            token_ids=self.token_ids or other.token_ids,
        )

    @property
    def needs_attention(self) -> bool:
        return self.attention_window > 0 or self.accumulated_attention


# --------------------------------------------------------------------------- policy-level configs


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
    """When a policy updates (extract → score → select → gather), always between forward calls.

    ``every_n``: whenever ``every`` new tokens have entered the cache since the last update
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
    """The ``span`` shorthand as a reference to the built-in ``span`` pooler: ``15`` → max over 15
    cached neighbours, ``{"kernel": 15, "mode": "avg"}`` → those fields. Absent fields take the
    defaults the ``span`` setting always had (kernel 1, mode max), so policy files written before
    poolers were components mean what they meant — and a kernel of 1, which always meant "off"
    (every such file says ``"span": {"kernel": 1, ...}``), is no pooler at all. Other values are
    checked by the pooler's own config when the policy is built, so its errors name the problem."""
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


@attrs.frozen
class PolicyConfig:
    """A whole policy as data: three components, an optional ``pooler`` run between scorer and
    selector (e.g. ``span``: scores pooled over neighbouring cached tokens), when it runs, what it
    protects and its budget.

    ``skip_layers`` lists layers the policy never evicts (e.g. L2-norm leaves the first layers
    uncompressed). Round-trips through JSON (`to_json` / `from_json`); `from_dict` also reads the
    older ``"span"`` key (a kernel size or ``{"kernel", "mode"}``) as the ``span`` pooler, so
    policy files saved before poolers were components keep loading.
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
        missing = [k for k in ("extractor", "scorer", "selector") if k not in data]
        if missing:
            raise InvalidConfigError(f"policy config lacks {', '.join(missing)}")
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
        if "span" in data:  # the policy-level option poolers replaced: read as the built-in span pooler
            legacy = data.pop("span")
            if data.get("pooler") is not None and legacy is not None:
                raise InvalidConfigError(
                    f'policy config has both "pooler" and the older "span" ({legacy!r}); keep only "pooler"'
                )
            if legacy is not None and (ref := span_pooler_ref(legacy)) is not None:
                data["pooler"] = ref
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


# --------------------------------------------------------------------------- runtime state


#: optional `LayerView` fields: their shape, and the `Requirements` setting that fills them
_VIEW_FIELDS: dict[str, tuple[str, str]] = {
    "keys": ("[batch, kv_heads, tokens, head_dim]", "keys=True"),
    "attention": ("[batch, kv_heads, queries, tokens]", "attention_window > 0"),
    "query_positions": ("[queries]", "attention_window > 0"),
    "accumulated_attention": ("[batch, kv_heads, tokens]", "accumulated_attention=True"),
    "token_ids": ("[batch, kv_heads, tokens]", "token_ids=True"),
}


@attrs.define(eq=False)
class LayerView:
    """What the policy sees of one layer's cache when it updates (built by the integration).

    Attributes
    ----------
    layer, num_layers:
        Index of this layer and the model's layer count.
    positions:
        ``[batch, kv_heads, tokens]`` int64 absolute position of every cached token, ascending.
    seen:
        Tokens that have entered this layer so far (newest absolute position + 1).
    keys:
        ``[batch, kv_heads, tokens, head_dim]`` when a component asked for keys.
    attention:
        ``[batch, kv_heads, queries, tokens]`` float32 attention rows of the newest queries since
        the last update (oldest first), GQA-averaged; tokens that did not exist for a query have 0.
    query_positions:
        ``[queries]`` absolute positions of those queries.
    accumulated_attention:
        ``[batch, kv_heads, tokens]`` attention each token received, summed over all queries.
    token_ids:
        ``[batch, kv_heads, tokens]`` int64 token id of every cached token.
    state:
        Per-token state owned by components, each tensor ``[batch, kv_heads, tokens', ...]`` with
        ``tokens'`` the token count after the previous update (new tokens are appended by the
        component that owns the state; see `extend_tokens`). The integration gathers every
        entry together with the keys on eviction, so nothing stays misaligned.
    """

    layer: int
    num_layers: int
    positions: torch.Tensor
    seen: int
    keys: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    accumulated_attention: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = attrs.field(factory=dict)

    def require(self, *fields: str, by: str) -> None:
        """Raise a `ShapeError` naming every one of ``fields`` that is None: the integration only
        computes what a component's `Requirements` ask for, so a missing field is a component
        that asked for less than it reads (or a hand-built view), never a model problem."""
        missing = [name for name in fields if getattr(self, name) is None]
        if missing:
            wanted = " and ".join(f"view.{name} {_VIEW_FIELDS[name][0]}" for name in missing)
            asks = ", ".join(dict.fromkeys(_VIEW_FIELDS[name][1] for name in missing))
            raise ShapeError(
                f"{by} needs {wanted}; the integration provided none (it computes them when the "
                f"component's Requirements ask: {asks})"
            )

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.positions.shape[1]

    @property
    def tokens(self) -> int:
        return self.positions.shape[2]


def extend_tokens(tensor: torch.Tensor, tokens: int, fill: float = 0.0) -> torch.Tensor:
    """Pad per-token state ``[batch, kv_heads, tokens', ...]`` with ``fill`` up to ``tokens``."""
    missing = tokens - tensor.shape[2]
    if missing < 0:
        raise ShapeError(f"per-token state has {tensor.shape[2]} tokens, more than the cache's {tokens}")
    if missing == 0:
        return tensor
    pad = tensor.new_full((*tensor.shape[:2], missing, *tensor.shape[3:]), fill)
    return torch.cat([tensor, pad], dim=2)


@attrs.define(eq=False)
class Selection:
    """Which tokens a layer keeps: ``indices [batch, kv_heads, kept]`` into the current tokens,
    ascending per head. ``valid`` (same shape, bool) marks padding slots when heads keep different
    counts; padded slots are masked out of attention and count as evicted."""

    indices: torch.Tensor
    valid: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        return self.indices.shape[-1]


@attrs.frozen
class CacheReport:
    """What a policy did to a model's cache, measured (not estimated) by the integration.

    ``kept[layer][head]`` is the number of tokens that head keeps (mean over the batch);
    ``kept_fraction`` is kept ÷ seen averaged over every layer and KV head, evicting or not;
    bytes count keys and values as stored (dtype included) against a full cache of ``seen``
    tokens. ``evicting_layers`` are the layers the policy manages; ``notes`` says why any
    other layer was left alone (e.g. sliding-window layers that trim themselves).
    """

    seen: int
    kept: tuple[tuple[float, ...], ...]
    kv_bytes: int
    full_kv_bytes: int
    policy_seconds: float
    updates: int
    evicting_layers: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def per_layer_fraction(self) -> tuple[float, ...]:
        return tuple(sum(h) / len(h) / self.seen if self.seen and h else 1.0 for h in self.kept)

    @property
    def kept_fraction(self) -> float:
        layers = self.per_layer_fraction
        return sum(layers) / len(layers) if layers else 1.0

    @property
    def bytes_saved(self) -> int:
        return self.full_kv_bytes - self.kv_bytes

    def to_dict(self) -> dict[str, Any]:
        data = config_to_dict(self)
        data.update(
            kept_fraction=self.kept_fraction,
            per_layer_fraction=list(self.per_layer_fraction),
            bytes_saved=self.bytes_saved,
        )
        return data

    def summary(self) -> str:
        mib = 1024 * 1024
        return (
            f"tokens seen {self.seen}; cache kept {self.kept_fraction:.1%} "
            f"({self.kv_bytes / mib:.2f} MiB of {self.full_kv_bytes / mib:.2f} MiB, "
            f"{self.bytes_saved / mib:.2f} MiB saved); {self.updates} updates, "
            f"{self.policy_seconds * 1000:.1f} ms in the policy"
        )


# --------------------------------------------------------------------------- component protocols


@runtime_checkable
class Component(Protocol):
    """What every component has: a name, a frozen config and declared requirements."""

    name: ClassVar[str]
    config: Any

    @property
    def requirements(self) -> Requirements: ...


@runtime_checkable
class FeatureExtractor(Component, Protocol):
    """Turns a layer's cache into per-token features ``[batch, kv_heads, tokens, features]``."""

    def extract(self, view: LayerView) -> torch.Tensor: ...


@runtime_checkable
class Scorer(Component, Protocol):
    """Scores every cached token from its features: ``[batch, kv_heads, tokens]``, higher = keep."""

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor: ...


@runtime_checkable
class Pooler(Component, Protocol):
    """Pools scores over neighbouring cached tokens between scorer and selector, so a policy can
    keep spans (a fact with its context) instead of scattered tokens.

    ``pool(scores, view)`` takes and returns ``[batch, kv_heads, tokens]``. Neighbours are
    neighbours in *cached order* (index along ``tokens``): after an eviction, adjacent cached
    tokens need not be adjacent in absolute position. Padded slots (``view.positions < 0``, heads
    keeping fewer tokens than the layer's longest) arrive as -inf and must stay -inf, neither
    lending nor receiving a score; real slots must not become NaN.
    """

    def pool(self, scores: torch.Tensor, view: LayerView) -> torch.Tensor: ...


@runtime_checkable
class Selector(Component, Protocol):
    """Chooses the tokens to keep from scores, never dropping ``protected`` ones."""

    def select(self, scores: torch.Tensor, protected: torch.Tensor, budget: Budget, view: LayerView) -> Selection: ...


@runtime_checkable
class Optimizer(Protocol):
    """A black-box minimiser mirroring pycma: ``ask`` / ``tell`` / ``stop`` / ``result``.

    Optimizers minimise a *loss*; whoever maximises a fitness negates it once, before `tell`.
    ``state_dict`` / ``load_state_dict`` make runs resumable.
    """

    name: ClassVar[str]
    config: Any

    def ask(self) -> torch.Tensor: ...

    def tell(self, solutions: torch.Tensor, losses: torch.Tensor) -> None: ...

    def stop(self) -> bool: ...

    @property
    def result(self) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Parametric(Protocol):
    """A component with learnable parameters exposed as one flat vector (for optimizers)."""

    @property
    def num_params(self) -> int: ...

    def get_flat(self) -> torch.Tensor: ...

    def set_flat(self, vector: torch.Tensor) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    """A component with frozen, non-learned buffers (e.g. calibrated normalisation statistics)
    that must be saved with it."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


@runtime_checkable
class TokenizerAware(Protocol):
    """A component whose config depends on the tokenizer the model runs with (e.g. FastGen's
    special / punctuation token classes). `Policy.bind_tokenizer` fills it in once; a config
    given explicitly is left alone."""

    def bind_tokenizer(self, tokenizer: Any) -> None: ...


@runtime_checkable
class Calibrated(Protocol):
    """An extractor with normalisation statistics collected while a policy runs and then frozen
    (NAMM's per-bin z-scores); `kvpolicy.calibrate` drives it. The statistics are its buffers."""

    def start_calibration(self) -> None: ...

    def freeze(self) -> None: ...


@runtime_checkable
class DeclaresFeatures(Protocol):
    """An extractor that declares ``num_features``, the width of the features it returns, so a
    policy can check that its scorer takes that width when it is built."""

    @property
    def num_features(self) -> int: ...


@attrs.frozen
class FeatureWidth:
    """The feature widths a scorer takes: at least ``minimum``, and exactly that when ``exact``."""

    minimum: int = attrs.field(validator=_non_negative_int)
    exact: bool = False

    @classmethod
    def exactly(cls, width: int) -> FeatureWidth:
        return cls(width, exact=True)

    @classmethod
    def at_least(cls, width: int) -> FeatureWidth:
        return cls(width)

    def admits(self, width: int) -> bool:
        return width == self.minimum if self.exact else width >= self.minimum

    def __str__(self) -> str:
        return f"{'exactly' if self.exact else 'at least'} {self.minimum}"


@runtime_checkable
class ReadsFeatures(Protocol):
    """A scorer that declares ``input_width``, the feature widths it takes (a `FeatureWidth`)."""

    @property
    def input_width(self) -> FeatureWidth: ...


@attrs.frozen
class Capabilities:
    """What a component may declare about itself, as class attributes of these names.

    A component that declares none of them gets these defaults (what every component was
    assumed to do before it could say otherwise), so a component written without them keeps
    working unchanged. `capabilities` reads them; nothing else does.

    Attributes
    ----------
    needs_budget:
        (selector) It sizes the cache from the policy's `Budget`; ``False``: it decides the size
        itself (NAMM's threshold) and takes no budget.
    keeps_highest_scores:
        (selector) It never evicts a token that scored higher than an unprotected survivor;
        ``False`` for one that also keeps tokens by another rule (H2O's recent window).
    requires_aligned_heads:
        Every KV head of a layer must keep the same tokens.
    """

    needs_budget: bool = True
    keeps_highest_scores: bool = True
    requires_aligned_heads: bool = False


_DEFAULT_CAPABILITIES = Capabilities()


def capabilities(component: Any) -> Capabilities:
    """The `Capabilities` ``component`` declares, the defaults for those it does not."""
    return Capabilities(
        **{
            field.name: bool(getattr(component, field.name, getattr(_DEFAULT_CAPABILITIES, field.name)))
            for field in attrs.fields(Capabilities)
        }
    )


@runtime_checkable
class ModelAdapter(Protocol):
    """What a ``kvpolicy_model_adapter`` hook returns for a model it can drive: `Policy.attach`
    and `Policy.generate` call exactly these two."""

    def attach(self, policy: Any) -> AbstractContextManager[Any]: ...

    def generate(self, policy: Any, inputs: Any, **generate_kwargs: Any) -> Any: ...


PROTOCOLS: dict[ComponentKind, type] = {
    "extractor": FeatureExtractor,
    "scorer": Scorer,
    "pooler": Pooler,
    "selector": Selector,
    "optimizer": Optimizer,
}
