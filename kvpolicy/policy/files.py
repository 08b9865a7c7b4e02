"""A policy's file: config, parameters and buffers in one signed safetensors file
(`kvpolicy.checkpoint`), with the model they were made for; the `Policy` methods that write and
read it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from kvpolicy.checkpoint import ModelRecord, PolicyFile, open_policy_file, write_policy_file
from kvpolicy.errors import CheckpointError, KVPolicyError
from kvpolicy.registry import Registry
from kvpolicy.types import Stateful

if TYPE_CHECKING:
    from kvpolicy.policy.policy import Policy


class PolicyFiles:
    """Saving and loading, mixed into `Policy` (which provides the components and parameters)."""

    made_for: ModelRecord | None
    transfer: bool

    def save(self, path: str | os.PathLike[str], *, made_for: ModelRecord | None = None) -> None:
        """Write config, parameters and buffers to one signed safetensors file, atomically, with
        the model they were made for (``made_for``, else `made_for` as loaded)."""
        policy: Any = self
        params = policy.get_flat()
        if params.dim() != 1:
            raise CheckpointError(
                f"the policy holds a population of {params.shape[0]} parameter sets; save one member: "
                "policy.set_flat(population[i]) first"
            )
        write_policy_file(path, policy.to_json(), params, policy.buffers(), made_for or self.made_for)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        registry: Registry | None = None,
        *,
        allow_unsigned: bool = False,
        transfer: bool = False,
    ) -> Policy:
        """The policy saved at ``path`` (`save`), with its parameters and buffers. A file without
        a checksum loads only with ``allow_unsigned``; ``transfer`` chooses zero-shot transfer
        (`transfer`)."""
        saved = open_policy_file(path, allow_unsigned=allow_unsigned)
        try:
            policy: Any = cls.from_config(saved.config, registry)  # type: ignore[attr-defined]
        except CheckpointError:
            raise
        except KVPolicyError as exc:
            raise CheckpointError(f"{path} holds a policy that cannot be rebuilt here: {exc}") from exc
        policy.load_weights(saved)
        policy.transfer = transfer
        return policy

    def load_weights(self, saved: PolicyFile | str | os.PathLike[str]) -> None:
        """Take the parameters and buffers of a policy file (or its path), keeping this policy's
        own config (budget, pooler, …): how a preset starts with its shipped weights."""
        policy: Any = self
        if not isinstance(saved, PolicyFile):
            saved = open_policy_file(saved)
        if saved.params.numel() != policy.num_params:
            raise CheckpointError(
                f"{saved.source} holds {saved.params.numel()} parameters but its policy "
                f"({policy.scorer.name} scorer) has {policy.num_params}; the file does not match its config"
            )
        if policy.num_params:
            policy.set_flat(saved.params)
        self.load_buffers(saved.buffers, saved.source)
        self.made_for = saved.model

    def load_buffers(self, buffers: Mapping[str, torch.Tensor], source: str) -> None:
        """Give each component its frozen buffers, keyed ``role.name`` (the layout of `buffers`):
        a policy file's, or the calibration an evolution run ships to its workers. ``source``
        names where they come from in errors."""
        policy: Any = self
        for role, component in policy.components().items():
            own = {k.split(".", 1)[1]: v for k, v in buffers.items() if k.startswith(role + ".")}
            if not own:
                continue
            if not isinstance(component, Stateful):
                raise CheckpointError(f"{source} has buffers for the {role} {component.name!r}, which keeps none")
            try:
                component.load_state_dict(own)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise CheckpointError(
                    f"{source}: buffers of the {role} {component.name!r} do not match: {exc}"
                ) from exc
