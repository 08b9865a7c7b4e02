"""Helpers every selector needs (layer 0): rank protected tokens first without ties, and return
kept indices in the order the cache requires. Shared so no selector re-derives them."""

from __future__ import annotations

import torch

from kvpolicy.types import Selection


def finite_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores as float32 with +inf → float max and NaN / -inf → float min.

    A scorer that pins tokens with +inf can then never tie with (and displace) a protected token,
    which is ranked at +inf by `rank_protected_first`.
    """
    finite = torch.finfo(torch.float32)
    return scores.float().nan_to_num(nan=finite.min, posinf=finite.max, neginf=finite.min)


def rank_protected_first(scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """`finite_scores` with every protected token set to +inf, above any unprotected one."""
    return finite_scores(scores).masked_fill(protected, float("inf"))


def sorted_selection(indices: torch.Tensor, valid: torch.Tensor | None = None) -> Selection:
    """A `Selection` with kept indices ascending per head (positions stay increasing).

    With ``valid`` (heads keeping different counts), the valid indices come first in ascending
    order and padded slots last, pointing at index 0 and masked out.
    """
    if valid is None:
        return Selection(indices.sort(dim=-1).values)
    key = torch.where(valid, indices, indices.new_full((), torch.iinfo(indices.dtype).max))
    key, order = key.sort(dim=-1)
    valid = valid.gather(-1, order)
    return Selection(torch.where(valid, key, torch.zeros_like(key)), valid)


def pool_neighbours(scores: torch.Tensor, kernel: int, mode: str, padded: torch.Tensor | None = None) -> torch.Tensor:
    """``scores [batch, kv_heads, tokens]`` pooled over ``kernel`` (odd) neighbouring cached tokens.

    Neighbours are taken in cached order (after an eviction, tokens that are adjacent in the cache
    need not be adjacent in position). ``padded`` slots (heads keeping fewer tokens than the
    layer's longest) neither lend nor receive a score: they stay at -inf. Scores are made finite
    first (`finite_scores`), so a pinned (+inf) token lifts its neighbours without NaNs.
    """
    if kernel <= 1:
        return scores
    batch, heads, tokens = scores.shape
    x = finite_scores(scores).reshape(batch * heads, 1, tokens)
    pad = kernel // 2
    if mode == "max":
        if padded is not None:
            x = x.masked_fill(padded.reshape(batch * heads, 1, tokens), torch.finfo(torch.float32).min)
        pooled = torch.nn.functional.max_pool1d(x, kernel_size=kernel, stride=1, padding=pad)
    else:
        weight = torch.ones(1, 1, kernel, dtype=torch.float64, device=x.device)
        real = torch.ones_like(x, dtype=torch.float64)
        if padded is not None:
            real = (~padded).reshape(batch * heads, 1, tokens).to(torch.float64)
        total = torch.nn.functional.conv1d(x.double() * real, weight, padding=pad)
        count = torch.nn.functional.conv1d(real, weight, padding=pad).clamp_min(1.0)
        pooled = (total / count).clamp(torch.finfo(torch.float32).min, torch.finfo(torch.float32).max).float()
    pooled = pooled.reshape(batch, heads, tokens)
    if padded is not None:
        pooled = pooled.masked_fill(padded, float("-inf"))
    return pooled
