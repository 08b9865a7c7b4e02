"""Conformance checks every kvpolicy component and preset must pass, shipped for plugin authors.

Like scikit-learn's ``check_estimator`` / ``parametrize_with_checks``::

    from kvpolicy.testing import check_component, parametrize_with_checks

    check_component(MyScorer())                     # raises ConformanceError on the first failure

    @parametrize_with_checks()                      # every registered component and preset
    def test_conformance(target, check):
        check(target)

Each check draws its inputs with hypothesis (settings from the loaded profile, see
`kvpolicy.testing.load_profile`). Checks per kind:

- every component: the protocol, a frozen attrs ``Config`` that round-trips through JSON (drawn
  configs included), unknown config keys refused with `InvalidConfigError`;
- extractor / scorer / selector: output shapes and dtypes on views that carry exactly what the
  component declared in ``requirements``, determinism, batch-permutation equivariance, inputs
  left untouched; selectors also keep every protected token, stay in budget, keep indices
  ascending and (unless they declare ``keeps_highest_scores = False``) never evict a token that
  scored higher than an unprotected survivor; a `Parametric` scorer scoring a population
  (``set_flat([batch, n])``) gives each row what that row's parameters give alone;
- pooler: scores of the input's shape, floats, no NaN on a cached token; padded slots (position
  < 0, arriving at -inf) still -inf; determinism, the scores and view left untouched,
  batch-permutation equivariance;
- optimizer: ask / tell shapes, determinism under a seed, resuming from ``state_dict``;
- preset: the `PolicyConfig` JSON round trip, `Policy.plan` honouring the invariants above, and
  the state machine driving a tiny model's evicting cache (`kvpolicy.testing.machine`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpolicy.errors import InvalidConfigError, KVPolicyError
from kvpolicy.policy import Policy, build
from kvpolicy.registry import Registry, default_registry
from kvpolicy.testing import strategies as kst
from kvpolicy.testing.invariants import keeps_highest_scores, selection_violations
from kvpolicy.testing.views import copy_view, index_view, snapshot
from kvpolicy.types import (
    PROTOCOLS,
    Budget,
    LayerView,
    Parametric,
    PolicyConfig,
    Requirements,
    capabilities,
    config_from_dict,
    config_to_dict,
)

TargetKind = str  # "extractor" | "scorer" | "pooler" | "selector" | "optimizer" | "preset"


class ConformanceError(AssertionError):
    """A component or preset failed a conformance check; the message names both."""


@attrs.frozen
class Target:
    """What a check runs on: a registered (or hand-made) component, or a preset.

    ``make()`` returns a fresh object each call (components may keep state between calls).
    ``options`` tune checks: ``score_order`` (bool) overrides the selector's declaration,
    ``extractor`` gives a scorer its feature source.
    """

    kind: TargetKind
    name: str
    make: Callable[[], Any] = attrs.field(eq=False)
    registry: Registry = attrs.field(eq=False, repr=False)
    options: Mapping[str, Any] = attrs.field(factory=dict, eq=False)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    def __str__(self) -> str:
        return self.id


@attrs.frozen
class Check:
    """One named check; calling it runs it on a target and raises `ConformanceError` on failure."""

    name: str
    run: Callable[[Target], None] = attrs.field(repr=False)

    def __call__(self, target: Target) -> None:
        try:
            self.run(target)
        except ConformanceError:
            raise
        except KVPolicyError as exc:
            raise ConformanceError(f"{target}: check {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        except AssertionError as exc:
            raise ConformanceError(f"{target}: check {self.name!r} failed: {exc}") from exc

    def __str__(self) -> str:
        return self.name


def _fail(target: Target, check: str, message: str) -> None:
    raise ConformanceError(f"{target}: check {check!r} failed: {message}")


def _for_all(strategy: st.SearchStrategy, body: Callable[[Any], None]) -> None:
    """Run ``body`` on examples of ``strategy`` under the loaded hypothesis profile."""
    given(strategy)(body)()


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool = False) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if exact or not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True)


# --------------------------------------------------------------------------- shared component checks


def check_protocol(target: Target) -> None:
    obj = target.make()
    kind = target.kind
    protocol = PROTOCOLS[kind]
    if not isinstance(obj, protocol):
        methods = ("name", "config", "requirements", "extract", "score", "pool", "select")
        missing = [m for m in methods if not hasattr(obj, m)]
        _fail(target, "protocol", f"{type(obj).__name__} does not implement {protocol.__name__} (lacks {missing})")
    name = getattr(type(obj), "name", None)
    if not isinstance(name, str) or not name:
        _fail(target, "protocol", "the class needs a class attribute `name` (a non-empty string)")
    config_cls = getattr(type(obj), "Config", None)
    if config_cls is None or not attrs.has(config_cls):
        _fail(target, "protocol", "the class needs a `Config` attribute that is an attrs class")
    if not isinstance(obj.config, config_cls):
        _fail(target, "protocol", f"`config` is a {type(obj.config).__name__}, not a {config_cls.__name__}")
    if not _is_frozen(obj.config):
        _fail(target, "protocol", f"{config_cls.__name__} must be frozen (use @attrs.frozen)")
    if kind != "optimizer" and not isinstance(obj.requirements, Requirements):
        _fail(target, "protocol", f"`requirements` must be a Requirements, got {type(obj.requirements).__name__}")


def _is_frozen(config: Any) -> bool:
    fields = attrs.fields(type(config))
    if not fields:
        return getattr(type(config), "__setattr__", None) is not object.__setattr__
    try:
        setattr(config, fields[0].name, getattr(config, fields[0].name))
    except (attrs.exceptions.FrozenInstanceError, AttributeError):
        return True
    return False


def check_config_roundtrip(target: Target) -> None:
    obj = target.make()
    config_cls = type(obj).Config

    def roundtrip(config: Any) -> None:
        text = json.dumps(config_to_dict(config))
        back = config_from_dict(config_cls, json.loads(text))
        if back != config:
            _fail(target, "config_roundtrip", f"{config!r} came back from JSON {text} as {back!r}")

    roundtrip(obj.config)
    _for_all(kst.configs(config_cls), roundtrip)


def check_rejects_unknown_config(target: Target) -> None:
    config_cls = type(target.make()).Config
    try:
        config_from_dict(config_cls, {"no_such_field_xyz": 1})
    except InvalidConfigError:
        return
    _fail(target, "rejects_unknown_config", f"{config_cls.__name__} accepted an unknown field without an error")


# --------------------------------------------------------------------------- extractors and scorers


def _aligned(target: Target, *components: Any) -> bool | None:
    """True when the target (option ``aligned_heads``) or a component (``requires_aligned_heads``)
    needs every KV head to hold the same tokens; None lets views draw both layouts."""
    wanted = target.options.get("aligned_heads") or any(capabilities(c).requires_aligned_heads for c in components)
    return True if wanted else None


def _views_for(requirements: Requirements, aligned: bool | None = None) -> st.SearchStrategy[LayerView]:
    return kst.layer_views(requirements, aligned=aligned)


def _deterministic(target: Target, run: Callable[[LayerView], torch.Tensor], view: LayerView) -> None:
    if not _same(run(copy_view(view)), run(copy_view(view)), exact=True):
        _fail(target, "deterministic", "two runs (fresh objects, same view) gave different outputs")


def _leaves_inputs_alone(target: Target, run: Callable[[LayerView], torch.Tensor], view: LayerView) -> None:
    probe = copy_view(view)
    inputs = snapshot(probe)
    run(probe)
    changed = [k for k, v in snapshot(probe).items() if not torch.equal(v, inputs[k])]
    if changed:
        _fail(target, "leaves_inputs_alone", f"modified the view's {', '.join(changed)} in place")


def _batch_permutation(target: Target, run: Callable[[LayerView], torch.Tensor], view: LayerView) -> None:
    """Row i's output depends on row i alone: reversing the batch reverses the output."""
    if view.batch < 2:
        return
    order = torch.arange(view.batch).flip(0)
    first = run(copy_view(view))
    permuted = run(index_view(view, order))
    if not _same(permuted, first.index_select(0, order)):
        _fail(target, "batch_permutation", f"reordering the batch rows {order.tolist()} changed the rows' outputs")


