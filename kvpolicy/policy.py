"""`Policy`: extractor → scorer → (pooler) → selector, plus when it runs, what it protects and its budget.

A policy is built from component objects or from registry names with configs, serialises to
JSON (`Policy.config`), and is attached to a model through the model-adapter hook, so this
module never imports transformers (the HF integration is itself a plugin).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import attrs
import torch

from kvpolicy.checkpoint import ModelRecord, PolicyFile, open_policy_file, write_policy_file
from kvpolicy.errors import (
    CheckpointError,
    FeatureWidthError,
    InvalidBudgetError,
    InvalidConfigError,
    InvalidScoresError,
    InvalidSelectionError,
    KVPolicyError,
    ShapeError,
)
from kvpolicy.registry import Registry, default_registry
from kvpolicy.selection import padding_mask
from kvpolicy.spec import PolicySpec, read_spec
from kvpolicy.types import (
    Budget,
    ComponentKind,
    ComponentRef,
    DeclaresFeatures,
    LayerView,
    Parametric,
    PolicyConfig,
    Protection,
    ReadsFeatures,
    Requirements,
    Schedule,
    Selection,
    Stateful,
    TokenizerAware,
    capabilities,
    config_to_dict,
    layer_indices,
    span_pooler_ref,
)

ComponentLike = str | ComponentRef | tuple[str, Mapping[str, Any]] | Any


def _as_component(kind: ComponentKind, value: ComponentLike, registry: Registry) -> Any:
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


class Policy:
    """A KV-cache eviction policy assembled from three components and an optional pooler.

    Parameters
    ----------
    extractor, scorer, selector:
        Registry names (``"stft"``), ``(name, config_dict)`` pairs, `ComponentRef`s or objects.
    pooler:
        Run between scorer and selector (a `kvpolicy.types.Pooler`), given like a component:
        ``"span"``, ``("span", {"kernel": 15, "mode": "avg"})``, a `ComponentRef` or an object.
    schedule, every:
        When the policy runs its eviction pass; ``every=n`` is shorthand for ``Schedule("every_n", every=n)``.
    protect, sinks, recent:
        Tokens never evicted; ``sinks`` / ``recent`` are shorthand for a `Protection`.
    budget:
        Tokens kept per layer and KV head: ``512``, ``0.25``, ``"25%"``, a `Budget`, or None.
    skip_layers:
        Layers never evicted.
    span:
        Shorthand for the built-in ``span`` pooler: ``15`` (max over 15 neighbouring cached
        tokens) or ``{"kernel": 15, "mode": "avg"}``. Give ``pooler`` or ``span``, not both.
    """

    def __init__(
        self,
        extractor: ComponentLike,
        scorer: ComponentLike,
        selector: ComponentLike,
        *,
        schedule: Schedule | None = None,
        every: int | None = None,
        protect: Protection | None = None,
        sinks: int | None = None,
        recent: int | None = None,
        budget: Budget | int | float | str | None = None,
        skip_layers: tuple[int, ...] | list[int] = (),
        pooler: ComponentLike | None = None,
        span: int | Mapping[str, Any] | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.registry = registry or default_registry()
        self.extractor = _as_component("extractor", extractor, self.registry)
        self.scorer = _as_component("scorer", scorer, self.registry)
        self.selector = _as_component("selector", selector, self.registry)
        self.pooler = _as_pooler(pooler, span, self.registry)
        if schedule is not None and every is not None:
            raise InvalidConfigError("give either schedule or every, not both")
        _expect("schedule", schedule, Schedule, 'Schedule("every_step"), or every=n for Schedule("every_n", every=n)')
        _expect("protect", protect, Protection, "Protection(sinks=4, recent=0), or sinks= / recent=")
        self.schedule = schedule or (Schedule("every_n", every=every) if every is not None else Schedule())
        protect = protect or Protection()
        self.protect = attrs.evolve(
            protect,
            **{k: v for k, v in (("sinks", sinks), ("recent", recent)) if v is not None},
        )
        self.budget = Budget.parse(budget)
        self.skip_layers = layer_indices(skip_layers)
        self._check_feature_width()
        self._check_budget()
        #: the model this policy's weights were made for (from its policy file), or None
        self.made_for: ModelRecord | None = None
        #: attach to a model other than `made_for` as a zero-shot transfer, chosen: no warning
        #: (the attachment's report still records the transfer)
        self.transfer = False

    # ----------------------------------------------------------------- construction & JSON

    def _check_feature_width(self) -> None:
        """The extractor's declared feature width must be one the scorer declares it takes."""
        if not isinstance(self.extractor, DeclaresFeatures) or not isinstance(self.scorer, ReadsFeatures):
            return
        width, takes = self.extractor.num_features, self.scorer.input_width
        if not takes.admits(width):
            raise FeatureWidthError(
                f"extractor {self.extractor.name!r} gives {width} features per token, but scorer "
                f"{self.scorer.name!r} takes {takes}; configure the scorer for {width} features (e.g. "
                f"its `features` field) or use an extractor whose width it takes"
            )

    @property
    def needs_budget(self) -> bool:
        """Whether the policy evicts by a budget: its selector sizes the cache from one
        (`kvpolicy.types.Capabilities.needs_budget`) and its schedule ever runs."""
        return capabilities(self.selector).needs_budget and self.schedule.kind != "never"

    def _check_budget(self) -> None:
        wants_budget = capabilities(self.selector).needs_budget
        if self.needs_budget and not self.budget.is_set:
            raise InvalidBudgetError(
                f"selector {self.selector.name!r} needs a budget (e.g. budget=512 or budget=0.25); "
                "threshold-style selectors are the ones that work without one"
            )
        if not wants_budget and self.budget.is_set:
            raise InvalidBudgetError(
                f"selector {self.selector.name!r} decides the cache size itself and takes no budget; "
                f"got {self.budget}. Use a top_k selector for a fixed budget."
            )
        if self.budget.tokens is not None and self.budget.tokens < self.protect.minimum:
            raise InvalidBudgetError(
                f"budget of {self.budget.tokens} tokens is smaller than the {self.protect.minimum} tokens "
                f"the policy must protect ({self.protect.sinks} sinks + {max(self.protect.recent, 1)} recent)"
            )

    def override(
        self,
        *,
        budget: Budget | int | float | str | None = ...,  # type: ignore[assignment]
        sinks: int | None = None,
        recent: int | None = None,
    ) -> Policy:
        """Change budget / protection in place, keeping learned parameters and calibrated buffers
        (e.g. of a loaded NAMM), and validate the result as a new policy would be."""
        before = (self.budget, self.protect)
        if budget is not ...:
            self.budget = Budget.parse(budget)
        changes = {k: v for k, v in (("sinks", sinks), ("recent", recent)) if v is not None}
        if changes:
            self.protect = attrs.evolve(self.protect, **changes)
        try:
            self._check_budget()
        except InvalidBudgetError:
            self.budget, self.protect = before  # a refused override leaves the policy as it was
            raise
        return self

    @property
    def config(self) -> PolicyConfig:
        """This policy as data; `Policy.from_config` rebuilds it by name."""
        return PolicyConfig(
            extractor=ComponentRef(self.extractor.name, config_to_dict(self.extractor.config)),
            scorer=ComponentRef(self.scorer.name, config_to_dict(self.scorer.config)),
            selector=ComponentRef(self.selector.name, config_to_dict(self.selector.config)),
            schedule=self.schedule,
            protect=self.protect,
            budget=self.budget,
            skip_layers=self.skip_layers,
            pooler=None if self.pooler is None else ComponentRef(self.pooler.name, config_to_dict(self.pooler.config)),
        )

    def to_json(self, **kwargs: Any) -> str:
        return self.config.to_json(**kwargs)

    @classmethod
    def from_config(cls, config: PolicyConfig, registry: Registry | None = None) -> Policy:
        return cls(
            config.extractor,
            config.scorer,
            config.selector,
            schedule=config.schedule,
            protect=config.protect,
            budget=config.budget,
            skip_layers=config.skip_layers,
            pooler=config.pooler,
            registry=registry,
        )

    @classmethod
    def from_json(cls, text: str, registry: Registry | None = None) -> Policy:
        return cls.from_config(PolicyConfig.from_json(text), registry)

    def __repr__(self) -> str:
        return (
            f"Policy({self.extractor.name} → {self.scorer.name} → {self.selector.name}, "
            f"schedule={self.schedule.kind}"
            + (f"/{self.schedule.every}" if self.schedule.kind == "every_n" else "")
            + f", budget={self.budget.tokens or self.budget.ratio}, sinks={self.protect.sinks}, "
            f"recent={self.protect.recent}"
            + (f", {self.pooler.name}={self.pooler.config}" if self.pooler is not None else "")
            + ")"
        )

    # ----------------------------------------------------------------- what the forward pass must compute

    @property
    def requirements(self) -> Requirements:
        """The union of what the components declared."""
        if self.schedule.kind == "never":
            return Requirements()
        needs = Requirements()
        for component in self.components().values():
            needs = needs | component.requirements
        return needs

    def components(self) -> dict[str, Any]:
        """The pipeline's components by role (``pooler`` only when there is one), in order."""
        parts = {"extractor": self.extractor, "scorer": self.scorer}
        if self.pooler is not None:
            parts["pooler"] = self.pooler
        parts["selector"] = self.selector
        return parts

    # ----------------------------------------------------------------- runtime

    def is_due(self, *, new_tokens: int, cached: int, seen: int, prefill_done: bool, updates: int) -> bool:
        """Whether a layer is due for its eviction pass now (called between forward calls).

        ``new_tokens`` entered since the last eviction pass, ``cached`` are in the layer now, ``seen``
        entered in all, ``prefill_done`` is true once the prompt has been consumed, ``updates``
        counts this layer's earlier eviction passes.
        """
        kind = self.schedule.kind
        if kind == "never" or new_tokens <= 0:
            return False
        if kind == "after_prefill":
            return prefill_done and updates == 0
        if kind == "every_n":
            return new_tokens >= self.schedule.every
        capacity = self.budget.capacity(seen)
        return capacity is None or cached > capacity + self.schedule.slack

    def will_run_again(self, *, updates: int) -> bool:
        """Whether a layer that has had ``updates`` eviction passes can still be due for another
        (`is_due`): false for ``never`` and, after its one pass, for ``after_prefill``. Once false,
        the forward pass need not record that layer's statistics any more."""
        kind = self.schedule.kind
        if kind == "never":
            return False
        if kind == "after_prefill":
            return updates == 0
        return True

    def protected_mask(self, view: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, tokens]`` bool: sinks, the recent window and the newest token."""
        positions = view.positions
        newest = view.seen - 1
        protected = positions >= newest - max(self.protect.recent, 1) + 1
        if self.protect.sinks:
            protected |= (positions < self.protect.sinks) & (positions >= 0)  # padded slots sit at -1
        return protected

    def plan(self, view: LayerView) -> Selection | None:
        """Run extract → score → select on one layer; None means keep everything."""
        if view.layer in self.skip_layers or self.schedule.kind == "never":
            return None
        return self.choose(view, self.extract(view))

    def extract(self, view: LayerView) -> torch.Tensor:
        """The extractor's features ``[batch, kv_heads, tokens, features]`` for one layer, shape-checked."""
        features = self.extractor.extract(view)
        _check_leading(features, view, f"extractor {self.extractor.name!r} features", extra_dims=1)
        return features

    def choose(self, view: LayerView, features: torch.Tensor) -> Selection:
        """Score → pool (when the policy has a pooler) → select, from features already extracted.

        Split from `plan` so that features computed once can be scored by many parameter rows
        (members forked from one shared prefill: `kvpolicy.integrations.hf.shared_prefill`).
        """
        scores = self.scorer.score(features, view)
        _check_leading(scores, view, f"scorer {self.scorer.name!r} scores", extra_dims=0)
        # Padded slots (heads of a layer keeping different counts) sit at position -1: rank them
        # below every real token so they never take a real token's place.
        padded = padding_mask(view.positions)
        _check_no_nan(scores, padded, view, f"scorer {self.scorer.name!r}")
        if padded is not None:
            scores = scores.float().masked_fill(padded, float("-inf"))
        if self.pooler is not None:
            scores = self._pool(scores, view, padded)
        protected = self.protected_mask(view)
        selection = self.selector.select(scores, protected, self.budget, view)
        indices = getattr(selection, "indices", None)
        if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or indices.shape[:2] != scores.shape[:2]:
            shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ShapeError(
                f"selector {self.selector.name!r} returned indices {shape}; "
                f"expected [batch={view.batch}, kv_heads={view.kv_heads}, kept]"
            )
        _check_selection(selection, protected, padded, view, self.selector.name)
        return selection

    def _pool(self, scores: torch.Tensor, view: LayerView, padded: torch.Tensor | None) -> torch.Tensor:
        """The pooler's scores, checked like a scorer's: same shape, floats, no NaN on a cached
        token; padded slots are set back to -inf so no pooler can let padding displace a token."""
        where = f"pooler {self.pooler.name!r}"
        pooled = self.pooler.pool(scores, view)
        _check_leading(pooled, view, f"{where} scores", extra_dims=0)
        if not pooled.is_floating_point():
            raise InvalidScoresError(
                f"{where} returned {pooled.dtype} scores on layer {view.layer}; they must be floats"
            )
        if padded is not None:
            pooled = pooled.masked_fill(padded, float("-inf"))
        # padded slots are -inf now, so a NaN anywhere is on a cached token; the max propagates
        # NaN, one reduction instead of a mask (this runs on every update)
        if pooled.numel() and bool(torch.isnan(pooled.amax())):
            _check_no_nan(pooled, padded, view, where)
        return pooled

    # ----------------------------------------------------------------- learnable parameters

    def parametric(self) -> dict[str, Parametric]:
        """Components with learnable parameters, by role."""
        return {role: c for role, c in self.components().items() if isinstance(c, Parametric)}

    @property
    def num_params(self) -> int:
        return sum(c.num_params for c in self.parametric().values())

    def get_flat(self) -> torch.Tensor:
        """``[num_params]``, or ``[members, num_params]`` while a population is loaded."""
        parts = [c.get_flat().detach().float() for c in self.parametric().values()]
        if not parts:
            return torch.zeros(0)
        if any(p.dim() == 2 for p in parts):
            members = max(p.shape[0] for p in parts if p.dim() == 2)
            parts = [p.expand(members, -1) if p.dim() == 1 else p for p in parts]
        return torch.cat(parts, dim=-1)

    def set_flat(self, vector: torch.Tensor) -> None:
        """Set all learnable parameters from ``[num_params]``, or from ``[batch, num_params]`` to
        give each batch row its own parameters (a population evaluated as one batch)."""
        vector = torch.as_tensor(vector, dtype=torch.float32)
        if vector.dim() not in (1, 2) or vector.shape[-1] != self.num_params:
            raise ShapeError(
                f"policy has {self.num_params} parameters; expected a vector [{self.num_params}] or "
                f"a population [members, {self.num_params}], got {tuple(vector.shape)}"
            )
        offset = 0
        for component in self.parametric().values():
            component.set_flat(vector[..., offset : offset + component.num_params])
            offset += component.num_params

    @contextlib.contextmanager
    def population_rows(self, rows: list[int]) -> Iterator[None]:
        """While a population is loaded, plan for batch ``rows`` only: their parameter rows stand
        in for the population (rows of a padded batch reach their eviction passes at different
        calls, and each group is planned alone). A no-op for a single parameter set."""
        flat = self.get_flat() if self.num_params else None
        if flat is None or flat.dim() == 1:
            yield
            return
        self.set_flat(flat[rows])
        try:
            yield
        finally:
            self.set_flat(flat)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Frozen, saved state of `Stateful` components, keyed ``role.name``."""
        out: dict[str, torch.Tensor] = {}
        for role, component in self.components().items():
            if isinstance(component, Stateful):
                out.update({f"{role}.{k}": v for k, v in component.state_dict().items()})
        return out

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Let tokenizer-dependent components (`TokenizerAware`) fill in their configs."""
        for component in self.components().values():
            if isinstance(component, TokenizerAware):
                component.bind_tokenizer(tokenizer)

    # ----------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike[str], *, made_for: ModelRecord | None = None) -> None:
        """Write config, parameters and buffers to one signed safetensors file, atomically, with
        the model they were made for (``made_for``, else `made_for` as loaded)."""
        params = self.get_flat()
        if params.dim() != 1:
            raise CheckpointError(
                f"the policy holds a population of {params.shape[0]} parameter sets; save one member: "
                "policy.set_flat(population[i]) first"
            )
        write_policy_file(path, self.to_json(), params, self.buffers(), made_for or self.made_for)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        registry: Registry | None = None,
        *,
        allow_unsigned: bool = False,
        transfer: bool = False,
    ) -> Policy:
        """The policy saved at ``path`` (`save`), with its parameters and buffers. A file without
        a checksum loads only with ``allow_unsigned``; ``transfer`` chooses zero-shot transfer
        (`transfer`)."""
        saved = open_policy_file(path, allow_unsigned=allow_unsigned)
        try:
            policy = cls.from_config(saved.config, registry)
        except CheckpointError:
            raise
        except KVPolicyError as exc:
            raise CheckpointError(f"{path} holds a policy that cannot be rebuilt here: {exc}") from exc
        policy.load_weights(saved)
        policy.transfer = transfer
        return policy

    def load_weights(self, saved: PolicyFile | str | os.PathLike[str]) -> None:
        """Take the parameters and buffers of a policy file (or its path), keeping this policy's
        own config (budget, pooler, …): how a preset starts with its shipped weights."""
        if not isinstance(saved, PolicyFile):
            saved = open_policy_file(saved)
        if saved.params.numel() != self.num_params:
            raise CheckpointError(
                f"{saved.source} holds {saved.params.numel()} parameters but its policy "
                f"({self.scorer.name} scorer) has {self.num_params}; the file does not match its config"
            )
        if self.num_params:
            self.set_flat(saved.params)
        self.load_buffers(saved.buffers, saved.source)
        self.made_for = saved.model

    def load_buffers(self, buffers: Mapping[str, torch.Tensor], source: str) -> None:
        """Give each component its frozen buffers, keyed ``role.name`` (the layout of `buffers`):
        a policy file's, or the calibration an evolution run ships to its workers. ``source``
        names where they come from in errors."""
        for role, component in self.components().items():
            own = {k.split(".", 1)[1]: v for k, v in buffers.items() if k.startswith(role + ".")}
            if not own:
                continue
            if not isinstance(component, Stateful):
                raise CheckpointError(f"{source} has buffers for the {role} {component.name!r}, which keeps none")
            try:
                component.load_state_dict(own)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise CheckpointError(
                    f"{source}: buffers of the {role} {component.name!r} do not match: {exc}"
                ) from exc

    # ----------------------------------------------------------------- models

    def attach(self, model: Any) -> AbstractContextManager[Any]:
        """``with policy.attach(model) as handle:`` — plain ``model.generate`` then runs the policy."""
        return self.registry.model_adapter(model).attach(self)

    def generate(self, model: Any, inputs: Any, **generate_kwargs: Any) -> Any:
        """Generate with this policy attached; returns the adapter's result (tokens + report)."""
        return self.registry.model_adapter(model).generate(self, inputs, **generate_kwargs)


