"""kvpolicy: composable, pluggable KV-cache eviction policies for Hugging Face models.

A policy is extractor → scorer → selector plus a schedule, protected tokens and a budget. The
components come from plugins found through entry points in group ``kvpolicy``::

    import kvpolicy
    policy = kvpolicy.build("h2o", budget=256)
    with policy.attach(model) as handle:
        model.generate(**inputs, max_new_tokens=32)
    print(handle.report())
"""

from kvpolicy.calibration import calibrate
from kvpolicy.errors import (
    AttachError,
    CheckpointError,
    DuplicateComponentError,
    FeatureWidthError,
    InvalidBudgetError,
    InvalidConfigError,
    KVPolicyError,
    MissingTokenizerError,
    ModelUnavailableError,
    PluginLoadError,
    ShapeError,
    UnknownComponentError,
    UnsupportedModelError,
)
from kvpolicy.hookspecs import hookimpl
from kvpolicy.policy import Policy, build
from kvpolicy.registry import Registry, default_registry, reset_default_registry
from kvpolicy.types import (
    Budget,
    CacheReport,
    ComponentRef,
    LayerView,
    PolicyConfig,
    Protection,
    Requirements,
    Schedule,
    Selection,
)

__version__ = "0.1.0"

__all__ = [
    "AttachError",
    "Budget",
    "CacheReport",
    "CheckpointError",
    "ComponentRef",
    "DuplicateComponentError",
    "FeatureWidthError",
    "InvalidBudgetError",
    "InvalidConfigError",
    "KVPolicyError",
    "MissingTokenizerError",
    "LayerView",
    "ModelUnavailableError",
    "PluginLoadError",
    "Policy",
    "PolicyConfig",
    "Protection",
    "Registry",
    "Requirements",
    "Schedule",
    "Selection",
    "ShapeError",
    "UnknownComponentError",
    "UnsupportedModelError",
    "build",
    "calibrate",
    "default_registry",
    "hookimpl",
    "reset_default_registry",
]
