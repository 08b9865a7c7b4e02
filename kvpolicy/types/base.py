"""What a component subclasses so that it is its own code (``extract`` / ``score`` / ``pool`` /
``select``) plus what it declares, with none of the plumbing::

    class NegatedScorer(ComponentBase):
        name = "negated"
        input_width = FeatureWidth.at_least(1)

        def score(self, features, view):
            return -features[..., 0].float()

`ComponentBase` takes the config (an instance of the class's ``Config``, built from its defaults
when none is given), declares that the component needs nothing from the forward pass and calls
`ComponentBase.setup`, where a component derives whatever it keeps from its config. A component
with frozen tensors saved with the policy (`Stateful`) subclasses `BufferedComponent`; one with
learnable weights, `kvpolicy.parameters.ParametricComponent`.

Subclassing is a convenience, not the contract: the protocols of `kvpolicy.types.components` are,
so a class that implements them by hand works the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from kvpolicy.errors import ShapeError
from kvpolicy.types.components import Requirements
from kvpolicy.types.configs import EmptyConfig

#: the method that tells each kind apart, in the order `ComponentBase.label` tries them
_KIND_METHODS = (("selector", "select"), ("scorer", "score"), ("pooler", "pool"), ("extractor", "extract"))


class ComponentBase:
    """A component's config handling and default declarations.

    Class attributes to set: ``name`` (the registered name), ``Config`` (a frozen attrs class;
    `EmptyConfig` by default) and, when they apply, ``requirements``, ``num_features``,
    ``input_width`` and the `Capabilities` flags. A declaration that depends on the config is a
    property instead (``Requirements(attention_window=self.config.window_size)``).
    """

    name: ClassVar[str]
    Config: ClassVar[type] = EmptyConfig
    #: what the forward pass must compute for this component (nothing but positions by default)
    requirements: ClassVar[Requirements] = Requirements()

    def __init__(self, config: Any = None) -> None:
        self.config = self.Config() if config is None else config
        self.setup()

    def setup(self) -> None:
        """Derive what the component keeps from ``self.config`` (tables, tensors); nothing by default."""

    @property
    def label(self) -> str:
        """How errors name the component: ``scorer 'tova'``."""
        kind = next((kind for kind, method in _KIND_METHODS if callable(getattr(self, method, None))), "component")
        return f"{kind} {self.name!r}"

    def read_feature(self, features: torch.Tensor, index: int, meaning: str = "") -> torch.Tensor:
        """Feature ``index`` of ``features`` as float32 ``[batch, kv_heads, tokens]``, or a
        `ShapeError` naming this component when there is no such column."""
        if features.dim() != 4 or features.shape[-1] <= index:
            what = f" ({meaning})" if meaning else ""
            raise ShapeError(
                f"{self.label} reads feature {index}{what} of features [batch, kv_heads, tokens, features], "
                f"got {tuple(features.shape)}"
            )
        return features[..., index].float()


class BufferedComponent(ComponentBase):
    """A `Stateful` component: frozen tensors (e.g. calibrated statistics) in ``self.buffers``,
    saved with the policy by `state_dict` and restored by `load_state_dict`, which checks their
    names and shapes so a file made for another config is an error rather than wrong features."""

    buffers: dict[str, torch.Tensor]

    def setup(self) -> None:
        self.buffers = self.initial_buffers()

    def initial_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers a fresh component starts with; their shapes and dtypes are the ones loaded."""
        raise NotImplementedError(f"{type(self).__name__} must define initial_buffers()")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.clone() for key, value in self.buffers.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.buffers) - set(state))
        if missing:
            raise KeyError(f"{self.label} buffers lack {missing}; expected {', '.join(self.buffers)}")
        for key, current in self.buffers.items():
            if tuple(state[key].shape) != tuple(current.shape):
                raise ValueError(
                    f"{self.label} buffer {key!r} has shape {tuple(state[key].shape)}, expected "
                    f"{tuple(current.shape)} for its config {self.config}"
                )
        self.buffers = {
            key: state[key].detach().to(dtype=current.dtype, device="cpu").clone()
            for key, current in self.buffers.items()
        }
