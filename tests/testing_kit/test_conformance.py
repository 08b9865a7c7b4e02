"""Every registered component and preset (built-ins and installed plugins) through the kit's
conformance checks. The matrix grows with the registry: a new plugin is covered unedited."""

from __future__ import annotations

from kvpolicy.testing import parametrize_with_checks

#: checks that need options: TOVA averages over heads (so its heads evict together), H2O's
#: heavy_recent keeps a recent window by position, not by score.
OPTIONS = {
    "scorer:tova": {"aligned_heads": True},
    "preset:tova": {"aligned_heads": True},
    "selector:heavy_recent": {"score_order": False},
    "preset:h2o": {"score_order": False},
}

#: known defects the kit found; strict xfails, so a fix shows up as an unexpected pass
KNOWN_DEFECTS = {
    "selector:heavy_recent": {
        "protection_beats_pinned_scores": "protected tokens are keyed +inf and tie with +inf scores"
    },
    "selector:head_threshold": {
        "protection_beats_pinned_scores": "protected tokens are keyed +inf and tie with +inf scores"
    },
}


@parametrize_with_checks(options=OPTIONS, expected_failures=KNOWN_DEFECTS)
def test_builtin_conformance(target, check):
    check(target)
