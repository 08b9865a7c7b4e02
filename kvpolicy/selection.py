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
