"""The policy file format: one safetensors file holding the tensors (learnable parameters and
frozen buffers) with the whole policy config as JSON in its metadata, so a saved NAMM is rebuilt
by name from a single, atomically written file.

A policy file can never carry code: safetensors holds raw tensor bytes and string metadata (no
pickle), and the config is plain JSON whose components are looked up by name among the loaded
plugins. The metadata also holds a sha256 (``sha256``) over the rest of the metadata (the config
included) and every tensor, checked on load, so an edited config or a flipped byte is a
`CheckpointError` rather than a silently different policy; a file without one loads only when
the caller asks for an unsigned file explicitly (``allow_unsigned=True``). ``model`` records the
model the policy was made for (`ModelRecord`), so attaching it elsewhere can say so.

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

FORMAT = "kvpolicy.policy/2"
PARAMS_KEY = "params"
CHECKSUM_KEY = "sha256"
MODEL_KEY = "model"
BUFFER_PREFIX = "buffer."


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (all but the checksum itself, as sorted JSON) and `tensor_checksum`."""
    fields = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    text = json.dumps(fields, sort_keys=True) + "\0" + tensor_checksum(tensors)
    return hashlib.sha256(text.encode()).hexdigest()


@attrs.frozen
class ModelRecord:
    """The model a policy was made for (evolved or calibrated on): what a transfer changes."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelRecord:
        try:
            data = json.loads(text)
            record = cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise CheckpointError(f"{source} has an unreadable model record {text!r}: {exc}") from exc
        if not isinstance(record.name, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0
            for v in (record.layers, record.kv_heads, record.head_dim)
        ):
            raise CheckpointError(f"{source} has an invalid model record {text!r}")
        return record

    def describe(self) -> str:
        return f"{self.name} ({self.layers} layers, {self.kv_heads} KV heads, head dim {self.head_dim})"


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

    @property
    def model(self) -> ModelRecord | None:
        """The model the policy was made for, when the file records one."""
        text = self.metadata.get(MODEL_KEY)
        return None if text is None else ModelRecord.from_json(text, self.source)


def write_policy_file(
    path: str | os.PathLike[str],
    config_json: str,
    params: torch.Tensor,
    buffers: dict[str, torch.Tensor],
    model: ModelRecord | None = None,
) -> None:
    """Write one policy file atomically: ``params [num_params]`` and ``buffers`` with the config
    and the model it was made for, signed by `file_checksum`."""
    tensors = {PARAMS_KEY: params.contiguous()}
    tensors.update({f"{BUFFER_PREFIX}{k}": v.detach().contiguous().cpu() for k, v in buffers.items()})
    metadata = {"format": FORMAT, "policy": config_json, "num_params": str(params.numel())}
    if model is not None:
        metadata[MODEL_KEY] = model.to_json()
    metadata[CHECKSUM_KEY] = file_checksum(metadata, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_tagged_metadata(path: str | os.PathLike[str], fmt: str, what: str, missing: str = "") -> dict[str, str]:
    """The safetensors metadata of a kvpolicy model file whose ``"format"`` is ``fmt`` (the Decision
    Transformer's, the digit-video model's), or a `CheckpointError` naming what is wrong: no file
    (``missing`` says how to make one), an unreadable one, or another format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {what} at {path}{missing}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt"
        ) from exc
    if metadata.get("format") != fmt:
        raise CheckpointError(f"{path} is not a kvpolicy {what} (format {metadata.get('format')!r})")
    return metadata


def read_policy_file(
    path: str | os.PathLike[str], *, allow_unsigned: bool = False
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a policy file, or a `CheckpointError` saying what is wrong with
    it; a file without a checksum only with ``allow_unsigned``."""
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
            f"{path} is not a kvpolicy policy file of this version (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r}); save the policy again with this kvpolicy"
        )
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None:
        if not allow_unsigned:
            raise CheckpointError(
                f"{path} carries no checksum, so nothing shows whether its config or weights were changed; "
                "load it with allow_unsigned=True if you trust it"
            )
    elif file_checksum(metadata, tensors) != expected:
        raise CheckpointError(
            f"{path} was changed after it was saved: its config or tensors do not match the sha256 recorded then"
        )
    return metadata, tensors


def open_policy_file(path: str | os.PathLike[str], *, allow_unsigned: bool = False) -> PolicyFile:
    """A policy file read and checked, its tensors split into parameters and buffers."""
    metadata, tensors = read_policy_file(path, allow_unsigned=allow_unsigned)
    params = tensors.get(PARAMS_KEY, torch.zeros(0))
    buffers = {k.removeprefix(BUFFER_PREFIX): v for k, v in tensors.items() if k.startswith(BUFFER_PREFIX)}
    return PolicyFile(metadata, params, buffers, str(path))
