"""One layer's eviction pass: which batch rows are due, their views planned, the selection kept.

`EvictingCache.eviction_pass` runs it between forward calls for every layer the policy manages:
schedule (`due_rows`, each row's own `Schedule` from its counters) → view (`layer_view`) → plan
(`Policy.plan`: extract → score → pool → select) → gather (`EvictingLayer.gather`). Rows whose
counters agree are planned together as one batch; rows not due keep every valid slot, so any
pass also drops all left padding and storage never exceeds the longest row per head.
"""

from __future__ import annotations

from typing import Any

import torch

from kvpolicy.integrations.hf.layer import EvictingLayer
from kvpolicy.integrations.hf.layer_view import layer_view, store_state
from kvpolicy.types import Requirements, Selection


def due_rows(layer: Any, policy: Any, prefill_done: bool) -> list[list[int]]:
    """The batch rows of ``layer`` due for ``policy``'s eviction pass now (each row's own
    `Schedule`), grouped by their counters: a group is planned as one batch."""
    if not isinstance(layer, EvictingLayer) or layer.positions is None:
        return []
    counters = list(zip(layer.row_seen.tolist(), layer.row_new.tolist(), layer.row_passes.tolist(), strict=True))
    cached = layer.cached_rows()
    groups: dict[tuple[int, int, int], list[int]] = {}
    if len(set(counters)) == 1 and len(set(cached)) == 1:  # the usual case: one decision for all rows
        counters, cached = counters[:1], cached[:1]
    for row, ((seen, new, passes_done), tokens) in enumerate(zip(counters, cached, strict=True)):
        due = policy.is_due(
            new_tokens=new, cached=tokens, seen=seen, prefill_done=prefill_done, passes_done=passes_done
        )
        if due:
            groups.setdefault((seen, new, passes_done), []).append(row)
    if len(counters) == 1 and groups:
        return [list(range(layer.batch))]
    return list(groups.values())


def evict_rows(
    layer: EvictingLayer,
    policy: Any,
    index: int,
    num_layers: int,
    requirements: Requirements,
    groups: list[list[int]],
) -> None:
    """Layer ``index``'s pass for ``groups`` of due rows. Every other row keeps its valid slots,
    so the pass also drops all left padding; the layer is stored as long as its longest head."""
    batch, kv_heads, tokens = layer.positions.shape
    due = [row for rows in groups for row in rows]
    pieces: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for rows in groups:
        view, order = layer_view(layer, index, num_layers, requirements, rows)
        given = set(view.state)
        if len(rows) == batch:
            selection = policy.plan(view)
        else:
            with policy.population_rows(rows):
                selection = policy.plan(view)
        store_state(layer, rows, view.state, given, order)
        if len(groups) == 1 and len(rows) == batch and order is None:  # the whole batch as stored
            layer.finish_pass(policy=policy)
            if selection is not None:
                layer.gather(selection)
            return
        if selection is None:
            indices = torch.arange(view.tokens, device=view.positions.device).expand(view.positions.shape)
            kept = None
        else:
            indices, kept = selection.indices.to(view.positions.device, torch.long), selection.valid
        if order is not None:
            indices = order.gather(2, indices)
        for j, row in enumerate(rows):
            pieces[row] = (indices[j], None if kept is None else kept[j].to(indices.device, torch.bool))
    for row in range(batch):
        if row not in pieces:  # not due: keep every valid slot, in order
            valid = None if layer.valid is None else layer.valid[row]
            order = torch.arange(tokens, device=layer.positions.device).expand(kv_heads, tokens)
            if valid is not None:
                order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)[..., : int(valid.sum(-1).max())]
            pieces[row] = (order, None if valid is None else valid.gather(1, order))
    width = max(piece[0].shape[-1] for piece in pieces.values())
    indices = layer.positions.new_zeros((batch, kv_heads, width))
    valid = torch.zeros((batch, kv_heads, width), dtype=torch.bool, device=indices.device)
    for row, (row_indices, row_valid) in pieces.items():
        indices[row, :, : row_indices.shape[-1]] = row_indices
        valid[row, :, : row_indices.shape[-1]] = True if row_valid is None else row_valid
    layer.finish_pass(due, policy)
    layer.gather(Selection(indices, valid))