def _expect(name: str, value: Any, cls: type, hint: str) -> None:
    if value is not None and not isinstance(value, cls):
        raise InvalidConfigError(f"{name} must be a {cls.__name__} or None, e.g. {hint}; got {value!r}")


def _as_pooler(pooler: ComponentLike | None, span: int | Mapping[str, Any] | None, registry: Registry) -> Any:
    """The pooler object from ``pooler`` (any registered pooler) or the ``span`` shorthand, or None."""
    if pooler is not None and span is not None:
        raise InvalidConfigError(
            f"give either pooler ({pooler!r}) or span ({span!r}), not both; span=k is shorthand for "
            "pooler=('span', {'kernel': k})"
        )
    if span is not None:
        ref = span_pooler_ref(span)
        return None if ref is None else _as_component("pooler", ref, registry)
    return None if pooler is None else _as_component("pooler", pooler, registry)


def _check_no_nan(scores: torch.Tensor, padded: torch.Tensor | None, view: LayerView, source: str) -> None:
    """A NaN score has no rank, so the selector would keep or evict that token arbitrarily;
    ±inf are legal (+inf pins a token, padded slots are set to −inf). ``source`` names the
    component that produced ``scores`` (``scorer 'h2o'``, ``pooler 'span'``)."""
    nan = torch.isnan(scores)
    if padded is not None:
        nan &= ~padded
    if not bool(nan.any()):
        return
    row, head, slot = (int(i) for i in nan.nonzero()[0])
    raise InvalidScoresError(
        f"{source} returned NaN for {int(nan.sum())} cached token(s) on layer {view.layer} (first: batch "
        f"row {row}, head {head}, position {int(view.positions[row, head, slot])}); scores must be numbers or ±inf"
    )


