"""Checks of poolers: output shape and dtype, padded slots kept at -inf, determinism, inputs untouched, batch-permutation equivariance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import strategies as st

from kvpolicy.testing import strategies as kst
from kvpolicy.testing.conformance.base import Target, _fail, _for_all, _same
from kvpolicy.testing.conformance.components import _aligned, another_layer
from kvpolicy.testing.views import copy_view, index_view, snapshot
from kvpolicy.types import capabilities, stack_views

# --------------------------------------------------------------------------- poolers


def _pooler_inputs(target: Target, padded: bool | None = None) -> st.SearchStrategy[kst.PoolerInputs]:
    pooler = target.make()
    return kst.pooler_inputs(pooler.requirements, padded=padded, aligned=_aligned(target, pooler))


def check_pooler_output(target: Target) -> None:
    def body(inputs: kst.PoolerInputs) -> None:
        scores = inputs.scores
        pooled = target.make().pool(scores.clone(), copy_view(inputs.view))
        expected = tuple(scores.shape)
        if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != expected:
            shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            _fail(target, "output_shape", f"pooled scores have shape {shape}; expected {list(expected)}")
        if not pooled.is_floating_point():
            _fail(target, "output_shape", f"pooled scores must be floats, got {pooled.dtype}")
        if torch.isnan(pooled[~inputs.padded]).any():
            _fail(target, "output_shape", "pooled scores have NaN on cached tokens (the scores had none)")

    _for_all(_pooler_inputs(target), body)


def check_pooler_padded_slots(target: Target) -> None:
    """Padded slots neither receive a score (they stay -inf) nor become NaN."""

    def body(inputs: kst.PoolerInputs) -> None:
        pooled = target.make().pool(inputs.scores.clone(), copy_view(inputs.view))
        padded = inputs.padded
        if not bool((pooled[padded] == float("-inf")).all()):
            _fail(
                target,
                "padded_slots",
                f"a padded slot (position < 0) came back as {pooled[padded].max()}; it must stay -inf",
            )

    _for_all(_pooler_inputs(target, padded=True), body)


def _pooler_deterministic(target: Target, inputs: kst.PoolerInputs) -> None:
    a = target.make().pool(inputs.scores.clone(), copy_view(inputs.view))
    b = target.make().pool(inputs.scores.clone(), copy_view(inputs.view))
    if not _same(a, b, exact=True):
        _fail(target, "deterministic", "two runs (fresh objects, same inputs) gave different scores")


def _pooler_leaves_inputs_alone(target: Target, inputs: kst.PoolerInputs) -> None:
    scores, probe = inputs.scores.clone(), copy_view(inputs.view)
    before = snapshot(probe)
    target.make().pool(scores, probe)
    changed = [k for k, v in snapshot(probe).items() if not torch.equal(v, before[k])]
    if not torch.equal(scores, inputs.scores):
        changed.insert(0, "scores")
    if changed:
        _fail(target, "leaves_inputs_alone", f"modified the {', '.join(changed)} in place")


def _pooler_batch_permutation(target: Target, inputs: kst.PoolerInputs) -> None:
    """Row i's pooled scores depend on row i alone: reversing the batch reverses the output."""
    if inputs.view.batch < 2:
        return
    order = torch.arange(inputs.view.batch).flip(0)
    first = target.make().pool(inputs.scores.clone(), copy_view(inputs.view))
    permuted = target.make().pool(inputs.scores.index_select(0, order), index_view(inputs.view, order))
    if not _same(permuted, first.index_select(0, order)):
        _fail(target, "batch_permutation", f"reordering the batch rows {order.tolist()} changed the rows' scores")


def _pooler_layers_together(target: Target, inputs: kst.PoolerInputs) -> None:
    """Declared `plans_layers_together`: two layers' views stacked give each its own scores."""
    if not capabilities(target.make()).plans_layers_together:
        return
    view, order = inputs.view, torch.arange(inputs.view.batch).flip(0)
    other, other_scores = another_layer(view), inputs.scores.index_select(0, order)
    stacked = stack_views([copy_view(view), copy_view(other)])
    together = target.make().pool(torch.cat([inputs.scores, other_scores]), stacked)
    alone = torch.cat(
        [target.make().pool(inputs.scores.clone(), copy_view(view)), target.make().pool(other_scores, copy_view(other))]
    )
    if not _same(together, alone):
        _fail(target, "layers_together", "declares plans_layers_together, but stacked views gave other scores")


_POOLER_BEHAVIOURS = {
    "deterministic": _pooler_deterministic,
    "leaves_inputs_alone": _pooler_leaves_inputs_alone,
    "batch_permutation": _pooler_batch_permutation,
    "layers_together": _pooler_layers_together,
}


def _pooler_behaviour(check: str) -> Callable[[Target], None]:
    def run(target: Target) -> None:
        behaviour = _POOLER_BEHAVIOURS[check]
        _for_all(_pooler_inputs(target), lambda inputs: behaviour(target, inputs))

    return run