_BEHAVIOURS = {
    "deterministic": _deterministic,
    "leaves_inputs_alone": _leaves_inputs_alone,
    "batch_permutation": _batch_permutation,
}


def _extract_fn(target: Target) -> Callable[[LayerView], torch.Tensor]:
    return lambda view: target.make().extract(view)


def check_extractor_output(target: Target) -> None:
    extractor = target.make()
    widths: set[int] = set()

    def body(view: LayerView) -> None:
        features = target.make().extract(copy_view(view))
        expected = (view.batch, view.kv_heads, view.tokens)
        if not isinstance(features, torch.Tensor) or features.dim() != 4 or tuple(features.shape[:3]) != expected:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            _fail(target, "output_shape", f"features have shape {shape}; expected [{', '.join(map(str, expected))}, f]")
        if not features.is_floating_point() or not torch.isfinite(features).all():
            _fail(target, "output_shape", "features must be finite floats")
        widths.add(features.shape[-1])
        if len(widths) > 1:
            _fail(target, "output_shape", f"the feature count changed between views: {sorted(widths)}")

    _for_all(_views_for(extractor.requirements, _aligned(target, extractor)), body)


def _extractor_behaviour(check: str) -> Callable[[Target], None]:
    def run(target: Target) -> None:
        extractor = target.make()
        behaviour = _BEHAVIOURS[check]
        _for_all(
            _views_for(extractor.requirements, _aligned(target, extractor)),
            lambda view: behaviour(target, _extract_fn(target), view),
        )

    return run


