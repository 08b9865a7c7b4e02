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
# Checks a built-in is known to fail, as {target id: {check: reason}}; each runs as a strict
# xfail, so fixing the defect turns it into a failure until its entry is removed.
KNOWN_DEFECTS: dict[str, dict[str, str]] = {}


@parametrize_with_checks(options=OPTIONS, expected_failures=KNOWN_DEFECTS)
def test_builtin_conformance(target, check):
    check(target)
