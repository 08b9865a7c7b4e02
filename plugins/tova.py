"""TOVA, Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs", 2024).

Once the cache is over budget, drop the tokens the newest query attends to least, averaged over
the layer's heads so that they keep the same tokens. With grouped-query attention each KV head's
row is already its (equal-sized) query-head group's mean, so the mean over KV heads is the paper's
mean over all heads. Heads holding different tokens (after a per-head policy) are averaged per
absolute position, a head that no longer holds a position giving it no attention.

Components: extractor ``last_query_attention`` → scorer ``tova`` → selector ``top_k``, evicting at
every forward call (prefill chunks too: the last query of each chunk decides).
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy import Budget, ComponentRef, LayerView, PolicyConfig, Requirements, Schedule, hookimpl
from kvpolicy.types import ComponentBase, FeatureWidth


class LastQueryAttentionExtractor(ComponentBase):
    """One feature per token: the attention the newest query gives it, per KV head."""

    name = "last_query_attention"
    plans_layers_together = True  # rows alone, no layer index: `Capabilities`
    requirements = Requirements(attention_window=1)
    num_features = 1

    def extract(self, view: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, tokens, 1]`` the newest query's attention row."""
        view.require("attention", by=self.label)
        return view.attention[:, :, -1, :].float().unsqueeze(-1)


@attrs.frozen
class TovaConfig:
    """``average_heads``: score heads with the layer's mean attention (the paper), else each its own."""

    average_heads: bool = True


class TovaScorer(ComponentBase):
    """Score = newest query's attention, averaged over the layer's heads."""

    name = "tova"
    plans_layers_together = True  # rows alone, no layer index: `Capabilities`
    Config = TovaConfig
    input_width = FeatureWidth.at_least(1)

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        scores = self.read_feature(features, 0, "last-query attention")
        positions, (batch, kv_heads, _) = view.positions, scores.shape
        if not self.config.average_heads:
            return scores
        if bool((positions == positions[:, :1]).all()):
            return scores.mean(dim=1, keepdim=True).expand_as(scores)
        # heads hold different tokens: each token gets its absolute position's mean over all heads
        index = positions.clamp(min=0).reshape(batch, -1)
        real = (scores * (positions >= 0)).reshape(batch, -1)  # padded slots (position < 0) add nothing
        summed = scores.new_zeros(batch, view.seen).scatter_add_(-1, index, real)
        return summed.gather(-1, index).reshape(scores.shape) / kv_heads


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("last_query_attention", LastQueryAttentionExtractor)


@hookimpl
def kvpolicy_register_scorers(register) -> None:
    register("tova", TovaScorer)


@hookimpl
def kvpolicy_register_presets(register) -> None:
    refs = ComponentRef("last_query_attention"), ComponentRef("tova"), ComponentRef("top_k")
    tova = PolicyConfig(*refs, schedule=Schedule("every_step"), budget=Budget(tokens=512))
    paper = "TOVA: drop what the newest query attends to least, heads averaged (Oren et al. 2024)"
    register("tova", tova, description=paper)
    spans = "TOVA with its scores max-pooled over 31 cached tokens (spans kept; not the paper's)"
    register("tova-span", tova.with_span(31), description=spans)  # lift: docs/span_pooling.md
