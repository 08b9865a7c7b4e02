"""An exact reference for evicting runs: one full forward over the whole sequence in which every
query sees exactly the tokens its layer and KV head still held when that query was processed.

Eviction happens between forward calls, so a query's visible keys are those kept before its
forward call plus the causal part of its own chunk. A full recompute with that per-layer,
per-head mask reproduces every hidden state of the evicting run, so its logits must agree with
the run's to float tolerance: a bug anywhere in positions, masks, gathering or state alignment
shows up as a mismatch. The reference of the exactness tests, in the test kit for anyone checking a
new policy end to end.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from kvpolicy.integrations.hf.attention import (
    original_attention,
    original_mask,
    register_functions,
    unregister_functions,
)
from kvpolicy.integrations.hf.cache import EvictingLayer

_REFERENCE_NAME = "kvpolicy_reference"


@attrs.define
class ForwardRecord:
    """One forward call of an evicting run: its token span and, per layer, what was kept before it
    (``None`` for a layer kvpolicy does not evict, e.g. a sliding-window layer)."""

    start: int
    end: int
    kept: list[tuple[torch.Tensor, torch.Tensor | None] | None]


def feed_recorded(handle: Any, input_ids: torch.Tensor, chunk_size: int | None = None) -> tuple[torch.Tensor, list]:
    """`handle.feed` chunk by chunk, returning the logits of every token ``[batch, tokens, vocab]``
    and the `ForwardRecord` of each call (for `masked_recompute`)."""
    records, logits = [], []
    for chunk in input_ids.split(chunk_size or input_ids.shape[1], dim=1):
        cache = handle.cache
        kept, start = kept_before_forward(cache), cache.seen
        logits.append(handle.feed(chunk))
        records.append(ForwardRecord(start, start + chunk.shape[1], kept))
    return torch.cat(logits, dim=1), records


def kept_before_forward(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Per layer, the ``(positions, valid)`` a forward call is about to attend to (None for a layer
    that holds every token): what a `ForwardRecord` keeps for `masked_recompute`."""
    return [
        (layer.positions.clone(), None if layer.valid is None else layer.valid.clone())
        if isinstance(layer, EvictingLayer) and layer.positions is not None
        else None
        for layer in cache.layers
    ]


def visibility_masks(records: list[ForwardRecord], num_layers: int, evicting: list[bool]) -> list[torch.Tensor | None]:
    """Per layer ``[batch, kv_heads, tokens, tokens]`` bool: which keys each query saw."""
    total = records[-1].end
    masks: list[torch.Tensor | None] = []
    for layer in range(num_layers):
        if not evicting[layer]:
            masks.append(None)
            continue
        mask = None
        for record in records:
            entry = record.kept[layer]
            span = record.end - record.start
            if mask is None:
                shape = entry[0].shape[:2] if entry is not None else None
                if shape is None:  # first call: nothing cached yet; shape comes from a later record
                    shape = next(r.kept[layer][0].shape[:2] for r in records if r.kept[layer] is not None)
                mask = torch.zeros(*shape, total, total, dtype=torch.bool)
            causal = torch.ones(span, span, dtype=torch.bool).tril()
            mask[:, :, record.start : record.end, record.start : record.end] = causal
            if entry is not None:
                positions, valid = entry
                keep = positions >= 0 if valid is None else valid & (positions >= 0)
                hits = torch.zeros(*positions.shape[:2], total, dtype=torch.int64)
                hits.scatter_add_(2, positions.clamp(min=0), keep.long())  # padded slots add nothing
                mask[:, :, record.start : record.end, :] |= hits[:, :, None, :] > 0
        masks.append(mask)
    return masks


def masked_recompute(model: torch.nn.Module, input_ids: torch.Tensor, records: list[ForwardRecord]) -> torch.Tensor:
    """Logits ``[batch, tokens, vocab]`` of one full forward with the run's per-layer, per-head visibility."""
    config = model.config.get_text_config(decoder=True)
    evicting = [any(r.kept[i] is not None for r in records) for i in range(config.num_hidden_layers)]
    masks = visibility_masks(records, config.num_hidden_layers, evicting)
    implementation = model.config._attn_implementation

    def reference_attention(module, query, key, value, attention_mask, **kwargs):
        mask = masks[module.layer_idx]
        if mask is None:
            return original_attention(implementation, module)(module, query, key, value, attention_mask, **kwargs)
        groups = query.shape[1] // key.shape[1]
        full = mask.to(query.device).repeat_interleave(groups, dim=1)
        keys, values = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=full, scale=kwargs.get("scaling") or module.scaling
        )
        return out.transpose(1, 2).contiguous(), None

    register_functions(_REFERENCE_NAME, reference_attention, original_mask(implementation))
    saved = model.config._attn_implementation
    try:
        model.config._attn_implementation = _REFERENCE_NAME
        with torch.no_grad():
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand(input_ids.shape[0], -1)
            return model(input_ids=input_ids, position_ids=positions, use_cache=False).logits
    finally:
        model.config._attn_implementation = saved
        unregister_functions(_REFERENCE_NAME)