def feature_source(scorer: Any, registry: Registry) -> Any:
    """An extractor whose features ``scorer`` accepts: the one a preset pairs it with, else the
    first registered extractor it scores without error on a sample view."""
    for name in registry.preset_names():
        config = registry.preset(name).config
        if config.scorer.name == scorer.name:
            return registry.create("extractor", config.extractor.name, config.extractor.config)
    shape = kst.CacheShape(batch=2, kv_heads=2, groups=1, tokens=12, head_dim=8, seen=20, fresh=4, dtype=torch.float32)
    for name in registry.names("extractor"):
        extractor = registry.create("extractor", name)
        view = kst.make_view(shape, 0, extractor.requirements | scorer.requirements)
        try:
            scorer.score(extractor.extract(copy_view(view)), view)
        except (KVPolicyError, ValueError, RuntimeError, IndexError):
            continue
        return extractor
    raise ConformanceError(
        f"scorer {scorer.name!r}: no registered extractor produces features it accepts; "
        "register a preset pairing it with an extractor, or pass extractor= to check_component"
    )


def _scorer_inputs(target: Target) -> tuple[Any, st.SearchStrategy[LayerView]]:
    scorer = target.make()
    extractor = target.options.get("extractor") or feature_source(scorer, target.registry)
    return extractor, _views_for(extractor.requirements | scorer.requirements, _aligned(target, extractor, scorer))


def _score_fn(target: Target, extractor: Any) -> Callable[[LayerView], torch.Tensor]:
    def run(view: LayerView) -> torch.Tensor:
        features = type(extractor)(extractor.config).extract(copy_view(view))
        return target.make().score(features, view)

    return run


def check_scorer_output(target: Target) -> None:
    extractor, views = _scorer_inputs(target)

    def body(view: LayerView) -> None:
        scores = _score_fn(target, extractor)(view)
        expected = (view.batch, view.kv_heads, view.tokens)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            _fail(target, "output_shape", f"scores have shape {shape}; expected {list(expected)}")
        if not scores.is_floating_point() or torch.isnan(scores).any():
            _fail(target, "output_shape", "scores must be floats without NaN")

    _for_all(views, body)


