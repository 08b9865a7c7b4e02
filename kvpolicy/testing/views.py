"""Copying, permuting and slicing `LayerView`s along the batch dimension.

The conformance checks compare a component's output on a view with its output on the same view
with its batch rows reordered (or taken one at a time); these helpers move every per-row tensor
of the view together so nothing is left misaligned.
"""

from __future__ import annotations

import torch

from kvpolicy.types import LayerView

_PER_ROW = ("positions", "keys", "attention", "accumulated_attention", "token_ids", "reconstruction_attention")


def copy_view(view: LayerView) -> LayerView:
    """A deep copy (components may write `view.state`; the original must stay untouched)."""
    return _rebuild(view, lambda t: t.clone())


def index_view(view: LayerView, rows: torch.Tensor) -> LayerView:
    """The view restricted / reordered to batch ``rows`` (a 1-D index tensor)."""
    return _rebuild(view, lambda t: t.index_select(0, rows).clone())


def _rebuild(view: LayerView, per_row) -> LayerView:
    fields = {name: getattr(view, name) for name in _PER_ROW}
    return LayerView(
        layer=view.layer,
        num_layers=view.num_layers,
        seen=view.seen,
        query_positions=None if view.query_positions is None else view.query_positions.clone(),
        state={k: per_row(v) for k, v in view.state.items()},
        **{k: None if v is None else per_row(v) for k, v in fields.items()},
    )


def snapshot(view: LayerView) -> dict[str, torch.Tensor]:
    """Clones of the view's input tensors, to prove later that a component left them alone."""
    tensors = {name: getattr(view, name) for name in (*_PER_ROW, "query_positions")}
    return {k: v.clone() for k, v in tensors.items() if v is not None}
