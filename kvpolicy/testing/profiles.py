"""Hypothesis settings profiles for kvpolicy's kit: ``ci`` (derandomised, bounded, no deadline),
``dev`` (random, more examples) and ``deep`` (random, many more: a long run outside CI that looks
for what the bounded ones miss). `load_profile` picks ``$KVPOLICY_HYPOTHESIS`` when set, else
``ci`` when ``$CI`` is set (a CI run is reproducible and bounded in time), else ``dev``.

Tests whose examples each cost much more than a plain property (a state machine runs a model at
every step; a fuzzed command line builds a policy) take their counts from `examples` and
`machine_examples`, which scale with the loaded profile, rather than fixing a number in code.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI_PROFILE = "ci"
DEV_PROFILE = "dev"
DEEP_PROFILE = "deep"
PROFILE_ENV = "KVPOLICY_HYPOTHESIS"

_SLOW_IS_EXPECTED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
#: how many times a test's own base count each profile runs (`examples`)
_SCALE = {CI_PROFILE: 1, DEV_PROFILE: 1, DEEP_PROFILE: 10}
#: examples of a cache state machine per profile (each example runs a model for several steps)
_MACHINE_EXAMPLES = {CI_PROFILE: 6, DEV_PROFILE: 10, DEEP_PROFILE: 100}
_loaded = DEV_PROFILE


def register_profiles() -> None:
    """Register ``ci``, ``dev`` and ``deep``; safe to call more than once."""
    settings.register_profile(
        CI_PROFILE,
        derandomize=True,
        max_examples=20,
        deadline=None,
        print_blob=True,
        suppress_health_check=_SLOW_IS_EXPECTED,
    )
    settings.register_profile(DEV_PROFILE, max_examples=100, deadline=None, suppress_health_check=_SLOW_IS_EXPECTED)
    settings.register_profile(
        DEEP_PROFILE, max_examples=1000, deadline=None, print_blob=True, suppress_health_check=_SLOW_IS_EXPECTED
    )


def load_profile(name: str | None = None) -> str:
    """Load ``name``, or ``$KVPOLICY_HYPOTHESIS``, or ``ci`` when ``$CI`` is set, or ``dev``;
    returns the name loaded."""
    global _loaded
    register_profiles()
    chosen = name or os.environ.get(PROFILE_ENV, "").strip() or (CI_PROFILE if os.environ.get("CI") else DEV_PROFILE)
    if chosen not in _SCALE:
        raise ValueError(f"{PROFILE_ENV} must be one of {', '.join(_SCALE)}, got {chosen!r}")
    settings.load_profile(chosen)
    _loaded = chosen
    return chosen


def loaded_profile() -> str:
    return _loaded


def examples(base: int) -> int:
    """``base`` examples under ``ci`` and ``dev``, ten times as many under ``deep``."""
    return base * _SCALE[_loaded]


def machine_examples() -> int:
    """Examples of a cache state machine under the loaded profile."""
    return _MACHINE_EXAMPLES[_loaded]
