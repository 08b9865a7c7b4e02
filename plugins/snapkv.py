"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024).

Once, after the prompt: the last ``window_size`` prompt queries (the observation window) vote
for the earlier tokens with their post-softmax attention, summed over the window; the votes are
smoothed with a 1-D pooling kernel so a selected token brings its neighbours along; the
top-voted prefix tokens fill the budget and the observation window itself is always kept.
Tokens generated afterwards are not evicted (SnapKV compresses the prompt only).

Defaults follow the authors' released code (``window_size=32``, ``kernel_size=5``, average
pooling with zero padding counted, as ``F.avg_pool1d`` does); ``pooling="max"`` is the variant
some of the paper's runs use. Votes are per KV head, averaged over each GQA group by the
integration (the released code scores per query head).

Components: extractor ``window_votes`` → scorer ``snapkv`` → selector ``top_k``.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from kvpolicy import hookimpl
from kvpolicy.errors import InvalidConfigError
from kvpolicy.selection import MAX_KERNEL
from kvpolicy.types import (
    Budget,
    ComponentBase,
    ComponentRef,
    FeatureWidth,
    LayerView,
    PolicyConfig,
    Protection,
    Requirements,
    Schedule,
    positive,
)

#: the observation window of the authors' code: how many of the newest queries vote, and how many
#: of the newest tokens are always kept (the extractor and the scorer must agree on it)
WINDOW_SIZE = 32


@attrs.frozen
class WindowVotesConfig:
    """``window_size``: how many of the newest queries vote (the observation window)."""

    window_size: int = attrs.field(default=WINDOW_SIZE, validator=positive)


class WindowVotesExtractor(ComponentBase):
    """One feature per token: attention summed over the observation window's queries."""

    name = "window_votes"
    Config = WindowVotesConfig
    num_features = 1

    @property
    def requirements(self) -> Requirements:
        return Requirements(attention_window=self.config.window_size)

    def extract(self, view: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, tokens, 1]`` votes of the newest ``window_size`` queries."""
        view.require("attention", by=self.label)
        window = view.attention[:, :, -self.config.window_size :, :]
        return window.float().sum(dim=2).unsqueeze(-1)


@attrs.frozen
class SnapKVConfig:
    """``window_size`` newest tokens always kept; votes of the older ones pooled with a
    ``kernel_size`` (odd) ``pooling`` ("avg" or "max") kernel."""

    window_size: int = attrs.field(default=WINDOW_SIZE, validator=positive)
    kernel_size: int = attrs.field(default=5, validator=positive)
    pooling: Literal["avg", "max"] = attrs.field(default="avg")

    @kernel_size.validator
    def _odd(self, attribute: attrs.Attribute, value: int) -> None:
        if value % 2 == 0:
            raise InvalidConfigError(f"SnapKVConfig.kernel_size must be odd (1, 3, 5, 7, ...), got {value}")
        if value > MAX_KERNEL:
            raise InvalidConfigError(f"SnapKVConfig.kernel_size must be at most {MAX_KERNEL} tokens, got {value}")

    @pooling.validator
    def _pooling(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in ("avg", "max"):
            raise InvalidConfigError(f"SnapKVConfig.pooling must be 'avg' or 'max', got {value!r}")


class SnapKVScorer(ComponentBase):
    """Pooled observation-window votes for the prefix; the window scores above all of them (always kept)."""

    name = "snapkv"
    Config = SnapKVConfig
    input_width = FeatureWidth.at_least(1)

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        votes = self.read_feature(features, 0, "window votes")
        batch, kv_heads, tokens = votes.shape
        in_window = view.positions >= view.seen - self.config.window_size
        prefix = tokens - int(in_window.sum(-1).min())  # the window is the newest tokens of every head
        scores = torch.zeros_like(votes)
        if prefix > 0:
            flat = votes[..., :prefix].reshape(batch * kv_heads, 1, prefix)
            pad = self.config.kernel_size // 2
            pool = F.avg_pool1d if self.config.pooling == "avg" else F.max_pool1d
            pooled = pool(flat, kernel_size=self.config.kernel_size, stride=1, padding=pad)
            scores[..., :prefix] = pooled.reshape(batch, kv_heads, prefix)
        # the window outranks every prefix token, newest first (a budget smaller than the window
        # keeps its newest part); finite, so protected tokens (+inf in the selector) still come first
        above = scores.amax(dim=-1, keepdim=True) + 1.0
        recency = (view.positions - (view.seen - self.config.window_size)).float() / self.config.window_size
        return torch.where(in_window, above + recency, scores)


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("window_votes", WindowVotesExtractor)


@hookimpl
def kvpolicy_register_scorers(register) -> None:
    register("snapkv", SnapKVScorer)


@hookimpl
def kvpolicy_register_presets(register) -> None:
    snapkv = PolicyConfig(
        extractor=ComponentRef("window_votes", {"window_size": WINDOW_SIZE}),
        scorer=ComponentRef("snapkv", {"window_size": WINDOW_SIZE, "kernel_size": 5, "pooling": "avg"}),
        selector=ComponentRef("top_k"),
        schedule=Schedule("after_prefill"),
        protect=Protection(),
        budget=Budget(tokens=512),
    )
    register(
        "snapkv",
        snapkv,
        description="SnapKV: pooled votes of the last 32 prompt queries, once after prefill (Li et al. 2024)",
    )
    # Not the paper's: its votes max-pooled over 31 cached neighbours (the `span` pooler), so
    # whole spans are kept. On the test split at 2k tokens and 25% of the cache it scores 107.9% of
    # the full cache against 36.4% for the published 5-token average (docs/learned_eviction.md).
    register(
        "snapkv-span",
        attrs.evolve(snapkv, budget=Budget(ratio=0.25)).with_span(31),
        description="SnapKV with its scores max-pooled over 31 cached tokens (spans kept), 25% of the cache",
    )
