"""What an optimizer searches: named parameter groups of a policy, offset from a start point.

A CMA-ES run need not search every parameter: BAM with only its linear read-out searched is a
26-dimensional problem a CPU run can afford, and a run can start from a known-good point (a
scorer equal to a reference policy, or an earlier run's result) instead of zero. `SearchSpace`
turns the optimizer's rows into full parameter vectors; `parameter_layout` names the groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvpolicy.errors import InvalidConfigError
from kvpolicy.policy import Policy


class SearchSpace:
    """The part of a policy's flat parameters an optimizer searches, and where it starts.

    ``names`` are parameter groups ``role.name`` (e.g. ``scorer.w_s``: BAM's linear read-out);
    empty means every parameter. ``start`` maps groups to values (a list, or one number for the
    whole group). A search row ``x`` becomes ``start`` with ``x`` added on the searched indices.
    """

    def __init__(self, policy: Policy, names: tuple[str, ...], start: Mapping[str, Any] | str) -> None:
        layout = parameter_layout(policy)
        if isinstance(start, str):
            start = _start_from_file(start, policy, layout)
        unknown = sorted((set(names) | set(start)) - set(layout))
        if unknown:
            raise InvalidConfigError(
                f"unknown parameter group(s) {', '.join(unknown)}; this policy has {', '.join(layout)}"
            )
        self.full = policy.num_params
        self.start = torch.zeros(self.full)
        for name, value in start.items():
            part = layout[name]
            values = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            if values.numel() == 1:
                values = values.expand(part.stop - part.start)
            if values.numel() != part.stop - part.start:
                raise InvalidConfigError(
                    f"start value for {name} has {values.numel()} numbers; the group has {part.stop - part.start}"
                )
            self.start[part] = values
        index = [torch.arange(layout[n].start, layout[n].stop) for n in names] or [torch.arange(self.full)]
        self.index = torch.cat(index)

    @property
    def dim(self) -> int:
        return int(self.index.numel())

    def full_params(self, rows: torch.Tensor) -> torch.Tensor:
        """Search rows ``[rows, dim]`` (or ``[dim]``) as full parameter vectors ``[rows, num_params]``."""
        rows = torch.as_tensor(rows, dtype=torch.float32)
        single = rows.dim() == 1
        rows = rows.reshape(-1, self.dim)
        full = self.start.expand(rows.shape[0], -1).clone()
        full[:, self.index] += rows
        return full[0] if single else full


def _start_from_file(path: str, policy: Policy, layout: dict[str, slice]) -> dict[str, Any]:
    """The named parameter groups of a saved policy (e.g. an earlier stage's result), checked to fit."""
    saved = Policy.load(path)
    if saved.num_params != policy.num_params or parameter_layout(saved).keys() != layout.keys():
        raise InvalidConfigError(
            f"start file {path} holds a {saved.scorer.name} scorer with {saved.num_params} parameters; "
            f"the evolved policy's {policy.scorer.name} has {policy.num_params}"
        )
    flat = saved.get_flat()
    return {name: flat[part].tolist() for name, part in layout.items()}


def parameter_layout(policy: Policy) -> dict[str, slice]:
    """Flat-vector slice of every named parameter group, ``role.name`` (the order of `Policy.get_flat`)."""
    layout: dict[str, slice] = {}
    offset = 0
    for role, component in policy.parametric().items():
        params = getattr(component, "params", None)
        shapes = getattr(params, "shapes", None) or {"all": (component.num_params,)}
        for name, shape in shapes.items():
            size = int(torch.Size(shape).numel())
            layout[f"{role}.{name}"] = slice(offset, offset + size)
            offset += size
    return layout
