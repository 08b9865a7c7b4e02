"""Hook specifications of kvpolicy (tier 1, docs/architecture.md).

A plugin is a module (or object) with functions marked ``@kvpolicy.hookimpl`` whose names are
these hooks. It is found through an entry point in group ``kvpolicy``::

    [project.entry-points.kvpolicy]
    foo = "kvpolicy_foo.plugin"

Registration hooks receive a ``register`` callable rather than returning lists, so the host
validates names, records which plugin provided what, and reports collisions naming both sides.
Every hook here is documented in ``docs/hooks.md``; a test keeps the two in step.

None of these hooks is called during a forward pass: names are resolved to objects once, when a
policy is built or attached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "kvpolicy"
ENTRY_POINT_GROUP = "kvpolicy"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: ``register(name, component_cls, *, description="")``. ``component_cls`` has a ``Config``
#: attribute (a frozen attrs class) and is constructed as ``component_cls(config)``.
RegisterComponent = Callable[..., None]
#: ``register(name, config, *, description="", weights=None)`` with ``config`` a `kvpolicy.PolicyConfig`.
RegisterPolicy = Callable[..., None]


@hookspec
def kvpolicy_register_extractors(register: RegisterComponent) -> None:
    """Register feature extractors.

    Call ``register(name, cls, description=...)`` once per extractor. ``cls`` implements
    `kvpolicy.types.FeatureExtractor`: ``cls(config).extract(view)`` returns features
    ``[batch, kv_heads, tokens, features]`` and ``.requirements`` declares what it needs from the
    forward pass.

    .. versionadded:: 0.1
    """


@hookspec
def kvpolicy_register_scorers(register: RegisterComponent) -> None:
    """Register scorers.

    Call ``register(name, cls, description=...)`` once per scorer. ``cls`` implements
    `kvpolicy.types.Scorer`: ``cls(config).score(features, view)`` returns ``[batch, kv_heads,
    tokens]``, higher meaning *keep*. Scorers with learnable weights also implement
    `kvpolicy.types.Parametric` so optimizers can search them.

    .. versionadded:: 0.1
    """


@hookspec
def kvpolicy_register_poolers(register: RegisterComponent) -> None:
    """Register poolers, run between scorer and selector when a policy names one.

    Call ``register(name, cls, description=...)`` once per pooler. ``cls`` implements
    `kvpolicy.types.Pooler`: ``cls(config).pool(scores, view)`` takes and returns scores
    ``[batch, kv_heads, tokens]``, each token's score pooled over its neighbours in *cached order*
    (after an eviction, adjacent cached tokens need not be adjacent in position). Padded slots
    (``view.positions < 0``) arrive as -inf and must stay -inf; a NaN on a cached token is an
    `kvpolicy.errors.InvalidScoresError` naming the pooler. The built-in ``span`` pooler is one.

    .. versionadded:: 0.1
    """


@hookspec
def kvpolicy_register_selectors(register: RegisterComponent) -> None:
    """Register selectors.

    Call ``register(name, cls, description=...)`` once per selector. ``cls`` implements
    `kvpolicy.types.Selector`: ``cls(config).select(scores, protected, budget, view)`` returns a
    `kvpolicy.types.Selection` that keeps every protected token.

    .. versionadded:: 0.1
    """


@hookspec
def kvpolicy_register_optimizers(register: RegisterComponent) -> None:
    """Register black-box optimizers.

    Call ``register(name, cls, description=...)`` once per optimizer. ``cls(config, dim=n,
    seed=s)`` implements `kvpolicy.types.Optimizer` (``ask`` / ``tell`` / ``stop`` / ``result``,
    minimising a loss).

    .. versionadded:: 0.1
    """


@hookspec
def kvpolicy_register_presets(register: RegisterPolicy) -> None:
    """Register named policy presets.

    Call ``register(name, config, description=..., weights=None)`` with a `kvpolicy.PolicyConfig`
    that names its components. ``kvpolicy.build(name, budget=..., ...)`` starts from the preset
    and applies the caller's overrides. ``weights``: the path of a saved policy file (e.g. package
    data) whose learned parameters and frozen buffers a built preset starts with — how a learned
    NAMM ships.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def kvpolicy_model_adapter(model: Any) -> Any | None:
    """Return an adapter that can attach policies to ``model``, or None if this plugin cannot.

    The first non-None answer wins, so a plugin can add support for a model family (or a
    different inference engine) without touching kvpolicy. The adapter implements
    `kvpolicy.types.ModelAdapter`: ``attach(policy)`` returns a context manager whose ``__enter__``
    gives a handle (`Policy.attach`), and ``generate(policy, inputs, **generate_kwargs)`` runs
    generation with the policy attached (`Policy.generate`).

    .. versionadded:: 0.1
    """
