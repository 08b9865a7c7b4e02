"""`Policy`: extractor → scorer → (pooler) → selector, plus when it runs, what it protects and its budget.

A policy is built from component objects or from registry names with configs, serialises to
JSON (`Policy.config`), and is attached to a model through the model-adapter hook, so this
module never imports transformers (the HF integration is itself a plugin). What it checks is in
`kvpolicy.policy.checks`; building one from a spec with overrides, in `kvpolicy.policy.builder`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import attrs
import torch

from kvpolicy.checkpoint import ModelRecord
from kvpolicy.errors import InvalidConfigError, InvalidScoresError, ShapeError
from kvpolicy.policy.checks import (
    check_budget,
    check_feature_width,
    check_no_nan,
    check_reconstruction,
    check_selection,
    check_shape,
)
from kvpolicy.policy.components import ComponentLike, as_component, as_pooler, expect
from kvpolicy.policy.files import PolicyFiles
from kvpolicy.registry import Registry, default_registry
from kvpolicy.selection import padding_mask
from kvpolicy.types import (
    Budget,
    ComponentRef,
    LayerView,
    Parametric,
    PolicyConfig,
    Protection,
    Reconstructing,
    RepeatPrompt,
    Requirements,
    Schedule,
    Selection,
    Stateful,
    TokenizerAware,
    capabilities,
    config_to_dict,
    layer_indices,
)


class Policy(PolicyFiles):
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
        self.extractor = as_component("extractor", extractor, self.registry)
        self.scorer = as_component("scorer", scorer, self.registry)
        self.selector = as_component("selector", selector, self.registry)
        self.pooler = as_pooler(pooler, span, self.registry)
        if schedule is not None and every is not None:
            raise InvalidConfigError("give either schedule or every, not both")
        expect("schedule", schedule, Schedule, 'Schedule("every_step"), or every=n for Schedule("every_n", every=n)')
        expect("protect", protect, Protection, "Protection(sinks=4, recent=0), or sinks= / recent=")
        self.schedule = schedule or (Schedule("every_n", every=every) if every is not None else Schedule())
        protect = protect or Protection()
        self.protect = attrs.evolve(
            protect,
            **{k: v for k, v in (("sinks", sinks), ("recent", recent)) if v is not None},
        )
        self.budget = Budget.parse(budget)
        self.skip_layers = layer_indices(skip_layers)
        check_feature_width(self.extractor, self.scorer)
        check_budget(self.selector, self.budget, self.protect, self.schedule.kind != "never")
        check_reconstruction(self.requirements, self.schedule)
        #: the model this policy's weights were made for (from its policy file), or None
        self.made_for: ModelRecord | None = None
        #: attach to a model other than `made_for` as a zero-shot transfer, chosen: no warning
        #: (the attachment's report still records the transfer)
        self.transfer = False

    @property
    def needs_budget(self) -> bool:
        """Whether the policy evicts by a budget: its selector sizes the cache from one
        (`kvpolicy.types.Capabilities.needs_budget`) and its schedule ever runs."""
        return capabilities(self.selector).needs_budget and self.schedule.kind != "never"

    @property
    def plans_layers_together(self) -> bool:
        """Whether the layers due at one step may be planned as one stacked pass: every component
        declares it (`kvpolicy.types.Capabilities.plans_layers_together`) and no population is
        loaded (a population's batch rows are its members, which stacking would misalign)."""
        if not all(capabilities(c).plans_layers_together for c in self.components().values()):
            return False
        return not self.num_params or self.get_flat().dim() == 1

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

    def is_due(self, *, new_tokens: int, cached: int, seen: int, prefill_done: bool, passes_done: int) -> bool:
        """Whether a layer is due for its eviction pass now (called between forward calls).

        ``new_tokens`` entered since the last eviction pass, ``cached`` are in the layer now, ``seen``
        entered in all, ``prefill_done`` is true once the prompt has been consumed, ``passes_done``
        counts this layer's earlier eviction passes.
        """
        kind = self.schedule.kind
        if kind == "never" or new_tokens <= 0:
            return False
        if kind == "after_prefill":
            return prefill_done and passes_done == 0
        if kind == "every_n":
            return new_tokens >= self.schedule.every
        capacity = self.budget.capacity(seen)
        return capacity is None or cached > capacity + self.schedule.slack

    def will_run_again(self, *, passes_done: int) -> bool:
        """Whether a layer that has had ``passes_done`` eviction passes can still be due for another
        (`is_due`): false for ``never`` and, after its one pass, for ``after_prefill``. Once false,
        the forward pass need not record that layer's statistics any more."""
        kind = self.schedule.kind
        if kind == "never":
            return False
        if kind == "after_prefill":
            return passes_done == 0
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
        check_shape(features, view, f"extractor {self.extractor.name!r} features", extra_dims=1)
        return features

    def choose(self, view: LayerView, features: torch.Tensor) -> Selection:
        """Score → pool (when the policy has a pooler) → select, from features already extracted.

        Split from `plan` so that features computed once can be scored by many parameter rows
        (members forked from one shared prefill: `kvpolicy.integrations.hf.shared_prefill`).
        """
        scores = self.scorer.score(features, view)
        check_shape(scores, view, f"scorer {self.scorer.name!r} scores", extra_dims=0)
        # Padded slots (heads of a layer keeping different counts) sit at position -1: rank them
        # below every real token so they never take a real token's place.
        padded = padding_mask(view.positions)
        check_no_nan(scores, padded, view, f"scorer {self.scorer.name!r}")
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
        check_selection(selection, protected, padded, view, self.selector.name)
        return selection

    def _pool(self, scores: torch.Tensor, view: LayerView, padded: torch.Tensor | None) -> torch.Tensor:
        """The pooler's scores, checked like a scorer's: same shape, floats, no NaN on a cached
        token; padded slots are set back to -inf so no pooler can let padding displace a token."""
        where = f"pooler {self.pooler.name!r}"
        pooled = self.pooler.pool(scores, view)
        check_shape(pooled, view, f"{where} scores", extra_dims=0)
        if not pooled.is_floating_point():
            raise InvalidScoresError(
                f"{where} returned {pooled.dtype} scores on layer {view.layer}; they must be floats"
            )
        if padded is not None:
            pooled = pooled.masked_fill(padded, float("-inf"))
        # padded slots are -inf now, so a NaN anywhere is on a cached token; the max propagates
        # NaN, one reduction instead of a mask (this runs on every eviction pass)
        if pooled.numel() and bool(torch.isnan(pooled.amax())):
            check_no_nan(pooled, padded, view, where)
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

    def repeat_prompt(self) -> RepeatPrompt:
        """How the integration repeats the cached context for `Requirements.reconstruction`:
        the prompt of the first `Reconstructing` component (it raises `MissingTokenizerError`
        before `bind_tokenizer`)."""
        for component in self.components().values():
            if isinstance(component, Reconstructing):
                return component.repeat_prompt()
        raise InvalidConfigError(f"{self!r} has no component that says how to repeat the context (repeat_prompt)")

    # ----------------------------------------------------------------- models

    def attach(self, model: Any) -> AbstractContextManager[Any]:
        """``with policy.attach(model) as handle:`` — plain ``model.generate`` then runs the policy."""
        return self.registry.model_adapter(model).attach(self)

    def generate(self, model: Any, inputs: Any, **generate_kwargs: Any) -> Any:
        """Generate with this policy attached; returns the adapter's result (tokens + report).

        ``context_end=n`` compresses tokens ``[0, n)`` first and appends the rest (the question) to
        the sealed cache, so no eviction pass sees it (the ``context-first`` protocol)."""
        return self.registry.model_adapter(model).generate(self, inputs, **generate_kwargs)
