"""TOVA, Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs", 2024).

At every step, once the cache is over budget, TOVA drops the tokens the current (newest) query
attends to least. The paper averages that attention over all heads of the layer, so every head
of a layer keeps the same tokens. With grouped-query attention each KV head's row is already the
mean over its query-head group (the integration's GQA averaging); groups have equal size, so the
mean over KV heads is exactly the mean over all query heads of the layer, as in the paper.
Should a layer's heads hold different tokens (after a per-head policy), the mean is taken per
absolute position, a head that no longer holds a position contributing no attention to it.

Components: extractor ``last_query_attention`` → scorer ``tova`` → selector ``top_k``; the
preset evicts at every forward call (``every_step``, no slack), during prefill too, where the
last query of each chunk decides.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import ShapeError
from kvpolicy.types import (
    Budget,
    ComponentRef,
    EmptyConfig,
    FeatureWidth,
    LayerView,
    PolicyConfig,
    Protection,
    Requirements,
    Schedule,
)


class LastQueryAttentionExtractor:
    """One feature per token: the attention the newest query gives it, per KV head."""

    name: ClassVar[str] = "last_query_attention"
    Config = EmptyConfig

    def __init__(self, config: EmptyConfig | None = None) -> None:
        self.config = config or EmptyConfig()

    @property
    def requirements(self) -> Requirements:
        return Requirements(attention_window=1)

    @property
    def num_features(self) -> int:
        return 1

    def extract(self, view: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, tokens, 1]`` the newest query's attention row."""
        view.require("attention", by="extractor 'last_query_attention'")
        return view.attention[:, :, -1, :].float().unsqueeze(-1)


@attrs.frozen
class TovaConfig:
    """``average_heads``: score every head with the layer's head-averaged attention (the
    paper); False scores each KV head by its own attention (a per-head variant)."""

    average_heads: bool = True


class TovaScorer:
    """Score = newest query's attention, averaged over the layer's heads."""

    name: ClassVar[str] = "tova"
    Config = TovaConfig

    def __init__(self, config: TovaConfig | None = None) -> None:
        self.config = config or TovaConfig()

    @property
    def requirements(self) -> Requirements:
        return Requirements()

    @property
    def input_width(self) -> FeatureWidth:
        return FeatureWidth.at_least(1)

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        if features.shape[-1] < 1:
            raise ShapeError("scorer 'tova' reads feature 0 (last-query attention) but got no features")
        scores = features[..., 0].float()
        if not self.config.average_heads:
            return scores
        positions = view.positions
        if bool((positions == positions[:, :1]).all()):
            return scores.mean(dim=1, keepdim=True).expand_as(scores)
        return _mean_by_position(scores, positions, view.seen)


def _mean_by_position(scores: torch.Tensor, positions: torch.Tensor, seen: int) -> torch.Tensor:
    """Head-averaged attention per absolute position when heads hold different tokens: a head
    that no longer holds a position gives it no attention (0), as in the paper's mean."""
    batch, kv_heads, _ = scores.shape
    real = positions >= 0  # padded slots of a ragged cache carry a negative position
    index = positions.clamp(min=0)
    by_position = scores.new_zeros(batch, seen).scatter_add_(
        -1, index.reshape(batch, -1), (scores * real).reshape(batch, -1)
    )
    return by_position.gather(-1, index.reshape(batch, -1)).reshape(scores.shape) / kv_heads


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("last_query_attention", LastQueryAttentionExtractor)


@hookimpl
def kvpolicy_register_scorers(register) -> None:
    register("tova", TovaScorer)


@hookimpl
def kvpolicy_register_presets(register) -> None:
    tova = PolicyConfig(
        extractor=ComponentRef("last_query_attention"),
        scorer=ComponentRef("tova"),
        selector=ComponentRef("top_k"),
        schedule=Schedule("every_step", slack=0),
        protect=Protection(),
        budget=Budget(tokens=512),
    )
    register(
        "tova", tova, description="TOVA: drop what the newest query attends to least, heads averaged (Oren et al. 2024)"
    )
    register(
        "tova-span",
        tova.with_span(31),
        description="TOVA with its scores max-pooled over 31 cached tokens (spans kept; not the paper's)",
    )  # lift: docs/span_pooling.md
