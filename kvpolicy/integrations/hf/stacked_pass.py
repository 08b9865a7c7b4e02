"""The layers due at one step planned as one pass: their views stacked along the batch.

A per-step policy (TOVA) drops a token or two of every layer at every decoding step. Run layer by
layer, each pass costs a fixed few dozen small operations (view, extract, score, select, checks,
the move) whatever the cache's size: on SmolLM2 at 8k tokens and a 25 % budget that was ≈ 20 ms
of a 102 ms step, and it made per-step TOVA decode no faster than the full cache. When every
component declares that it treats batch rows alone and ignores the layer's index
(`kvpolicy.types.Capabilities.plans_layers_together`), the due layers whose views have the same
shapes are stacked into one `LayerView` and planned once (`Policy.choose`), and their keys and
values are kept in place by one native call (`kvpolicy.integrations.hf.layer.keep_layers_in_place`). Each layer ends
with exactly the tokens, state and counters its own pass would have left (tested equal).

What is not stacked runs layer by layer as before (`kvpolicy.integrations.hf.eviction`): padded
rows, rows due on different counters, skipped layers, a population loaded, and any stacked plan
that raises (its layer-by-layer rerun raises the same error naming its layer).
"""

from __future__ import annotations

from typing import Any

import torch

from kvpolicy.errors import KVPolicyError
from kvpolicy.integrations.hf.layer import EvictingLayer, keep_layers_in_place
from kvpolicy.integrations.hf.layer_view import layer_view, store_state
from kvpolicy.types import LayerView, Requirements, Selection, stack_views
from kvpolicy.types.views import STACKED_FIELDS


def evict_together(
    layers: list[Any],
    policy: Any,
    num_layers: int,
    requirements: Requirements,
    due: list[tuple[int, list[list[int]]]],
) -> list[tuple[int, list[list[int]]]]:
    """Run the passes of ``due`` (layer index, groups of due rows) that can be stacked, in
    stacks of at least two layers; returns the ``due`` entries left to run one by one."""
    views: dict[int, LayerView] = {}
    for index, groups in due:
        layer = layers[index]
        if _stackable(layer, index, groups, policy):
            views[index] = layer_view(layer, index, num_layers, requirements)[0]
    stacks: dict[tuple, list[int]] = {}
    for index, view in views.items():
        stacks.setdefault(_signature(view), []).append(index)
    done: set[int] = set()
    for indices in stacks.values():
        if len(indices) > 1 and _run_stack([layers[i] for i in indices], [views[i] for i in indices], policy):
            done.update(indices)
    return [(index, groups) for index, groups in due if index not in done]


def _stackable(layer: Any, index: int, groups: list[list[int]], policy: Any) -> bool:
    """A layer whose pass covers its whole batch, stored in order with no padding."""
    return (
        isinstance(layer, EvictingLayer)
        and len(groups) == 1
        and len(groups[0]) == layer.batch
        and layer.valid is None
        and layer.reconstruction is None
        and index not in policy.skip_layers
    )


def _signature(view: LayerView) -> tuple:
    """What must agree for views to stack: every tensor's shape and dtype, and the step."""
    fields = [(name, _described(getattr(view, name))) for name in STACKED_FIELDS]
    state = [(name, _described(tensor)) for name, tensor in sorted(view.state.items())]
    queries = None if view.query_positions is None else tuple(view.query_positions.tolist())
    return view.seen, queries, tuple(fields), tuple(state)


def _described(tensor: torch.Tensor | None) -> tuple | None:
    return None if tensor is None else (tuple(tensor.shape), tensor.dtype, tensor.device)


def _run_stack(layers: list[EvictingLayer], views: list[LayerView], policy: Any) -> bool:
    """Plan ``layers`` as one stacked view and keep each layer's selection; False (nothing
    changed) when the stacked plan raises, so that each layer's own pass runs instead."""
    stacked = stack_views(views)
    given = set(stacked.state)
    try:
        selection = policy.choose(stacked, policy.extract(stacked))
    except KVPolicyError:
        return False
    batch = layers[0].batch
    indices = selection.indices.to(stacked.positions.device, torch.long)
    indices = indices.view(len(layers), batch, *indices.shape[1:])
    valid = None if selection.valid is None else selection.valid.view(indices.shape)
    for number, layer in enumerate(layers):
        state = {name: tensor[number * batch : (number + 1) * batch] for name, tensor in stacked.state.items()}
        store_state(layer, list(range(batch)), state, given, None)
        layer.finish_pass(policy=policy)
    if valid is not None or not keep_layers_in_place(layers, indices):
        for number, layer in enumerate(layers):
            layer.gather(Selection(indices[number], None if valid is None else valid[number]))
    return True
