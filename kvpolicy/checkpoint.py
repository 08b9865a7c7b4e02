"""Saving and loading a policy: one safetensors file holding the tensors (learnable parameters
and frozen buffers) with the whole policy config as JSON in its metadata, so a saved NAMM is
rebuilt by name from a single, atomically written file.

A policy file can never carry code: safetensors holds raw tensor bytes and string metadata (no
pickle), and the config is plain JSON whose components are looked up by name among the loaded
plugins. The metadata also holds the sha256 of the tensor bytes (``sha256``), checked on load,
so a flipped byte in the data is a `CheckpointError` rather than silently different weights;
files written before the checksum existed (no ``sha256`` key) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
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
CHECKSUM_KEY = "sha256"


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_policy(policy: Policy, path: str | os.PathLike[str]) -> None:
    params = policy.get_flat()
    if params.dim() != 1:
        raise CheckpointError(
            f"the policy holds a population of {params.shape[0]} parameter sets; save one member: "
            "policy.set_flat(population[i]) first"
        )
    tensors = {PARAMS_KEY: params.contiguous()}
    tensors.update({f"buffer.{k}": v.detach().contiguous().cpu() for k, v in policy.buffers().items()})
    metadata = {
        "format": FORMAT,
        "policy": policy.to_json(),
        "num_params": str(policy.num_params),
        CHECKSUM_KEY: tensor_checksum(tensors),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_policy(path: str | os.PathLike[str], registry: Registry | None = None) -> Policy:
    from kvpolicy.policy import Policy

    metadata, tensors = read_policy_file(path)
    try:
        policy = Policy.from_config(PolicyConfig.from_json(metadata["policy"]), registry)
    except KeyError as exc:
        raise CheckpointError(f"{path} lacks the policy config in its metadata") from exc
    except KVPolicyError as exc:
        raise CheckpointError(f"{path} holds a policy that cannot be rebuilt here: {exc}") from exc
    install_weights(policy, tensors, str(path))
    return policy


def read_policy_file(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a policy file, or a `CheckpointError` saying what is wrong with it."""
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
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensor_checksum(tensors) != expected:
        raise CheckpointError(
            f"{path} is corrupt: its tensor data does not match the sha256 recorded when it was saved"
        )
    return metadata, tensors


def install_weights(policy: Policy, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Set ``policy``'s parameters and frozen buffers from the tensors of a policy file."""
    params = tensors.get(PARAMS_KEY, torch.zeros(0))
    if params.numel() != policy.num_params:
        raise CheckpointError(
            f"{source} holds {params.numel()} parameters but its policy "
            f"({policy.scorer.name} scorer) has {policy.num_params}; the file does not match its config"
        )
    if policy.num_params:
        policy.set_flat(params)
    buffers = {k.removeprefix("buffer."): v for k, v in tensors.items() if k.startswith("buffer.")}
    install_buffers(policy, buffers, source)


def install_buffers(policy: Policy, buffers: Mapping[str, torch.Tensor], source: str) -> None:
    """Give each component its frozen buffers, keyed ``role.name`` (the layout of `Policy.buffers`):
    a policy file's, or the calibration an evolution run ships to its workers."""
    for role, component in policy.components().items():
        own = {k.split(".", 1)[1]: v for k, v in buffers.items() if k.startswith(role + ".")}
        if own:
            if not hasattr(component, "load_state_dict"):
                raise CheckpointError(f"{source} has buffers for the {role} {component.name!r}, which keeps none")
            try:
                component.load_state_dict(own)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise CheckpointError(
                    f"{source}: buffers of the {role} {component.name!r} do not match: {exc}"
                ) from exc


def load_weights(policy: Policy, path: str | os.PathLike[str]) -> None:
    """Give ``policy`` the parameters and buffers saved in the policy file ``path`` (a preset's
    shipped weights); its own config (budget, pooler, …) is kept."""
    _, tensors = read_policy_file(path)
    install_weights(policy, tensors, str(path))
