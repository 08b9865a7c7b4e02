"""Checks every component passes (protocol, config round trip), and those of extractors and scorers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import torch
from hypothesis import strategies as st

from kvpolicy.errors import InvalidConfigError, KVPolicyError
from kvpolicy.registry import Registry
from kvpolicy.testing import strategies as kst
from kvpolicy.testing.conformance.base import ConformanceError, Target, _fail, _for_all, _same
from kvpolicy.testing.views import copy_view, index_view, snapshot
from kvpolicy.types import (
    PROTOCOLS,
    DeclaresFeatures,
    LayerView,
    Parametric,
    Requirements,
    capabilities,
    config_from_dict,
    config_to_dict,
    stack_views,
)

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


def another_layer(view: LayerView) -> LayerView:
    """``view``'s rows reversed, as the next layer's view: what a component that declares
    `plans_layers_together` may be given stacked after ``view`` (`stack_views`)."""
    other = index_view(view, torch.arange(view.batch).flip(0))
    other.layer = (view.layer + 1) % max(view.num_layers, 1)
    return other


def _layers_together(target: Target, run: Callable[[LayerView], torch.Tensor], view: LayerView) -> None:
    """A component declaring `plans_layers_together` gives each of two stacked layers' views
    what that view gives alone."""
    if not capabilities(target.make()).plans_layers_together:
        return
    other = another_layer(view)
    together = run(stack_views([copy_view(view), copy_view(other)]))
    alone = torch.cat([run(copy_view(view)), run(copy_view(other))])
    if not _same(together, alone):
        _fail(
            target,
            "layers_together",
            "declares plans_layers_together, but two layers' views stacked along the batch gave other "
            "outputs than each view alone (it reads view.layer or mixes batch rows)",
        )


_BEHAVIOURS = {
    "deterministic": _deterministic,
    "leaves_inputs_alone": _leaves_inputs_alone,
    "batch_permutation": _batch_permutation,
    "layers_together": _layers_together,
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
        if isinstance(extractor, DeclaresFeatures) and features.shape[-1] != extractor.num_features:
            _fail(
                target,
                "output_shape",
                f"declares num_features={extractor.num_features} but returned {features.shape[-1]} features",
            )

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
