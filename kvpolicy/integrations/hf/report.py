"""`CacheReport` of an evicting cache: measured from the tensors actually stored."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvpolicy.integrations.hf.cache import EvictingCache, EvictingLayer
from kvpolicy.types import CacheReport


def _layer_bytes(layer) -> int:
    if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.dim() < 4:
        return 0
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


def _full_bytes(layer, seen: int) -> int:
    """Bytes the same layer would hold without kvpolicy (a sliding layer keeps its window)."""
    if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.dim() < 4:
        return 0
    batch, kv_heads, _, head_dim = layer.keys.shape
    tokens = seen
    if isinstance(layer, DynamicSlidingWindowLayer):
        tokens = min(seen, layer.sliding_window - 1)
    per_token = batch * kv_heads * head_dim * (layer.keys.element_size() + layer.values.element_size())
    return tokens * per_token


def _kept(layer) -> tuple[float, ...]:
    if isinstance(layer, EvictingLayer):
        if layer.positions is None:
            return ()
        return tuple(float(x) for x in layer.kept_per_head().mean(0).tolist())
    if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.dim() < 4:
        return ()
    return (float(layer.keys.shape[2]),) * layer.keys.shape[1]


def build_report(cache: EvictingCache, notes: tuple[str, ...]) -> CacheReport:
    """What the cache holds now against what a cache without kvpolicy would hold."""
    with torch.no_grad():
        kept = tuple(_kept(layer) for layer in cache.layers)
        kv_bytes = sum(_layer_bytes(layer) for layer in cache.layers)
        full = sum(_full_bytes(layer, cache.seen) for layer in cache.layers)
    return CacheReport(
        seen=cache.seen,
        kept=kept,
        kv_bytes=kv_bytes,
        full_kv_bytes=full,
        policy_seconds=cache.policy_seconds,
        updates=cache.updates,
        evicting_layers=tuple(cache.managed),
        notes=notes,
    )
