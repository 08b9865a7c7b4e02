"""kvpolicy's testing kit: hypothesis strategies, a state machine driving a real evicting cache,
and conformance checks for every component and preset — the same checks kvpolicy runs on its
built-ins, shipped so a plugin author runs them on theirs (see docs/testing.md).

Imports are lazy where they pull in transformers (`machine`), so strategies and component
checks stay light.
"""

from kvpolicy.testing.conformance import (
    Check,
    ConformanceError,
    Target,
    all_checks,
    check_component,
    parametrize_with_checks,
    targets,
)
from kvpolicy.testing.invariants import InvariantViolation, keeps_highest_scores, selection_violations
from kvpolicy.testing.profiles import (
    CI_PROFILE,
    DEEP_PROFILE,
    DEV_PROFILE,
    examples,
    load_profile,
    machine_examples,
    register_profiles,
)

__all__ = [
    "CI_PROFILE",
    "DEEP_PROFILE",
    "DEV_PROFILE",
    "Check",
    "ConformanceError",
    "InvariantViolation",
    "Target",
    "all_checks",
    "check_component",
    "examples",
    "keeps_highest_scores",
    "load_profile",
    "machine_examples",
    "parametrize_with_checks",
    "register_profiles",
    "selection_violations",
    "targets",
]
