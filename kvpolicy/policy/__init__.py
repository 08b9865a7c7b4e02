"""The policy (tier 2): `Policy` (`policy`), `build` from a spec with overrides (`builder`), the
checks a policy runs on itself and its components (`checks`), and turning names into components
(`components`)."""

from kvpolicy.policy.builder import OVERRIDES, build
from kvpolicy.policy.components import ComponentLike
from kvpolicy.policy.policy import Policy

__all__ = ["OVERRIDES", "ComponentLike", "Policy", "build"]
