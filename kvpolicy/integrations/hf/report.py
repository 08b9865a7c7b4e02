"""`CacheReport` of an evicting cache: measured from the tensors actually stored.

``row=None`` reports the whole batch (tokens kept averaged over the rows, bytes as physically
stored, padded slots included and counted apart in ``padding_bytes``). Padding is never a token
seen: a left-padded batch reports each row's own tokens (``row_tokens``) and the full cache it is
compared with holds exactly those. ``row=i`` reports batch row *i* alone, counting only that row's
valid slots: when each row runs its own parameters (a population evaluated as one batch), this
is what member *i* kept, the same figure a batch-of-one run of that member reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvpolicy.errors import ShapeError
from kvpolicy.integrations.hf.cache import EvictingCache, EvictingLayer
from kvpolicy.types import Budget, CacheReport, Protection


def _stored(layer) -> bool:
    return bool(getattr(layer, "is_initialized", False)) and layer.keys is not None and layer.keys.dim() >= 4


def _bytes_per_slot(layer) -> int:
    """Bytes of one token of one KV head: keys plus values."""
    head_dim = layer.keys.shape[-1]
    return head_dim * (layer.keys.element_size() + layer.values.element_size())


def _layer_bytes(layer, row: int | None) -> int:
    if not _stored(layer):
        return 0
    if row is None:
        return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    if isinstance(layer, EvictingLayer):
        slots = int(layer.kept_per_head()[row].sum())  # valid slots only: padding is not this row's memory
    else:
        slots = layer.keys.shape[1] * layer.keys.shape[2]
    return slots * _bytes_per_slot(layer)


def _full_bytes(layer, row_tokens: list[int]) -> int:
    """Bytes the same layer would hold without kvpolicy for rows of ``row_tokens`` real tokens
    (a sliding layer keeps its window); padding is no one's memory, so it is not counted."""
    if not _stored(layer):
        return 0
    kv_heads = layer.keys.shape[1]
    if isinstance(layer, DynamicSlidingWindowLayer):
        row_tokens = [min(tokens, layer.sliding_window - 1) for tokens in row_tokens]
    return sum(row_tokens) * kv_heads * _bytes_per_slot(layer)


def _padding_bytes(layer, column_valid: torch.Tensor | None) -> int:
    """Bytes of stored slots that hold no token: left padding not yet dropped, and the slots a
    row or head leaves empty because another keeps more (the batch is stored as long as its
    longest head)."""
    if not _stored(layer):
        return 0
    if isinstance(layer, EvictingLayer):
        slots = layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[2] - int(layer.kept_per_head().sum())
    elif column_valid is not None:
        slots = int((~column_valid[:, -layer.keys.shape[2] :]).sum()) * layer.keys.shape[1]
    else:
        slots = 0
    return slots * _bytes_per_slot(layer)


def _kept(layer, row: int | None) -> tuple[float, ...]:
    if isinstance(layer, EvictingLayer):
        if layer.positions is None:
            return ()
        per_head = layer.kept_per_head()
        per_head = per_head.mean(0) if row is None else per_head[row]
        return tuple(float(x) for x in per_head.tolist())
    if not _stored(layer):
        return ()
    return (float(layer.keys.shape[2]),) * layer.keys.shape[1]


def batch_size(cache: EvictingCache) -> int:
    """Rows the cache holds (0 before the first forward call)."""
    for layer in cache.layers:
        if _stored(layer):
            return int(layer.keys.shape[0])
    return 0


def managed_layers(cache: EvictingCache) -> tuple[int, ...]:
    """Indices of the layers a policy manages (evicting layers of the cache)."""
    return tuple(i for i, layer in enumerate(cache.layers) if isinstance(layer, EvictingLayer) and _stored(layer))


def kept_share(cache: EvictingCache, tokens: int, layers: Sequence[int] | None = None) -> torch.Tensor:
    """``[rows, tokens]``: for each position ``< tokens``, the share of (layer, KV head) pairs of
    ``layers`` (default: every managed layer) whose cache still holds it — 1.0 for a token no
    pass evicted, 0.0 for one every head dropped. Read from the stored positions, so it is what
    the cache holds, not what a policy meant to keep."""
    layers = managed_layers(cache) if layers is None or len(layers) == 0 else tuple(layers)
    shares = []
    for index in layers:
        layer = cache.layers[index]
        if layer.positions is None:  # nothing stored in this layer yet
            continue
        shares.append(layer.held_share(0, tokens))
    return torch.stack(shares).mean(0) if shares else torch.zeros(batch_size(cache), tokens)


def _check_row(cache: EvictingCache, row: int) -> None:
    batch = batch_size(cache)
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < batch:
        accepted = f"0..{batch - 1}" if batch else "none: the cache is empty, feed tokens first"
        raise ShapeError(f"report row {row!r} does not exist; the cache holds {batch} rows (rows {accepted})")


def budget_override_note(budget: Budget, protect: Protection, seen: int) -> str | None:
    """Why the cache exceeds a ratio budget, if it does: protection (sinks, the recent window, the
    newest token) always wins over the budget. A token budget smaller than the protected tokens is
    refused when the policy is built, so only a ratio can be overridden, and only once known how
    many tokens were seen."""
    capacity = budget.capacity(seen)
    if budget.ratio is None or capacity is None:
        return None
    protected = min(seen, protect.sinks + max(protect.recent, 1))
    if protected <= capacity:
        return None
    return (
        f"budget {budget.ratio * 100:g}% of {seen} tokens is {capacity} per head, but the policy protects {protected} "
        f"({protect.sinks} sinks + {max(protect.recent, 1)} recent, capped at the tokens seen): "
        f"protection wins, so the cache keeps {protected / seen:.0%} instead of {budget.ratio * 100:g}%"
    )


def build_report(cache: EvictingCache, notes: tuple[str, ...], row: int | None = None) -> CacheReport:
    """What the cache holds now against what a cache without kvpolicy would hold: for the whole
    batch (``row=None``) or for batch row ``row`` alone (its valid slots only)."""
    if row is not None:
        _check_row(cache, row)
    row_tokens = [] if cache.row_seen is None else cache.row_seen.tolist()
    if row is not None:
        row_tokens = row_tokens[row : row + 1]
    with torch.no_grad():
        kept = tuple(_kept(layer, row) for layer in cache.layers)
        kv_bytes = sum(_layer_bytes(layer, row) for layer in cache.layers)
        full = sum(_full_bytes(layer, row_tokens) for layer in cache.layers)
        padding = 0 if row is not None else sum(_padding_bytes(layer, cache.column_valid) for layer in cache.layers)
    return CacheReport(
        seen=max(row_tokens, default=0),
        row_tokens=tuple(row_tokens) if len(set(row_tokens)) > 1 else (),
        kept=kept,
        kv_bytes=kv_bytes,
        full_kv_bytes=full,
        padding_bytes=padding,
        policy_seconds=cache.policy_seconds,
        eviction_passes=cache.eviction_passes,
        evicting_layers=tuple(cache.managed),
        notes=notes,
    )
