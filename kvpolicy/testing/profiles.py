"""Hypothesis settings profiles for kvpolicy's kit: ``ci`` (derandomised, bounded, no deadline)
and ``dev`` (random, more examples). `load_profile` picks ``ci`` when the environment variable
``CI`` is set, so a CI run is reproducible and bounded in time."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI_PROFILE = "ci"
DEV_PROFILE = "dev"

_SLOW_IS_EXPECTED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def register_profiles() -> None:
    """Register ``ci`` and ``dev``; safe to call more than once."""
    settings.register_profile(
        CI_PROFILE,
        derandomize=True,
        max_examples=20,
        deadline=None,
        print_blob=True,
        suppress_health_check=_SLOW_IS_EXPECTED,
    )
    settings.register_profile(DEV_PROFILE, max_examples=100, deadline=None, suppress_health_check=_SLOW_IS_EXPECTED)


def load_profile(name: str | None = None) -> str:
    """Load ``name``, or ``ci`` when ``$CI`` is set and ``dev`` otherwise; returns the name loaded."""
    register_profiles()
    chosen = name or (CI_PROFILE if os.environ.get("CI") else DEV_PROFILE)
    settings.load_profile(chosen)
    return chosen
