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
- extractor / scorer / selector: output shapes and dtypes (an extractor's declared
  ``num_features`` included) on views that carry exactly what the component declared in
  ``requirements``, determinism, batch-permutation equivariance, inputs
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

The checks are split by kind: `base` (targets, checks, failures), `components` (every component,
extractors, scorers), `poolers`, `selectors`, `optimizers` and `presets`; this module is the
catalogue (`CHECKS`, `targets`, `parametrize_with_checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kvpolicy.policy import Policy, build
from kvpolicy.registry import Registry, default_registry
from kvpolicy.testing.conformance.base import Check, ConformanceError, Target, TargetKind
from kvpolicy.testing.conformance.components import (
    _extractor_behaviour,
    _scorer_behaviour,
    check_config_roundtrip,
    check_extractor_output,
    check_population_rows,
    check_protocol,
    check_rejects_unknown_config,
    check_scorer_output,
    feature_source,
)
from kvpolicy.testing.conformance.optimizers import (
    _OPT_DIM,
    check_optimizer_ask_tell,
    check_optimizer_resume,
    check_optimizer_seeded,
)
from kvpolicy.testing.conformance.poolers import (
    _pooler_behaviour,
    check_pooler_output,
    check_pooler_padded_slots,
)
from kvpolicy.testing.conformance.presets import (
    check_preset_cache_machine,
    check_preset_plan,
    check_preset_roundtrip,
)
from kvpolicy.testing.conformance.selectors import (
    check_protection_beats_pinned_scores,
    check_selector_behaviour,
    check_selector_contract,
)

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
        Check("layers_together", _extractor_behaviour("layers_together")),
    ),
    "scorer": (
        Check("protocol", check_protocol),
        Check("config_roundtrip", check_config_roundtrip),
        Check("rejects_unknown_config", check_rejects_unknown_config),
        Check("output_shape", check_scorer_output),
        Check("deterministic", _scorer_behaviour("deterministic")),
        Check("leaves_inputs_alone", _scorer_behaviour("leaves_inputs_alone")),
        Check("batch_permutation", _scorer_behaviour("batch_permutation")),
        Check("layers_together", _scorer_behaviour("layers_together")),
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
        Check("layers_together", _pooler_behaviour("layers_together")),
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
    preset, so a suite grows with the registry. Ids read ``scorer:tova-batch_permutation``.

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
