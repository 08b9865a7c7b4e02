"""Checks of selectors: the selection contract, protection over pinned scores, the score order (unless declared otherwise)."""

from __future__ import annotations

from typing import Any

import torch

from kvpolicy.testing import strategies as kst
from kvpolicy.testing.conformance.base import Target, _fail, _for_all
from kvpolicy.testing.conformance.components import another_layer
from kvpolicy.testing.invariants import keeps_highest_scores, selection_violations
from kvpolicy.testing.views import copy_view, index_view
from kvpolicy.types import (
    Budget,
    LayerView,
    capabilities,
    stack_views,
)

# --------------------------------------------------------------------------- selectors


def _score_order(target: Target, selector: Any) -> bool:
    return bool(target.options.get("score_order", keeps_highest_scores(selector)))


def check_selector_contract(target: Target) -> None:
    selector = target.make()
    needs_budget = capabilities(selector).needs_budget
    order = _score_order(target, selector)

    def body(inputs: kst.SelectorInputs) -> None:
        selection = target.make().select(inputs.scores, inputs.protected, inputs.budget, inputs.view)
        capacity = inputs.budget.capacity(inputs.view.seen)
        problems = selection_violations(selection, inputs.scores, inputs.protected, capacity, score_order=order)
        if problems:
            _fail(target, "selection_contract", "; ".join(problems))

    _for_all(kst.selector_inputs(needs_budget=needs_budget), body)


def check_protection_beats_pinned_scores(target: Target) -> None:
    """Scorers may pin tokens with +inf (SnapKV's window); protection must still win over them."""
    selector = target.make()
    tokens = 6
    scores = torch.full((1, 2, tokens), float("inf"))
    protected = torch.zeros(1, 2, tokens, dtype=torch.bool)
    protected[..., -1] = True
    view = LayerView(layer=0, num_layers=1, positions=torch.arange(tokens).expand(1, 2, tokens), seen=tokens)
    budget = Budget(tokens=1) if capabilities(selector).needs_budget else Budget()
    selection = selector.select(scores, protected, budget, view)
    problems = selection_violations(selection, scores, protected, budget.capacity(tokens), score_order=False)
    if problems:
        _fail(target, "protection_beats_pinned_scores", "with every score +inf: " + "; ".join(problems))


def check_selector_behaviour(target: Target) -> None:
    needs_budget = capabilities(target.make()).needs_budget

    def body(inputs: kst.SelectorInputs) -> None:
        def run(view: LayerView, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            scores, protected = inputs.scores, inputs.protected
            if rows is not None:
                scores, protected = scores.index_select(0, rows), protected.index_select(0, rows)
            before = (scores.clone(), protected.clone())
            selection = target.make().select(scores, protected, inputs.budget, view)
            if not (torch.equal(before[0], scores) and torch.equal(before[1], protected)):
                _fail(target, "behaviour", "modified the scores or the protected mask in place")
            valid = selection.valid if selection.valid is not None else torch.ones_like(selection.indices, dtype=bool)
            return selection.indices, valid

        first = run(copy_view(inputs.view))
        again = run(copy_view(inputs.view))
        if not (torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])):
            _fail(target, "behaviour", "two calls with the same inputs selected different tokens")
        if inputs.view.batch > 1:
            order = torch.arange(inputs.view.batch).flip(0)
            permuted = run(index_view(inputs.view, order), order)
            if not (torch.equal(permuted[0], first[0][order]) and torch.equal(permuted[1], first[1][order])):
                _fail(target, "behaviour", "reordering the batch rows changed which tokens each row keeps")
        if capabilities(target.make()).plans_layers_together:
            _check_layers_together(target, inputs)

    _for_all(kst.selector_inputs(needs_budget=needs_budget), body)


def _check_layers_together(target: Target, inputs: kst.SelectorInputs) -> None:
    """Declared `plans_layers_together`: two layers' views stacked (the second with its rows
    reversed) keep for each what it keeps alone."""
    order = torch.arange(inputs.view.batch).flip(0)
    other = another_layer(inputs.view)
    pairs = [(inputs.scores, inputs.protected), (inputs.scores[order], inputs.protected[order])]

    def select(view: LayerView, scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
        selection = target.make().select(scores.clone(), protected.clone(), inputs.budget, view)
        valid = selection.valid if selection.valid is not None else torch.ones_like(selection.indices, dtype=bool)
        return torch.where(valid, selection.indices, -1)  # what is kept, padding aside

    together = select(
        stack_views([copy_view(inputs.view), copy_view(other)]),
        torch.cat([pairs[0][0], pairs[1][0]]),
        torch.cat([pairs[0][1], pairs[1][1]]),
    )
    alone = [select(copy_view(view), *pair) for view, pair in zip((inputs.view, other), pairs, strict=True)]
    width = max(part.shape[-1] for part in (together, *alone))
    widened = [torch.nn.functional.pad(part, (0, width - part.shape[-1]), value=-1) for part in (together, *alone)]
    if not torch.equal(widened[0], torch.cat(widened[1:])):
        _fail(
            target,
            "behaviour",
            "declares plans_layers_together, but two layers' views stacked kept other tokens than each alone",
        )