def _scorer_behaviour(check: str) -> Callable[[Target], None]:
    def run(target: Target) -> None:
        extractor, views = _scorer_inputs(target)
        behaviour = _BEHAVIOURS[check]
        _for_all(views, lambda view: behaviour(target, _score_fn(target, extractor), view))

    return run


def check_population_rows(target: Target) -> None:
    """`set_flat([batch, n])` gives each batch row its own parameters (a population as a batch)."""
    if not isinstance(target.make(), Parametric):
        return
    extractor, views = _scorer_inputs(target)

    def body(args: tuple[LayerView, int]) -> None:
        view, seed = args
        scorer = target.make()
        flat = scorer.get_flat()
        if tuple(flat.shape) != (scorer.num_params,):
            _fail(
                target, "population_rows", f"get_flat() has shape {tuple(flat.shape)}; expected [{scorer.num_params}]"
            )
        population = torch.randn(view.batch, scorer.num_params, generator=torch.Generator().manual_seed(seed)) * 0.1
        features = type(extractor)(extractor.config).extract(copy_view(view))
        scorer.set_flat(population)
        together = scorer.score(features, view)
        for row in range(view.batch):
            alone = target.make()
            alone.set_flat(population[row])
            rows = torch.tensor([row])
            single = alone.score(features.index_select(0, rows), index_view(view, rows))
            if not _same(single, together.index_select(0, rows)):
                _fail(target, "population_rows", f"batch row {row} scored differently inside the population")

    _for_all(st.tuples(views, kst.seeds), body)


# --------------------------------------------------------------------------- poolers


def _pooler_inputs(target: Target, padded: bool | None = None) -> st.SearchStrategy[kst.PoolerInputs]:
    pooler = target.make()
    return kst.pooler_inputs(pooler.requirements, padded=padded, aligned=_aligned(target, pooler))


def check_pooler_output(target: Target) -> None:
    def body(inputs: kst.PoolerInputs) -> None:
        scores = inputs.scores
        pooled = target.make().pool(scores.clone(), copy_view(inputs.view))
        expected = tuple(scores.shape)
        if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != expected:
            shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            _fail(target, "output_shape", f"pooled scores have shape {shape}; expected {list(expected)}")
        if not pooled.is_floating_point():
            _fail(target, "output_shape", f"pooled scores must be floats, got {pooled.dtype}")
        if torch.isnan(pooled[~inputs.padded]).any():
            _fail(target, "output_shape", "pooled scores have NaN on cached tokens (the scores had none)")

    _for_all(_pooler_inputs(target), body)


def check_pooler_padded_slots(target: Target) -> None:
    """Padded slots neither receive a score (they stay -inf) nor become NaN."""

    def body(inputs: kst.PoolerInputs) -> None:
        pooled = target.make().pool(inputs.scores.clone(), copy_view(inputs.view))
        padded = inputs.padded
        if not bool((pooled[padded] == float("-inf")).all()):
            _fail(
                target,
                "padded_slots",
                f"a padded slot (position < 0) came back as {pooled[padded].max()}; it must stay -inf",
            )

    _for_all(_pooler_inputs(target, padded=True), body)


def _pooler_deterministic(target: Target, inputs: kst.PoolerInputs) -> None:
    a = target.make().pool(inputs.scores.clone(), copy_view(inputs.view))
    b = target.make().pool(inputs.scores.clone(), copy_view(inputs.view))
    if not _same(a, b, exact=True):
        _fail(target, "deterministic", "two runs (fresh objects, same inputs) gave different scores")


def _pooler_leaves_inputs_alone(target: Target, inputs: kst.PoolerInputs) -> None:
    scores, probe = inputs.scores.clone(), copy_view(inputs.view)
    before = snapshot(probe)
    target.make().pool(scores, probe)
    changed = [k for k, v in snapshot(probe).items() if not torch.equal(v, before[k])]
    if not torch.equal(scores, inputs.scores):
        changed.insert(0, "scores")
    if changed:
        _fail(target, "leaves_inputs_alone", f"modified the {', '.join(changed)} in place")


