"""Value types and component protocols (tier 0): the contract every other part agrees on.

Configs are frozen attrs classes with validators, serialisable to JSON. Tensors appear only in
`eq=False` state objects (`LayerView`, `Selection`). Tensor dimensions are always named
``batch, kv_heads, tokens, head_dim`` (and ``queries`` for attention rows).

Four component kinds form the pipeline run on each layer in an eviction pass (the pooler is
optional)::

    FeatureExtractor.extract(view)            -> features  [batch, kv_heads, tokens, features]
    Scorer.score(features, view)              -> scores    [batch, kv_heads, tokens]  (higher = keep)
    Pooler.pool(scores, view)                 -> scores    [batch, kv_heads, tokens]  (over neighbours)
    Selector.select(scores, protected, budget, view) -> Selection (indices of kept tokens)

and an Optimizer searches the flat parameter vector of any `Parametric` component.

Split by job: `configs` (JSON round trips and validators), `policy_config` (a policy as data),
`views` (what components see and return at run time), `components` (the protocols and the
capabilities a component declares) and `base` (the base class a component subclasses so it is
only its own code). Every name is importable from ``kvpolicy.types``.
"""

from kvpolicy.types.base import BufferedComponent, ComponentBase
from kvpolicy.types.components import (
    COMPONENT_KINDS,
    PROTOCOLS,
    Calibrated,
    Capabilities,
    Component,
    ComponentKind,
    DeclaresFeatures,
    FeatureExtractor,
    FeatureWidth,
    ModelAdapter,
    Optimizer,
    Parametric,
    Pooler,
    ReadsFeatures,
    Reconstructing,
    RepeatPrompt,
    Requirements,
    Scorer,
    Selector,
    Stateful,
    TokenizerAware,
    capabilities,
)
from kvpolicy.types.configs import (
    EmptyConfig,
    config_from_dict,
    config_to_dict,
    layer_indices,
    non_negative,
    non_negative_int,
    positive,
    positive_int,
)
from kvpolicy.types.policy_config import (
    SCHEDULE_KINDS,
    SPAN_POOLER,
    Budget,
    ComponentRef,
    PolicyConfig,
    Protection,
    Schedule,
    ScheduleKind,
    span_pooler_ref,
)
from kvpolicy.types.views import (
    CacheReport,
    LayerView,
    Selection,
    extend_tokens,
    stack_views,
)

__all__ = [
    "Budget",
    "BufferedComponent",
    "COMPONENT_KINDS",
    "CacheReport",
    "Calibrated",
    "Capabilities",
    "Component",
    "ComponentBase",
    "ComponentKind",
    "ComponentRef",
    "DeclaresFeatures",
    "EmptyConfig",
    "FeatureExtractor",
    "FeatureWidth",
    "LayerView",
    "ModelAdapter",
    "Optimizer",
    "PROTOCOLS",
    "Parametric",
    "PolicyConfig",
    "Pooler",
    "Protection",
    "ReadsFeatures",
    "Reconstructing",
    "RepeatPrompt",
    "Requirements",
    "SCHEDULE_KINDS",
    "SPAN_POOLER",
    "Schedule",
    "ScheduleKind",
    "Scorer",
    "Selection",
    "Selector",
    "Stateful",
    "TokenizerAware",
    "capabilities",
    "config_from_dict",
    "config_to_dict",
    "extend_tokens",
    "stack_views",
    "layer_indices",
    "non_negative",
    "non_negative_int",
    "positive",
    "positive_int",
    "span_pooler_ref",
]
