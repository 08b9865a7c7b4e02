"""What a policy sees of one evicting layer (`LayerView`), and the state it hands back.

A view holds exactly what the policy declared in its `Requirements` (keys, the attention rows of
the newest queries, accumulated attention, token ids) besides positions and per-token state. In
a left-padded batch a view covers the batch rows whose counters agree; where padding precedes a
row's tokens, each head's valid slots are listed first, in order: the layout of that row run
alone. `store_state` writes the state a pass leaves in the view back into the stored layout.
"""

from __future__ import annotations

import torch

from kvpolicy.errors import ShapeError
from kvpolicy.integrations.hf.layer import EvictingLayer, check_state, expand_index, gather_tokens, valid_first
from kvpolicy.types import LayerView, Requirements, extend_tokens


def layer_view(
    layer: EvictingLayer, index: int, num_layers: int, requirements: Requirements, rows: list[int] | None = None
) -> tuple[LayerView, torch.Tensor | None]:
    """A `LayerView` of ``layer`` (number ``index``) for batch ``rows`` (all by default; rows
    with the same counters) with exactly what ``requirements`` ask for, and the slot ``order
    [rows, kv_heads, tokens']`` it lists (None: the stored order)."""
    rows = list(range(layer.batch)) if rows is None else rows
    picked = None if len(rows) == layer.batch else torch.tensor(rows)

    def pick(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if picked is None else tensor.index_select(0, picked.to(tensor.device))

    valid = None if layer.valid is None else pick(layer.valid)
    order = None
    if valid is not None and not valid_first(valid):
        kept = int(valid.sum(-1).max())
        order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)[..., :kept]

    def arrange(tensor: torch.Tensor) -> torch.Tensor:
        tensor = pick(tensor)
        return tensor if order is None else gather_tokens(tensor, order.to(tensor.device))

    first = rows[0]
    seen, new = int(layer.row_seen[first]), int(layer.row_new[first])
    present = [k for k in layer.state if bool(holders(layer, k)[rows].all())]
    view = LayerView(
        layer=index,
        num_layers=num_layers,
        positions=arrange(layer.positions),
        seen=seen,
        state={k: arrange(extend_tokens(layer.state[k], layer.tokens)) for k in present},
    )
    if requirements.keys:
        view.keys = arrange(layer.keys)
    window = min(requirements.attention_window, new)
    if window and layer.window is not None:
        recent = layer.window.last(window)
        attention = pick(recent.rows(layer.tokens))
        if order is not None:
            attention = attention.gather(3, order.unsqueeze(2).expand(-1, -1, attention.shape[2], -1))
        view.attention, view.query_positions = attention, pick(recent.query_positions)[0]
    if requirements.accumulated_attention:
        accumulated = layer.accumulated
        if accumulated is None:
            accumulated = torch.zeros(layer.positions.shape, dtype=torch.float32, device=layer.positions.device)
        view.accumulated_attention = arrange(extend_tokens(accumulated, layer.tokens))
    if requirements.token_ids:
        view.token_ids = arrange(layer.token_ids)
    if requirements.reconstruction and layer.reconstruction is not None:
        view.reconstruction_attention = arrange(extend_tokens(layer.reconstruction, layer.tokens))
    return view, order


def store_state(
    layer: EvictingLayer,
    rows: list[int],
    state: dict[str, torch.Tensor],
    given: set[str],
    order: torch.Tensor | None,
) -> None:
    """Write the ``state`` a pass left in the view of ``rows`` (listed in ``order``) back into
    ``layer``'s stored layout; entries of ``given`` the components dropped are dropped for those rows."""
    batch, kv_heads, tokens = layer.positions.shape
    if len(rows) == batch and order is None:
        layer.state = dict(state)
        layer.state_rows = {k: torch.ones(batch, dtype=torch.bool) for k in state}
        return
    index = torch.tensor(rows)
    view_tokens = tokens if order is None else order.shape[2]
    for name, tensor in state.items():
        check_state(name, tensor, view_tokens)
        tensor = extend_tokens(tensor, view_tokens)
        if tuple(tensor.shape[:2]) != (len(rows), kv_heads):
            raise ShapeError(
                f"LayerView.state[{name!r}] has shape {tuple(tensor.shape)}; expected [{len(rows)}, {kv_heads}, ...]"
            )
        full = layer.state.get(name)
        if full is None:
            full = tensor.new_zeros((batch, kv_heads, tokens, *tensor.shape[3:]))
        else:
            full = extend_tokens(full, tokens).clone()  # never write into a tensor a fork may share
        index = index.to(full.device)
        if order is None:
            full[index] = tensor
        else:
            block = full[index]
            block.scatter_(2, expand_index(order.to(full.device), tensor), tensor)
            full[index] = block
        present = holders(layer, name).clone()
        present[rows] = True
        layer.state[name], layer.state_rows[name] = full, present
    for name in given - set(state):
        present = holders(layer, name).clone()
        present[rows] = False
        layer.state_rows[name] = present
        if not bool(present.any()):
            del layer.state[name], layer.state_rows[name]


def holders(layer: EvictingLayer, name: str) -> torch.Tensor:
    """``[batch]`` bool: the rows of ``layer`` holding state entry ``name`` (all, for an entry set directly)."""
    held = layer.state_rows.get(name)
    if held is None:
        held = torch.full((layer.batch,), name in layer.state, dtype=torch.bool)
    return held