def _pooler_batch_permutation(target: Target, inputs: kst.PoolerInputs) -> None:
    """Row i's pooled scores depend on row i alone: reversing the batch reverses the output."""
    if inputs.view.batch < 2:
        return
    order = torch.arange(inputs.view.batch).flip(0)
    first = target.make().pool(inputs.scores.clone(), copy_view(inputs.view))
    permuted = target.make().pool(inputs.scores.index_select(0, order), index_view(inputs.view, order))
    if not _same(permuted, first.index_select(0, order)):
        _fail(target, "batch_permutation", f"reordering the batch rows {order.tolist()} changed the rows' scores")


_POOLER_BEHAVIOURS = {
    "deterministic": _pooler_deterministic,
    "leaves_inputs_alone": _pooler_leaves_inputs_alone,
    "batch_permutation": _pooler_batch_permutation,
}


def _pooler_behaviour(check: str) -> Callable[[Target], None]:
    def run(target: Target) -> None:
        behaviour = _POOLER_BEHAVIOURS[check]
        _for_all(_pooler_inputs(target), lambda inputs: behaviour(target, inputs))

    return run


# --------------------------------------------------------------------------- selectors


def _score_order(target: Target, selector: Any) -> bool:
    return bool(target.options.get("score_order", keeps_highest_scores(selector)))


def check_selector_contract(target: Target) -> None:
    selector = target.make()
    needs_budget = capabilities(selector).needs_budget
    order = _score_order(target, selector)

    def body(inputs: kst.SelectorInputs) -> None:
        selection = target.make().select(inputs.scores, inputs.protected, inputs.budget, inputs.view)
        capacity = inputs.budget.capacity(inputs.view.seen)
        problems = selection_violations(selection, inputs.scores, inputs.protected, capacity, score_order=order)
        if problems:
            _fail(target, "selection_contract", "; ".join(problems))

    _for_all(kst.selector_inputs(needs_budget=needs_budget), body)


def check_protection_beats_pinned_scores(target: Target) -> None:
    """Scorers may pin tokens with +inf (SnapKV's window); protection must still win over them."""
    selector = target.make()
    tokens = 6
    scores = torch.full((1, 2, tokens), float("inf"))
    protected = torch.zeros(1, 2, tokens, dtype=torch.bool)
    protected[..., -1] = True
    view = LayerView(layer=0, num_layers=1, positions=torch.arange(tokens).expand(1, 2, tokens), seen=tokens)
    budget = Budget(tokens=1) if capabilities(selector).needs_budget else Budget()
    selection = selector.select(scores, protected, budget, view)
    problems = selection_violations(selection, scores, protected, budget.capacity(tokens), score_order=False)
    if problems:
        _fail(target, "protection_beats_pinned_scores", "with every score +inf: " + "; ".join(problems))


def check_selector_behaviour(target: Target) -> None:
    needs_budget = capabilities(target.make()).needs_budget

    def body(inputs: kst.SelectorInputs) -> None:
        def run(view: LayerView, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            scores, protected = inputs.scores, inputs.protected
            if rows is not None:
                scores, protected = scores.index_select(0, rows), protected.index_select(0, rows)
            before = (scores.clone(), protected.clone())
            selection = target.make().select(scores, protected, inputs.budget, view)
            if not (torch.equal(before[0], scores) and torch.equal(before[1], protected)):
                _fail(target, "behaviour", "modified the scores or the protected mask in place")
            valid = selection.valid if selection.valid is not None else torch.ones_like(selection.indices, dtype=bool)
            return selection.indices, valid

        first = run(copy_view(inputs.view))
        again = run(copy_view(inputs.view))
        if not (torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])):
            _fail(target, "behaviour", "two calls with the same inputs selected different tokens")
        if inputs.view.batch > 1:
            order = torch.arange(inputs.view.batch).flip(0)
            permuted = run(index_view(inputs.view, order), order)
            if not (torch.equal(permuted[0], first[0][order]) and torch.equal(permuted[1], first[1][order])):
                _fail(target, "behaviour", "reordering the batch rows changed which tokens each row keeps")

    _for_all(kst.selector_inputs(needs_budget=needs_budget), body)


