"""Reading a policy spec: the one place where what a user names becomes the base of a policy.

A spec is any of

- a preset name, ``"h2o"`` (its config, and its shipped weights if it has any);
- a preset name with overrides as JSON, ``'h2o:{"recent": 32}'`` (the command line's form);
- a `PolicyConfig`, or its dict (``{"extractor": ..., "scorer": ..., "selector": ...}``);
- a mapping naming a preset with overrides, ``{"preset": "namm-bam", "every": 256}``
  (an evolution config's form);
- a path: ``*.json`` holds a `PolicyConfig`, or a mapping naming a preset with overrides (a
  preset's variant kept in a file, whose name then labels its results); ``*.safetensors`` is a
  saved policy (`Policy.save`), whose learned parameters and frozen buffers the policy starts with.

`read_spec` only reads; `kvpolicy.build` merges the overrides (the spec's, then the caller's)
into the base and builds the policy, so the API, ``kvpolicy eval``, ``compare``, ``run`` and
``evolve`` read every spec the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from kvpolicy.checkpoint import PolicyFile, open_policy_file
from kvpolicy.errors import InvalidConfigError
from kvpolicy.registry import Registry
from kvpolicy.types import PolicyConfig

#: file suffixes a spec string may end with: a saved policy, or a policy config as JSON
SAVED_SUFFIX, CONFIG_SUFFIX = ".safetensors", ".json"
#: the key of a mapping that names a preset (the rest of the mapping are overrides)
PRESET_KEY = "preset"

PolicySpec = str | os.PathLike | PolicyConfig | Mapping[str, Any]


@attrs.frozen(eq=False)
class PolicySource:
    """What a spec names: the base ``config``; the ``weights`` the policy starts with (a policy
    file already read, the path of a preset's shipped file, or None); and the ``overrides`` the
    spec itself carries (``name:{json}``, or the rest of a ``{"preset": ...}`` mapping)."""

    config: PolicyConfig
    weights: PolicyFile | str | None = None
    overrides: Mapping[str, Any] = attrs.field(factory=dict)


def is_policy_file(spec: Any) -> bool:
    """Whether ``spec`` names a file (a path, or a string ending in .json / .safetensors)."""
    if isinstance(spec, os.PathLike):
        return True
    return isinstance(spec, str) and Path(spec).suffix in (SAVED_SUFFIX, CONFIG_SUFFIX)


def read_spec(spec: PolicySpec, registry: Registry) -> PolicySource:
    """The base of the policy ``spec`` names (see the module docstring)."""
    if isinstance(spec, PolicyConfig):
        return PolicySource(spec)
    if is_policy_file(spec):
        return _read_file(Path(spec), registry)
    if isinstance(spec, str):
        name, colon, text = spec.partition(":")
        source = _read_preset(name, registry)
        return attrs.evolve(source, overrides=_json_overrides(name, text) if colon else {})
    if isinstance(spec, Mapping):
        if PRESET_KEY in spec:
            source = _read_preset(spec[PRESET_KEY], registry)
            return attrs.evolve(source, overrides={k: v for k, v in spec.items() if k != PRESET_KEY})
        return PolicySource(PolicyConfig.from_dict(spec))
    raise InvalidConfigError(
        "a policy is named by a preset name, 'name:{json overrides}', a PolicyConfig or its dict, "
        f"{{'preset': name, ...overrides}}, or a .json / .safetensors file; got {spec!r}"
    )


def _read_preset(name: Any, registry: Registry) -> PolicySource:
    preset = registry.preset(name)
    return PolicySource(preset.config, preset.weights)


def _read_file(path: Path, registry: Registry) -> PolicySource:
    if not path.is_file():
        raise InvalidConfigError(f"policy file {path} does not exist")
    if path.suffix == SAVED_SUFFIX:
        saved = open_policy_file(path)
        return PolicySource(saved.config, saved)
    text = path.read_bytes()
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        data = None  # PolicyConfig.from_json names the problem
    if isinstance(data, dict) and PRESET_KEY in data:
        return read_spec(data, registry)
    return PolicySource(PolicyConfig.from_json(text))


def _json_overrides(name: str, text: str) -> dict[str, Any]:
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidConfigError(f"the overrides after {name}: are not valid JSON ({exc})") from exc
    if not isinstance(overrides, dict):
        raise InvalidConfigError(f'the overrides after {name}: must be a JSON object, e.g. {name}:{{"recent": 32}}')
    return overrides
