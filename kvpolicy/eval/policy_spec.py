"""Read a policy from the command line: ``NAME``, ``NAME:{json overrides}`` or a saved file.

``streaming_llm`` → the preset; ``h2o:{"recent": 32}`` → the preset with `kvpolicy.build`
overrides; ``path/policy.safetensors`` → a saved policy (`Policy.load`); ``path/policy.json`` →
a policy config. ``budget`` (``256``, ``0.25``, ``25%``) overrides a preset's or a saved
policy's budget (a saved NAMM keeps its parameters and calibration at any budget).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import kvpolicy
from kvpolicy.errors import InvalidConfigError
from kvpolicy.policy import Policy

_BUILD_KEYS = tuple(
    p for p in inspect.signature(kvpolicy.build).parameters if p not in ("preset_or_config", "registry")
)


def parse_policy(spec: str, budget: str | None = None) -> Policy:
    """Build the policy ``spec`` names (see the module docstring)."""
    path = Path(spec)
    if path.suffix in (".safetensors", ".json") and path.is_file():
        if path.suffix == ".json":
            policy = Policy.from_json(path.read_text(encoding="utf-8"))
        else:
            policy = Policy.load(str(path))
        # the learned parameters and calibrated buffers stay; only the cache size changes
        return policy if budget is None else policy.override(budget=budget)
    if path.suffix in (".safetensors", ".json"):
        raise InvalidConfigError(f"policy file {spec} does not exist")
    name, _, overrides_text = spec.partition(":")
    overrides = {}
    if overrides_text:
        try:
            overrides = json.loads(overrides_text)
        except json.JSONDecodeError as exc:
            raise InvalidConfigError(f"the overrides after {name}: are not valid JSON ({exc})") from exc
        if not isinstance(overrides, dict):
            raise InvalidConfigError(f'the overrides after {name}: must be a JSON object, e.g. {name}:{{"recent": 32}}')
    unknown = sorted(set(overrides) - set(_BUILD_KEYS))
    if unknown:
        raise InvalidConfigError(f"unknown override(s) {', '.join(unknown)}; accepted: {', '.join(_BUILD_KEYS)}")
    if budget is not None:
        overrides["budget"] = budget
    return kvpolicy.build(name, **overrides)


def policy_label(spec: str, budget: str | None = None) -> str:
    """A short, file-name-safe label: ``streaming_llm@256``, ``h2o_recent_32@25%``."""
    base = Path(spec).stem if Path(spec).suffix in (".safetensors", ".json") else spec
    base = re.sub(r"[^A-Za-z0-9_.%-]+", "_", base).strip("_")
    return f"{base}@{budget}" if budget is not None else base