# --------------------------------------------------------------------------- optimizers

_OPT_DIM = 6


def _optimizer(target: Target, seed: int = 0) -> Any:
    obj = target.make()
    return type(obj)(obj.config, dim=_OPT_DIM, seed=seed)


def _sphere(solutions: torch.Tensor) -> torch.Tensor:
    return (solutions.double() - 0.5).pow(2).sum(-1)


def check_optimizer_ask_tell(target: Target) -> None:
    optimizer = _optimizer(target)
    for _ in range(3):
        solutions = optimizer.ask()
        if not isinstance(solutions, torch.Tensor) or solutions.dim() != 2 or solutions.shape[1] != _OPT_DIM:
            _fail(
                target,
                "ask_tell",
                f"ask() must return [population, {_OPT_DIM}], got {getattr(solutions, 'shape', None)}",
            )
        if not torch.isfinite(solutions).all():
            _fail(target, "ask_tell", "ask() returned non-finite candidates")
        optimizer.tell(solutions, _sphere(solutions))
    result = optimizer.result
    if tuple(result.shape) != (_OPT_DIM,):
        _fail(target, "ask_tell", f"result has shape {tuple(result.shape)}; expected [{_OPT_DIM}]")
    if not isinstance(optimizer.stop(), bool):
        _fail(target, "ask_tell", "stop() must return a bool")


def check_optimizer_seeded(target: Target) -> None:
    a, b = _optimizer(target, seed=3), _optimizer(target, seed=3)
    for step in range(2):
        xa, xb = a.ask(), b.ask()
        if not torch.equal(xa, xb):
            _fail(target, "seeded", f"two optimizers with seed 3 asked different candidates at step {step}")
        a.tell(xa, _sphere(xa))
        b.tell(xb, _sphere(xb))


def check_optimizer_resume(target: Target) -> None:
    original = _optimizer(target, seed=5)
    solutions = original.ask()
    original.tell(solutions, _sphere(solutions))
    resumed = _optimizer(target, seed=99)
    resumed.load_state_dict(original.state_dict())
    if not torch.equal(original.ask(), resumed.ask()):
        _fail(target, "resume", "an optimizer restored from state_dict() asked different candidates than the original")


# --------------------------------------------------------------------------- presets


def check_preset_roundtrip(target: Target) -> None:
    policy: Policy = target.make()
    text = policy.to_json()
    if PolicyConfig.from_json(text) != policy.config:
        _fail(target, "preset_roundtrip", f"PolicyConfig changed through JSON: {text}")
    rebuilt = Policy.from_json(text, registry=target.registry)
    if rebuilt.config != policy.config:
        _fail(target, "preset_roundtrip", "Policy.from_json(policy.to_json()) built a different policy")


def _planned_policies(target: Target) -> st.SearchStrategy[tuple[Policy, LayerView]]:
    base: Policy = target.make()

    def with_view(policy: Policy) -> st.SearchStrategy[tuple[Policy, LayerView]]:
        aligned = _aligned(target, policy.extractor, policy.scorer, policy.selector)
        return kst.layer_views(policy.requirements, aligned=aligned).map(lambda view: (policy, view))

    overrides = kst.policy_overrides(base)
    return overrides.map(lambda o: build(base.config, registry=target.registry, **o)).flatmap(with_view)


def check_preset_plan(target: Target) -> None:
    def body(args: tuple[Policy, LayerView]) -> None:
        policy, view = args
        recorded: dict[str, torch.Tensor] = {}
        selector = policy.selector
        original = selector.select

        def record(scores, protected, budget, v):
            recorded["scores"], recorded["protected"] = scores, protected
            return original(scores, protected, budget, v)

        selector.select = record  # instance attribute: only this policy object is affected
        try:
            selection = policy.plan(copy_view(view))
        finally:
            del selector.select
        if selection is None:
            if policy.schedule.kind != "never" and view.layer not in policy.skip_layers:
                _fail(target, "plan", f"{policy} planned nothing on an evicting layer")
            return
        expected = policy.protected_mask(view)
        if not torch.equal(recorded["protected"], expected):
            _fail(target, "plan", "the selector was not given the policy's protected mask")
        capacity = policy.budget.capacity(view.seen) if policy.budget.is_set else None
        order = bool(target.options.get("score_order", keeps_highest_scores(selector)))
        problems = selection_violations(selection, recorded["scores"], expected, capacity, score_order=order)
        if problems:
            _fail(target, "plan", f"{policy}: " + "; ".join(problems))
        again = policy.plan(copy_view(view))
        if not torch.equal(again.indices, selection.indices):
            _fail(target, "plan", f"{policy} planned differently twice on the same view")

    _for_all(_planned_policies(target), body)


