"""What an optimizer searches: named parameter groups of a policy, offset from a start point.

A CMA-ES run need not search every parameter: BAM with only its linear read-out searched is a
26-dimensional problem a CPU run can afford, and a run can start from a known-good point (a
scorer equal to a reference policy, or an earlier run's result) instead of zero. `SearchSpace`
turns the optimizer's rows into full parameter vectors; `parameter_layout` names the groups.

A *subspace* searches many parameters through few numbers: ``dim`` coordinates ``z`` move the
``groups`` along ``dim`` fixed random directions (``x = P z``, ``P`` Gaussian with columns of
norm ≈ 1, drawn from ``seed``), the intrinsic-dimension device of Li et al. (2018). It is how
BAM's attention (thousands of weights) is searched by a CMA-ES that a CPU can afford: all of
``w_qkv``, ``b_qkv``, ``w_o``, ``b_o`` move, through ~200 numbers, next to the read-out searched
directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from kvpolicy.errors import InvalidConfigError
from kvpolicy.policy import Policy


@attrs.frozen
class Subspace:
    """``dim`` random directions through the parameter ``groups`` (`SearchSpace`)."""

    groups: tuple[str, ...] = attrs.field(converter=tuple)
    dim: int = attrs.field()
    seed: int = 0
    #: a random offset of this size (per weight) added to the groups' start: BAM's attention at
    #: zero changes no score to first order (its output is ``w_o``·``v``, a product of two
    #: searched weights), so a search from exactly zero sees only second-order effects
    offset: float = attrs.field(default=0.0, converter=float)

    @dim.validator
    def _check_dim(self, attribute: attrs.Attribute, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidConfigError(f"subspace.dim must be a positive count of directions, got {value!r}")

    @groups.validator
    def _check_groups(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value:
            raise InvalidConfigError('a subspace needs the parameter groups it moves, e.g. ["scorer.w_qkv"]')


class SearchSpace:
    """The part of a policy's flat parameters an optimizer searches, and where it starts.

    ``names`` are parameter groups ``role.name`` (e.g. ``scorer.w_s``: BAM's linear read-out);
    empty means every parameter (none, with a ``subspace``). ``start`` maps groups to values (a
    list, or one number for the whole group). A search row ``x`` becomes ``start`` with ``x``
    added on the searched indices; its last ``subspace.dim`` numbers move the subspace's groups.
    """

    def __init__(
        self,
        policy: Policy,
        names: tuple[str, ...],
        start: Mapping[str, Any] | str,
        subspace: Subspace | None = None,
    ) -> None:
        layout = parameter_layout(policy)
        if isinstance(start, str):
            start = _start_from_file(start, policy, layout)
        groups = subspace.groups if subspace is not None else ()
        unknown = sorted((set(names) | set(start) | set(groups)) - set(layout))
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
        if overlap := sorted(set(names) & set(groups)):
            raise InvalidConfigError(f"{', '.join(overlap)} is searched directly and through the subspace; pick one")
        if names:
            self.index = torch.cat([torch.arange(layout[n].start, layout[n].stop) for n in names])
        else:  # no group named: every parameter, unless a subspace is all that is searched
            self.index = torch.arange(0 if subspace is not None else self.full)
        self.subspace_index = torch.zeros(0, dtype=torch.long)
        self.directions = torch.zeros(0, 0)
        if subspace is not None:
            self.subspace_index = torch.cat([torch.arange(layout[n].start, layout[n].stop) for n in groups])
            generator = torch.Generator().manual_seed(subspace.seed)
            size = int(self.subspace_index.numel())
            self.directions = torch.randn(size, subspace.dim, generator=generator) / size**0.5
            if subspace.offset:
                self.start[self.subspace_index] += subspace.offset * torch.randn(size, generator=generator)

    @property
    def dim(self) -> int:
        return int(self.index.numel()) + int(self.directions.shape[1])

    def full_params(self, rows: torch.Tensor) -> torch.Tensor:
        """Search rows ``[rows, dim]`` (or ``[dim]``) as full parameter vectors ``[rows, num_params]``."""
        rows = torch.as_tensor(rows, dtype=torch.float32)
        single = rows.dim() == 1
        rows = rows.reshape(-1, self.dim)
        full = self.start.expand(rows.shape[0], -1).clone()
        direct = int(self.index.numel())
        full[:, self.index] += rows[:, :direct]
        if self.directions.numel():
            full[:, self.subspace_index] += rows[:, direct:] @ self.directions.T
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


def subspace_of(config: Any) -> Subspace | None:
    """The `Subspace` an evolution config asks for (its ``subspace`` entry), checked."""
    data = getattr(config, "subspace", None)
    if data is None:
        return None
    if not isinstance(data, Mapping) or set(data) - {"groups", "dim", "seed", "offset"}:
        raise InvalidConfigError(
            f'"subspace" takes {{"groups": [...], "dim": n, "seed": s, "offset": x}}, got {data!r}'
        )
    try:
        return Subspace(tuple(data["groups"]), data["dim"], int(data.get("seed", 0)), data.get("offset", 0.0))
    except KeyError as exc:
        raise InvalidConfigError(
            f'"subspace" needs {exc.args[0]!r}, e.g. {{"groups": ["scorer.w_qkv"], "dim": 64}}'
        ) from exc
