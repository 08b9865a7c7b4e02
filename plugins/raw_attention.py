"""The ``raw_attention`` extractor: the attention each cached token received from the newest
queries, as features — for scorers that want the values themselves, and as the plain baseline
the spectrogram features of NAMM (Cetin et al., arXiv 2410.13166) are measured against.

Reductions over the newest ``window`` queries since the last eviction pass:

- ``rows``: the last ``window`` attention values of every token, oldest first, zero-padded on the
  left when fewer queries came in → ``window`` features;
- ``mean`` / ``sum`` / ``max``: one feature, over the queries for which the token existed
  (``mean`` divides by that count, so a new token is not penalised for arriving late).
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.types import ComponentBase, LayerView, Requirements, positive

Reduction = Literal["rows", "mean", "sum", "max"]
REDUCTIONS: tuple[str, ...] = ("rows", "mean", "sum", "max")


@attrs.frozen
class RawAttentionConfig:
    """``window``: newest queries used; ``reduce``: ``rows``, ``mean``, ``sum`` or ``max``."""

    window: int = attrs.field(default=32, validator=positive)
    reduce: Reduction = attrs.field(default="mean")

    @reduce.validator
    def _check_reduce(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in REDUCTIONS:
            raise InvalidConfigError(f"RawAttentionConfig.reduce must be one of {', '.join(REDUCTIONS)}, got {value!r}")

    @property
    def num_features(self) -> int:
        return self.window if self.reduce == "rows" else 1


class RawAttentionExtractor(ComponentBase):
    """Attention of the newest queries, raw (``rows``) or reduced to one value per token."""

    name = "raw_attention"
    Config = RawAttentionConfig

    @property
    def requirements(self) -> Requirements:
        return Requirements(attention_window=self.config.window)

    @property
    def num_features(self) -> int:
        return self.config.num_features

    def extract(self, view: LayerView) -> torch.Tensor:
        cfg = self.config
        batch, heads, tokens = view.positions.shape
        attention = view.attention
        if attention is None or attention.dim() != 4 or tuple(attention.shape[:2]) != (batch, heads):
            got = "none" if attention is None else tuple(attention.shape)
            raise ShapeError(
                f"raw_attention needs view.attention [batch={batch}, kv_heads={heads}, queries, tokens={tokens}] "
                f"(Requirements.attention_window={cfg.window}); got {got}"
            )
        if attention.shape[3] != tokens:
            raise ShapeError(f"view.attention covers {attention.shape[3]} tokens but the cache holds {tokens}")
        rows = attention[:, :, -cfg.window :, :].float()  # [batch, kv_heads, queries, tokens]
        if cfg.reduce == "rows":
            missing = cfg.window - rows.shape[2]
            if missing:
                rows = torch.cat([rows.new_zeros((batch, heads, missing, tokens)), rows], dim=2)
            return rows.transpose(2, 3).contiguous()
        if cfg.reduce == "sum":
            return rows.sum(2).unsqueeze(-1)
        if cfg.reduce == "max":
            return rows.amax(2).unsqueeze(-1) if rows.shape[2] else rows.new_zeros((batch, heads, tokens, 1))
        existed = self._existed(view, rows.shape[2]).to(rows.dtype)
        return (rows.sum(2) / existed.clamp_min(1.0)).unsqueeze(-1)

    @staticmethod
    def _existed(view: LayerView, queries: int) -> torch.Tensor:
        """``[batch, kv_heads, tokens]``: how many of the last ``queries`` queries each token existed for."""
        if view.query_positions is None or queries == 0:
            return torch.full(view.positions.shape, float(queries), device=view.positions.device)
        query_positions = view.query_positions[-queries:].to(view.positions.device)
        return (view.positions.unsqueeze(-1) <= query_positions).sum(-1)


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("raw_attention", RawAttentionExtractor, description="attention of the newest queries (rows, mean, sum)")