def check_preset_cache_machine(target: Target) -> None:
    from kvpolicy.testing.machine import run_cache_machine

    run_cache_machine(target.make(), registry=target.registry, options=target.options)


# --------------------------------------------------------------------------- catalogue

CHECKS: dict[TargetKind, tuple[Check, ...]] = {
    "extractor": (
        Check("protocol", check_protocol),
        Check("config_roundtrip", check_config_roundtrip),
        Check("rejects_unknown_config", check_rejects_unknown_config),
        Check("output_shape", check_extractor_output),
        Check("deterministic", _extractor_behaviour("deterministic")),
        Check("leaves_inputs_alone", _extractor_behaviour("leaves_inputs_alone")),
        Check("batch_permutation", _extractor_behaviour("batch_permutation")),
    ),
    "scorer": (
        Check("protocol", check_protocol),
        Check("config_roundtrip", check_config_roundtrip),
        Check("rejects_unknown_config", check_rejects_unknown_config),
        Check("output_shape", check_scorer_output),
        Check("deterministic", _scorer_behaviour("deterministic")),
        Check("leaves_inputs_alone", _scorer_behaviour("leaves_inputs_alone")),
        Check("batch_permutation", _scorer_behaviour("batch_permutation")),
        Check("population_rows", check_population_rows),
    ),
    "pooler": (
        Check("protocol", check_protocol),
        Check("config_roundtrip", check_config_roundtrip),
        Check("rejects_unknown_config", check_rejects_unknown_config),
        Check("output_shape", check_pooler_output),
        Check("padded_slots", check_pooler_padded_slots),
        Check("deterministic", _pooler_behaviour("deterministic")),
        Check("leaves_inputs_alone", _pooler_behaviour("leaves_inputs_alone")),
        Check("batch_permutation", _pooler_behaviour("batch_permutation")),
    ),
    "selector": (
        Check("protocol", check_protocol),
        Check("config_roundtrip", check_config_roundtrip),
        Check("rejects_unknown_config", check_rejects_unknown_config),
        Check("selection_contract", check_selector_contract),
        Check("protection_beats_pinned_scores", check_protection_beats_pinned_scores),
        Check("behaviour", check_selector_behaviour),
    ),
    "optimizer": (
        Check("protocol", check_protocol),
        Check("config_roundtrip", check_config_roundtrip),
        Check("rejects_unknown_config", check_rejects_unknown_config),
        Check("ask_tell", check_optimizer_ask_tell),
        Check("seeded", check_optimizer_seeded),
        Check("resume", check_optimizer_resume),
    ),
    "preset": (
        Check("preset_roundtrip", check_preset_roundtrip),
        Check("plan", check_preset_plan),
        Check("cache_machine", check_preset_cache_machine),
    ),
}


def kind_of(obj: Any) -> TargetKind:
    """The component kind ``obj`` implements (a `Policy` is a ``preset``)."""
    if isinstance(obj, Policy):
        return "preset"
    methods = {"selector": "select", "scorer": "score", "pooler": "pool", "extractor": "extract", "optimizer": "ask"}
    for kind, method in methods.items():
        if callable(getattr(obj, method, None)):
            return kind
    raise ConformanceError(
        f"{obj!r} is not a kvpolicy component: it has none of extract / score / pool / select / ask "
        "(see kvpolicy.types for the protocols)"
    )


