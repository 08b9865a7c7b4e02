"""Saving and loading a policy: one safetensors file holding the tensors (learnable parameters
and frozen buffers) with the whole policy config as JSON in its metadata, so a saved NAMM is
rebuilt by name from a single, atomically written file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvpolicy.atomic import atomic_path
from kvpolicy.errors import CheckpointError, KVPolicyError
from kvpolicy.types import PolicyConfig

if TYPE_CHECKING:
    from kvpolicy.policy import Policy
    from kvpolicy.registry import Registry

FORMAT = "kvpolicy.policy/1"
PARAMS_KEY = "params"


def save_policy(policy: Policy, path: str | os.PathLike[str]) -> None:
    params = policy.get_flat()
    if params.dim() != 1:
        raise CheckpointError(
            f"the policy holds a population of {params.shape[0]} parameter sets; save one member: "
            "policy.set_flat(population[i]) first"
        )
    tensors = {PARAMS_KEY: params.contiguous()}
    tensors.update({f"buffer.{k}": v.detach().contiguous().cpu() for k, v in policy.buffers().items()})
    metadata = {"format": FORMAT, "policy": policy.to_json(), "num_params": str(policy.num_params)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_policy(path: str | os.PathLike[str], registry: Registry | None = None) -> Policy:
    from kvpolicy.policy import Policy

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no saved policy at {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt"
        ) from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a kvpolicy policy file (format {metadata.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        policy = Policy.from_config(PolicyConfig.from_json(metadata["policy"]), registry)
    except KeyError as exc:
        raise CheckpointError(f"{path} lacks the policy config in its metadata") from exc
    except KVPolicyError as exc:
        raise CheckpointError(f"{path} holds a policy that cannot be rebuilt here: {exc}") from exc
    params = tensors.get(PARAMS_KEY, torch.zeros(0))
    if params.numel() != policy.num_params:
        raise CheckpointError(
            f"{path} holds {params.numel()} parameters but its policy "
            f"({policy.scorer.name} scorer) has {policy.num_params}; the file does not match its config"
        )
    if policy.num_params:
        policy.set_flat(params)
    buffers = {k.removeprefix("buffer."): v for k, v in tensors.items() if k.startswith("buffer.")}
    parts = {"extractor": policy.extractor, "scorer": policy.scorer, "selector": policy.selector}
    for role, component in parts.items():
        own = {k.split(".", 1)[1]: v for k, v in buffers.items() if k.startswith(role + ".")}
        if own:
            if not hasattr(component, "load_state_dict"):
                raise CheckpointError(f"{path} has buffers for the {role} {component.name!r}, which keeps none")
            try:
                component.load_state_dict(own)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{path}: buffers of the {role} {component.name!r} do not match: {exc}") from exc
    return policy
