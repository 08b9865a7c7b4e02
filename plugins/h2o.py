"""H2O, Heavy-Hitter Oracle (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", NeurIPS 2023).

A cached token's importance is the attention it has received, summed over every query so far
(post-softmax, per KV head: the integration averages each GQA group). The cache keeps the
``heavy`` best-scoring tokens plus the ``recent`` newest ones, split 50/50 by default, and evicts
greedily as tokens arrive: the preset runs an eviction pass after every forward call (``every_step``, no slack),
chunked prefill included, so a token leaving the recent window competes with the heavy hitters
at once, as in the paper's greedy algorithm.

Components: extractor ``accumulated_attention`` → scorer ``feature`` (the score is feature 0, the
accumulated attention itself) → selector ``heavy_recent``.

Deviation: with grouped-query attention the paper's per-head score becomes the mean over the
query heads of a KV-head group (one cache per KV head); the paper's models had none.
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import InvalidBudgetError, InvalidConfigError
from kvpolicy.selection import finite_scores, sorted_selection
from kvpolicy.types import (
    Budget,
    ComponentBase,
    ComponentRef,
    LayerView,
    PolicyConfig,
    Protection,
    Requirements,
    Schedule,
    Selection,
)

_KEEP = float("inf")


class AccumulatedAttentionExtractor(ComponentBase):
    """One feature per token: the attention it received summed over all queries so far."""

    name = "accumulated_attention"
    plans_layers_together = True  # rows alone, no layer index: `Capabilities`
    requirements = Requirements(accumulated_attention=True)
    num_features = 1

    def extract(self, view: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, tokens, 1]`` accumulated attention."""
        view.require("accumulated_attention", by=self.label)
        return view.accumulated_attention.float().unsqueeze(-1)


@attrs.frozen
class HeavyRecentConfig:
    """``recent_ratio``: the share of the budget given to the newest tokens (H2O: 0.5); the
    rest goes to the highest-scored older tokens (the heavy hitters)."""

    recent_ratio: float = attrs.field(default=0.5)

    @recent_ratio.validator
    def _check(self, attribute: attrs.Attribute, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise InvalidConfigError(f"HeavyRecentConfig.recent_ratio must be in [0, 1], got {value}")


class HeavyRecentSelector(ComponentBase):
    """Keep the ``round(capacity × recent_ratio)`` newest cached tokens and fill the rest of the
    budget with the highest-scored older ones (H2O's heavy + recent split); protected tokens
    always survive and count within the budget (the window gives way to them first)."""

    name = "heavy_recent"
    plans_layers_together = True  # rows alone, no layer index: `Capabilities`
    Config = HeavyRecentConfig
    needs_budget = True
    keeps_highest_scores = False  # the recent window is kept whatever it scores

    def select(self, scores: torch.Tensor, protected: torch.Tensor, budget: Budget, view: LayerView) -> Selection:
        tokens = scores.shape[-1]
        capacity = budget.capacity(view.seen)
        if capacity is None:
            raise InvalidBudgetError("selector 'heavy_recent' needs a budget (e.g. budget=512 or budget=0.25)")
        capacity = min(capacity, tokens)
        recent = round(capacity * self.config.recent_ratio)
        # the `recent` newest cached tokens of each head, by absolute position (padded slots of a
        # ragged cache carry a negative position and never count as recent)
        in_window = torch.zeros_like(protected)
        if recent:
            in_window.scatter_(-1, view.positions.topk(recent, dim=-1).indices, True)
            in_window &= view.positions >= 0
        # three tiers, all within the budget: protected (+inf), then the window, newest first,
        # then the heavy hitters by score (clamped below the window's tier)
        top = torch.finfo(torch.float32).max
        keyed = finite_scores(scores).clamp(-top / 4, top / 4)
        newest_first = top / 2 + (top / 4) * (view.positions.float() / max(view.seen, 1))
        keyed = torch.where(in_window, newest_first, keyed).masked_fill(protected, _KEEP)
        k = max(capacity, int(protected.sum(-1).max()))
        return sorted_selection(keyed.topk(k, dim=-1).indices)


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("accumulated_attention", AccumulatedAttentionExtractor)


#: H2O's scorer: the accumulated attention (feature 0) is the score
H2O_SCORER = {"index": 0, "sign": 1.0}


@hookimpl
def kvpolicy_register_selectors(register) -> None:
    register("heavy_recent", HeavyRecentSelector)


@hookimpl
def kvpolicy_register_presets(register) -> None:
    h2o = PolicyConfig(
        extractor=ComponentRef("accumulated_attention"),
        scorer=ComponentRef("feature", H2O_SCORER),
        selector=ComponentRef("heavy_recent", {"recent_ratio": 0.5}),
        schedule=Schedule("every_step", slack=0),
        protect=Protection(),
        budget=Budget(tokens=512),
    )
    register(
        "h2o", h2o, description="H2O: heavy hitters by accumulated attention + recent window, 50/50 (Zhang et al. 2023)"
    )
    register(
        "h2o-span",
        h2o.with_span(31),
        description="H2O with its scores max-pooled over 31 cached tokens (spans kept; not the paper's)",
    )  # lift: docs/span_pooling.md
