"""Helpers every selector needs (tier 0): rank protected tokens first without ties, and return
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


def padding_mask(positions: torch.Tensor) -> torch.Tensor | None:
    """``positions < 0`` (the padded slots of heads keeping fewer tokens than another), or None
    when there are none: found by one reduction first, since on a CPU building and testing the
    mask costs as much as pooling the scores it would guard."""
    if positions.numel() == 0 or not bool(positions.min() < 0):
        return None
    return positions < 0


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


def mask_selection(chosen: torch.Tensor) -> Selection:
    """A `Selection` of the True tokens of ``chosen [batch, heads, tokens]``, ascending per head,
    padded to the most any head keeps (at least one slot) with ``valid`` marking the real ones —
    for selectors whose heads keep different counts."""
    tokens = chosen.shape[-1]
    kept = max(int(chosen.sum(-1).max()), 1)
    order = torch.where(chosen, torch.arange(tokens, device=chosen.device).expand_as(chosen), tokens)
    indices = order.sort(dim=-1).values[..., :kept]
    valid = indices < tokens
    return Selection(torch.where(valid, indices, torch.zeros_like(indices)), valid)


#: the widest pooling kernel a config may ask for: twice the longest context any supported model
#: takes (2**20 tokens), minus one; `pool_neighbours` pools no wider than its tokens need anyway
MAX_KERNEL = 2**21 - 1


def pool_neighbours(scores: torch.Tensor, kernel: int, mode: str, padded: torch.Tensor | None = None) -> torch.Tensor:
    """``scores [batch, kv_heads, tokens]`` pooled over ``kernel`` (odd) neighbouring cached tokens.

    Neighbours are taken in cached order (after an eviction, tokens that are adjacent in the cache
    need not be adjacent in position). ``padded`` slots (heads keeping fewer tokens than the
    layer's longest) neither lend nor receive a score: they stay at -inf. Scores are made finite
    first (`finite_scores`), so a pinned (+inf) token lifts its neighbours without NaNs.

    ``max`` is one ``max_pool1d``. ``avg`` divides each window's sum by its count of real tokens
    (the cache's ends and padded slots do not count). Window sums are built in float64 from
    shifted sums of widths 1, 2, 4, ... (`_window_sums`: ~2·log2(kernel) elementwise adds; a
    convolution costs more than the rest of an eviction pass on a CPU). Each window is summed from its
    own scores only, never as a difference of prefix sums, so the float-max stand-ins for ±inf
    cancel exactly and never swamp other windows: the result equals a float64 convolution.
    """
    if kernel <= 1:
        return scores
    batch, heads, tokens = scores.shape
    # a window of 2·tokens − 1 already covers every token from any centre: a wider one pools the
    # same values, and would only allocate its padding
    kernel = min(kernel, max(2 * tokens - 1, 1))
    rows = batch * heads
    x = finite_scores(scores).reshape(rows, tokens)
    if mode == "max":
        if padded is not None:
            x = x.masked_fill(padded.reshape(rows, tokens), torch.finfo(torch.float32).min)
        # reshape, not unsqueeze: max_pool1d takes a slow path (~5x) on the strides unsqueeze gives
        x = x.reshape(rows, 1, tokens)
        pooled = torch.nn.functional.max_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)
    else:
        if padded is None:  # every row counts the same neighbours: one row of ones gives the counts
            real = torch.ones(1, tokens, dtype=torch.float64, device=x.device)
            values = x.double()
        else:
            real = (~padded).reshape(rows, tokens).to(torch.float64)
            values = x.double() * real  # -inf stand-ins of padded slots become 0: they lend nothing
        sums = _window_sums(torch.cat([values, real]), kernel)
        total, count = sums[:rows], sums[rows:].clamp_min(1.0)
        finite = torch.finfo(torch.float32)
        pooled = (total / count).clamp(finite.min, finite.max).float()
    pooled = pooled.reshape(batch, heads, tokens)
    if padded is not None:
        pooled = pooled.masked_fill(padded, float("-inf"))
    return pooled


def _window_sums(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """``x [rows, tokens]`` summed over centred windows of odd width ``kernel`` (zeros outside).

    Each row is zero-padded by ``kernel // 2`` on both sides and the rows are laid end to end in
    one contiguous vector, so every shifted add runs on contiguous memory; sums over widths 1, 2,
    4, ... are built by adding shifted copies, and a window of width ``kernel`` is the sum of the
    widths in ``kernel``'s binary expansion laid end to end. Windows that straddle two rows are
    computed too and never read."""
    rows, tokens = x.shape
    length = tokens + kernel - 1  # one padded row
    flat = torch.nn.functional.pad(x, (kernel // 2, kernel // 2)).reshape(-1)
    spans = {1: flat}
    width = 1
    while 2 * width <= kernel:
        previous = spans[width]
        spans[2 * width] = previous[:-width] + previous[width:]
        width *= 2
    total: torch.Tensor | None = None
    offset = 0
    valid = rows * length - kernel + 1  # windows that start inside the vector and end inside it
    for width in sorted(spans, reverse=True):
        if kernel & width:
            part = spans[width][offset : offset + valid]
            total = part if total is None else total + part
            offset += width
    assert total is not None  # an odd kernel has bit 1 set
    return total.as_strided((rows, tokens), (length, 1))
