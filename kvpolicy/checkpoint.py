"""The policy file format: one safetensors file holding the tensors (learnable parameters and
frozen buffers) with the whole policy config as JSON in its metadata, so a saved NAMM is rebuilt
by name from a single, atomically written file.

A policy file can never carry code: safetensors holds raw tensor bytes and string metadata (no
pickle), and the config is plain JSON whose components are looked up by name among the loaded
plugins. The metadata also holds the sha256 of the tensor bytes (``sha256``), checked on load,
so a flipped byte in the data is a `CheckpointError` rather than silently different weights;
files written before the checksum existed (no ``sha256`` key) still load.

This module only reads and writes the format; `kvpolicy.policy.Policy` (``save``, ``load``,
``load_weights``, ``load_buffers``) is what turns a file into a policy, so the import goes one
way: policy → checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kvpolicy.atomic import atomic_path
from kvpolicy.errors import CheckpointError, KVPolicyError
from kvpolicy.types import PolicyConfig

FORMAT = "kvpolicy.policy/1"
PARAMS_KEY = "params"
CHECKSUM_KEY = "sha256"
BUFFER_PREFIX = "buffer."


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@attrs.frozen(eq=False)
class PolicyFile:
    """What a policy file holds: its metadata (the config as JSON), the flat parameters
    ``[num_params]`` and the frozen buffers keyed ``role.name`` (the layout of `Policy.buffers`);
    ``source`` names the file in errors."""

    metadata: dict[str, str]
    params: torch.Tensor
    buffers: dict[str, torch.Tensor]
    source: str

    @property
    def config(self) -> PolicyConfig:
        """The saved policy config, or a `CheckpointError` saying why it cannot be read."""
        try:
            return PolicyConfig.from_json(self.metadata["policy"])
        except KeyError as exc:
            raise CheckpointError(f"{self.source} lacks the policy config in its metadata") from exc
        except KVPolicyError as exc:
            raise CheckpointError(f"{self.source} holds a policy that cannot be rebuilt here: {exc}") from exc


def write_policy_file(
    path: str | os.PathLike[str], config_json: str, params: torch.Tensor, buffers: dict[str, torch.Tensor]
) -> None:
    """Write one policy file atomically: ``params [num_params]`` and ``buffers`` with the config."""
    tensors = {PARAMS_KEY: params.contiguous()}
    tensors.update({f"{BUFFER_PREFIX}{k}": v.detach().contiguous().cpu() for k, v in buffers.items()})
    metadata = {
        "format": FORMAT,
        "policy": config_json,
        "num_params": str(params.numel()),
        CHECKSUM_KEY: tensor_checksum(tensors),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_policy_file(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a policy file, or a `CheckpointError` saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no saved policy at {path}")
    try:
        tensors = load_file(str(path))
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


def open_policy_file(path: str | os.PathLike[str]) -> PolicyFile:
    """A policy file read and checked, its tensors split into parameters and buffers."""
    metadata, tensors = read_policy_file(path)
    params = tensors.get(PARAMS_KEY, torch.zeros(0))
    buffers = {k.removeprefix(BUFFER_PREFIX): v for k, v in tensors.items() if k.startswith(BUFFER_PREFIX)}
    return PolicyFile(metadata, params, buffers, str(path))
