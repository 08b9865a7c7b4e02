"""What a conformance check runs on (`Target`), the check itself (`Check`) and its failure (`ConformanceError`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpolicy.errors import KVPolicyError
from kvpolicy.registry import Registry

TargetKind = str  # "extractor" | "scorer" | "pooler" | "selector" | "optimizer" | "preset"


class ConformanceError(AssertionError):
    """A component or preset failed a conformance check; the message names both."""


@attrs.frozen
class Target:
    """What a check runs on: a registered (or hand-made) component, or a preset.

    ``make()`` returns a fresh object each call (components may keep state between calls).
    ``options`` tune checks: ``score_order`` (bool) overrides the selector's declaration,
    ``extractor`` gives a scorer its feature source.
    """

    kind: TargetKind
    name: str
    make: Callable[[], Any] = attrs.field(eq=False)
    registry: Registry = attrs.field(eq=False, repr=False)
    options: Mapping[str, Any] = attrs.field(factory=dict, eq=False)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    def __str__(self) -> str:
        return self.id


@attrs.frozen
class Check:
    """One named check; calling it runs it on a target and raises `ConformanceError` on failure."""

    name: str
    run: Callable[[Target], None] = attrs.field(repr=False)

    def __call__(self, target: Target) -> None:
        try:
            self.run(target)
        except ConformanceError:
            raise
        except KVPolicyError as exc:
            raise ConformanceError(f"{target}: check {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        except AssertionError as exc:
            raise ConformanceError(f"{target}: check {self.name!r} failed: {exc}") from exc

    def __str__(self) -> str:
        return self.name


def _fail(target: Target, check: str, message: str) -> None:
    raise ConformanceError(f"{target}: check {check!r} failed: {message}")


def _for_all(strategy: st.SearchStrategy, body: Callable[[Any], None]) -> None:
    """Run ``body`` on examples of ``strategy`` under the loaded hypothesis profile."""
    given(strategy)(body)()


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool = False) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if exact or not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