def _check_selection(
    selection: Selection, protected: torch.Tensor, padded: torch.Tensor | None, view: LayerView, selector: str
) -> None:
    """Cheap run-time checks of a selection (vectorised, one host sync when all is well): indices
    inside the cache, no token twice, ascending per head and every protected token kept. Slots
    that ``selection.valid`` marks as padding are ignored (they legitimately point at 0)."""
    indices = selection.indices
    where = f"selector {selector!r} on layer {view.layer}"
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise InvalidSelectionError(f"{where} returned {indices.dtype} indices; they must be integers")
    valid = selection.valid
    if valid is None:
        valid = torch.ones_like(indices, dtype=torch.bool)
    elif not isinstance(valid, torch.Tensor) or valid.shape != indices.shape or valid.dtype != torch.bool:
        got = f"{tuple(valid.shape)} {valid.dtype}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise InvalidSelectionError(f"{where} returned selection.valid {got}; expected bool {tuple(indices.shape)}")
    tokens = view.tokens
    outside = ~((indices >= 0) & (indices < tokens))
    safe = indices.clamp(0, max(tokens - 1, 0)).long()
    counts = torch.zeros(protected.shape, dtype=torch.int32, device=indices.device)
    counts.scatter_add_(-1, safe, (valid & ~outside).to(torch.int32))
    unsorted = torch.zeros_like(valid)
    if indices.shape[-1] > 1:
        before = torch.where(valid, safe, -1).cummax(-1).values  # the largest valid index up to each slot
        unsorted[..., 1:] = valid[..., 1:] & (safe[..., 1:] <= before[..., :-1])
    dropped = protected.to(counts.device) & (counts == 0)
    if padded is not None:
        dropped &= ~padded.to(counts.device)
    problems = torch.stack([outside.any(), (counts > 1).any(), unsorted.any(), dropped.any()]).tolist()
    if not any(problems):
        return
    if problems[0]:
        raise InvalidSelectionError(
            f"{where} returned indices {int(indices.min())}..{int(indices.max())}; they must lie in [0, {tokens})"
        )
    if problems[1]:
        row, head, slot = (int(i) for i in (counts > 1).nonzero()[0])
        raise InvalidSelectionError(
            f"{where} kept slot {slot} twice (batch row {row}, head {head}); each cached token may be kept once"
        )
    if problems[2]:
        row, head, _ = (int(i) for i in unsorted.nonzero()[0])
        raise InvalidSelectionError(
            f"{where} returned unsorted indices (batch row {row}, head {head}): {indices[row, head].tolist()[:16]}; "
            "kept indices must ascend per head (kvpolicy.selection.sorted_selection does this)"
        )
    row, head, slot = (int(i) for i in dropped.nonzero()[0])
    raise InvalidSelectionError(
        f"{where} dropped {int(dropped.sum())} protected token(s) (first: position "
        f"{int(view.positions[row, head, slot])}, batch row {row}, head {head}); sinks, the recent window and the "
        "newest token must always be kept"
    )


def _check_leading(tensor: torch.Tensor, view: LayerView, what: str, extra_dims: int) -> None:
    expected = (view.batch, view.kv_heads, view.tokens)
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape[:3]) != expected or tensor.dim() != 3 + extra_dims:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        dims = "[batch, kv_heads, tokens" + (", features]" if extra_dims else "]")
        raise ShapeError(f"{what} have shape {shape}; expected {dims} with leading dims {expected}")


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