def _maker(obj: Any) -> Callable[[], Any]:
    if isinstance(obj, Policy):
        return lambda: Policy.from_config(obj.config, registry=obj.registry)
    if kind_of(obj) == "optimizer":
        return lambda: obj
    return lambda: type(obj)(obj.config)


def target_for(obj: Any, registry: Registry | None = None, **options: Any) -> Target:
    """A `Target` for a component or policy object."""
    kind = kind_of(obj)
    name = getattr(obj, "name", None) or repr(obj)
    return Target(kind, str(name), _maker(obj), registry or default_registry(), options)


def check_component(
    obj: Any,
    *,
    registry: Registry | None = None,
    skip: Iterable[str] = (),
    **options: Any,
) -> list[str]:
    """Run every conformance check for ``obj`` (a component or a `Policy`); returns the names of
    the checks passed and raises `ConformanceError` on the first failure.

    ``skip`` names checks not to run; ``options`` (``score_order=False``, ``extractor=obj``) tune
    checks as described in `Target`.
    """
    target = target_for(obj, registry, **options)
    passed = []
    for check in CHECKS[target.kind]:
        if check.name in set(skip):
            continue
        check(target)
        passed.append(check.name)
    return passed


def targets(registry: Registry | None = None, options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Target]:
    """Every registered component and preset of ``registry``, as check targets.

    ``options`` maps a target id (``"selector:heavy_recent"``) to its check options.
    """
    registry = registry or default_registry()
    options = options or {}
    found: list[Target] = []
    for kind in ("extractor", "scorer", "pooler", "selector", "optimizer"):
        for name in registry.names(kind):  # type: ignore[arg-type]
            make = _registry_maker(registry, kind, name)
            found.append(Target(kind, name, make, registry, dict(options.get(f"{kind}:{name}", {}))))
    for name in registry.preset_names():
        make = _preset_maker(registry, name)
        found.append(Target("preset", name, make, registry, dict(options.get(f"preset:{name}", {}))))
    return found


def _registry_maker(registry: Registry, kind: str, name: str) -> Callable[[], Any]:
    if kind == "optimizer":
        spec = registry.spec(kind, name)  # type: ignore[arg-type]
        return lambda: spec.cls(spec.config_cls(), dim=_OPT_DIM, seed=0)
    return lambda: registry.create(kind, name)  # type: ignore[arg-type]


def _preset_maker(registry: Registry, name: str) -> Callable[[], Any]:
    return lambda: build(name, registry=registry)


def all_checks(
    registry: Registry | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[tuple[Target, Check]]:
    """Every (target, check) pair for the registry: the matrix `parametrize_with_checks` runs."""
    return [(t, c) for t in targets(registry, options) for c in CHECKS[t.kind]]


def parametrize_with_checks(
    registry: Registry | None = None,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    expected_failures: Mapping[str, Mapping[str, str]] | None = None,
    select: Callable[[Target], bool] | None = None,
):
    """A ``pytest.mark.parametrize("target, check", ...)`` over every registered component and
    preset, so a suite grows with the registry. Ids read ``scorer:h2o-batch_permutation``.

    ``expected_failures`` maps a target id to ``{check name: reason}``; those become strict
    xfails (an unexpected pass is reported, so a fixed component is noticed). ``select`` keeps
    only the targets it returns True for (e.g. one plugin's components).
    """
    import pytest

    expected_failures = expected_failures or {}
    params = []
    for target, check in all_checks(registry, options):
        if select is not None and not select(target):
            continue
        marks = []
        reason = expected_failures.get(target.id, {}).get(check.name)
        if reason:
            marks.append(pytest.mark.xfail(reason=reason, strict=True, raises=ConformanceError))
        params.append(pytest.param(target, check, id=f"{target.id}-{check.name}", marks=marks))
    return pytest.mark.parametrize("target, check", params)


__all__ = [
    "CHECKS",
    "Check",
    "ConformanceError",
    "Target",
    "all_checks",
    "check_component",
    "feature_source",
    "kind_of",
    "parametrize_with_checks",
    "target_for",
    "targets",
]
