"""The ``mlp`` scorer: a per-token multilayer perceptron over the features, no communication
between tokens — the simpler scorer NAMM is compared with (Cetin et al., "An Evolved Universal
Transformer Memory", arXiv 2410.13166, ablations of section 5).

Its weights are a `kvpolicy.parameters.FlatParameters`: one set for the whole model, or a
population ``[batch, num_params]`` in which batch row *i* of the model is scored with parameter
row *i* (a CMA-ES generation evaluated as one batch).
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import InvalidConfigError
from kvpolicy.parameters import ParametricComponent, check_features
from kvpolicy.types import FeatureWidth, LayerView, non_negative, positive


@attrs.frozen
class MlpConfig:
    """``features``: inputs per token (25 for ``stft``); ``hidden``: width; ``depth``: hidden
    layers (0 = a linear scorer); ``activation``: ``relu``, ``gelu`` or ``tanh``."""

    features: int = attrs.field(default=25, validator=positive)
    hidden: int = attrs.field(default=32, validator=positive)
    depth: int = attrs.field(default=1, validator=non_negative)
    activation: str = attrs.field(default="relu")

    @activation.validator
    def _check_activation(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in _ACTIVATIONS:
            raise InvalidConfigError(f"MlpConfig.activation must be one of {sorted(_ACTIVATIONS)}, got {value!r}")


_ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}


class MlpScorer(ParametricComponent):
    """Score = MLP(features of one token); zero parameters ⇒ every score is 0 (nothing evicted
    by ``threshold``). `Parametric`, with population support (see `FlatParameters`)."""

    name = "mlp"
    Config = MlpConfig

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.config
        widths = [cfg.features] + [cfg.hidden] * cfg.depth + [1]
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            shapes[f"w{i}"] = (fan_in, fan_out)
            shapes[f"b{i}"] = (fan_out,)
        return shapes

    @property
    def input_width(self) -> FeatureWidth:
        return FeatureWidth.exactly(self.config.features)

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        check_features(self.label, features, self.config.features)
        x = features.float()
        p = self.params.unpack(x.shape[0], x.device, x.dtype)
        act = _ACTIVATIONS[self.config.activation]
        layers = self.config.depth + 1
        for i in range(layers):
            x = torch.einsum("bhti,bio->bhto", x, p[f"w{i}"].expand(x.shape[0], -1, -1)) + p[f"b{i}"][:, None, None]
            if i < layers - 1:
                x = act(x)
        return x.squeeze(-1)


@hookimpl
def kvpolicy_register_scorers(register) -> None:
    register("mlp", MlpScorer, description="per-token MLP over the features (NAMM ablation), population-batched")
