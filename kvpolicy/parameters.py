"""Learnable parameters as one flat vector, for any `Parametric` component (tier 0).

Optimizers search a flat vector; components want named tensors. `FlatParameters` keeps both
views of one parameter set, or of a population ``[members, num_params]`` in which batch row *i*
of the model uses parameter row *i* (a CMA-ES generation evaluated as one batch). Shared here so
every scorer with weights, a third party's included, treats populations the same way.
"""

from __future__ import annotations

import torch

from kvpolicy.errors import ShapeError
from kvpolicy.types.base import ComponentBase


class FlatParameters:
    """Named weight tensors stored as one flat vector ``[members, num_params]`` (zeros at first).

    ``members`` is 1 for a single set (shared by every batch row) or the model's batch size for a
    population. `unpack` returns each named tensor as ``[members, *shape]`` on the wanted device.
    """

    def __init__(self, owner: str, shapes: dict[str, tuple[int, ...]]) -> None:
        self.owner = owner
        self.shapes = dict(shapes)
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes.values()]
        self.num_params = sum(self.sizes)
        self.values = torch.zeros(1, self.num_params)
        self._moved: tuple[torch.device, torch.dtype, dict[str, torch.Tensor]] | None = None

    @property
    def members(self) -> int:
        return self.values.shape[0]

    def get_flat(self) -> torch.Tensor:
        """``[num_params]`` for a single set, ``[members, num_params]`` for a population."""
        flat = self.values.clone()
        return flat[0] if self.members == 1 else flat

    def set_flat(self, vector: torch.Tensor) -> None:
        vector = torch.as_tensor(vector).detach()
        if not vector.is_floating_point() or vector.dim() not in (1, 2) or vector.shape[-1] != self.num_params:
            raise ShapeError(
                f"{self.owner} has {self.num_params} parameters; expected a float vector [{self.num_params}] or a "
                f"population [members, {self.num_params}], got {tuple(vector.shape)} ({vector.dtype})"
            )
        if vector.dim() == 2 and vector.shape[0] == 0:
            raise ShapeError(f"{self.owner}: a population needs at least one member, got {tuple(vector.shape)}")
        if not torch.isfinite(vector).all():
            raise ShapeError(f"{self.owner}: parameters must be finite; got NaN or infinity")
        self.values = vector.to(device="cpu", dtype=torch.float32).reshape(-1, self.num_params).clone()
        self._moved = None

    def unpack(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Each named tensor as ``[members, *shape]``, checking the population fits ``batch`` rows."""
        if self.members not in (1, batch):
            raise ShapeError(
                f"{self.owner} holds a population of {self.members} parameter sets but the model runs a batch of "
                f"{batch}; batch row i uses parameter row i, so give one set or exactly {batch}"
            )
        if self._moved is None or self._moved[0] != device or self._moved[1] != dtype:
            values = self.values.to(device=device, dtype=dtype)
            parts = torch.split(values, self.sizes, dim=-1)
            named = {n: p.reshape(self.members, *s) for (n, s), p in zip(self.shapes.items(), parts, strict=True)}
            self._moved = (device, dtype, named)
        return self._moved[2]


def check_features(owner: str, features: torch.Tensor, expected: int) -> None:
    """Raise a `ShapeError` naming ``owner`` unless features are ``[batch, kv_heads, tokens, expected]``."""
    if features.dim() != 4 or features.shape[-1] != expected:
        raise ShapeError(
            f"{owner} expects features [batch, kv_heads, tokens, {expected}], got {tuple(features.shape)}; "
            f"set its `features` config to the extractor's feature count"
        )


class ParametricComponent(ComponentBase):
    """A component with learnable weights: it declares their shapes (`parameter_shapes`) and
    reads them with ``self.params.unpack(batch, device, dtype)``; the `kvpolicy.types.Parametric`
    methods (``num_params``, ``get_flat``, ``set_flat``) come with it, so every component with
    weights, a third party's included, treats populations the same way."""

    params: FlatParameters

    def setup(self) -> None:
        self.params = FlatParameters(self.label, self.parameter_shapes())

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every weight tensor, in the order of the flat vector."""
        raise NotImplementedError(f"{type(self).__name__} must define parameter_shapes()")

    @property
    def num_params(self) -> int:
        return self.params.num_params

    def get_flat(self) -> torch.Tensor:
        return self.params.get_flat()

    def set_flat(self, vector: torch.Tensor) -> None:
        self.params.set_flat(vector)
