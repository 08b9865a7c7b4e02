"""`Policy.choose` checks what a scorer and a selector return on every eviction pass: NaN scores on real
tokens and malformed selections (protected tokens dropped, duplicates, unsorted, out of range)
are named errors naming the component and the layer; ±inf scores and padded slots stay legal."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidScoresError, InvalidSelectionError
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model
from kvpolicy.selection import sorted_selection
from kvpolicy.testing.strategies import CacheShape, make_view
from kvpolicy.types import Budget, EmptyConfig, LayerView, Requirements, Selection


class PlantedScorer:
    """Position scores with ``plant(scores, view)`` applied: a real scorer with a chosen defect."""

    name: ClassVar[str] = "planted"
    Config = EmptyConfig

    def __init__(self, plant: Callable[[torch.Tensor, LayerView], torch.Tensor]) -> None:
        self.config = EmptyConfig()
        self.plant = plant

    @property
    def requirements(self) -> Requirements:
        return Requirements()

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        return self.plant(features[..., 0].clone(), view)


class PlantedSelector:
    """``top_k``'s rule (protected first, then the best scores), with ``plant`` applied to its indices."""

    name: ClassVar[str] = "planted_selector"
    Config = EmptyConfig
    needs_budget: ClassVar[bool] = True

    def __init__(self, plant: Callable[[Selection, torch.Tensor], Selection]) -> None:
        self.config = EmptyConfig()
        self.plant = plant

    @property
    def requirements(self) -> Requirements:
        return Requirements()

    def select(self, scores: torch.Tensor, protected: torch.Tensor, budget: Budget, view: LayerView) -> Selection:
        keyed = scores.float().masked_fill(protected, float("inf"))
        k = max(budget.capacity(view.seen), int(protected.sum(-1).max()))
        return self.plant(sorted_selection(keyed.topk(k, dim=-1).indices), protected)


def _view(tokens: int = 12, seen: int = 30, layer: int = 2) -> LayerView:
    shape = CacheShape(
        batch=2, kv_heads=2, groups=1, tokens=tokens, head_dim=4, seen=seen, fresh=4, dtype=torch.float32
    )
    return make_view(shape, seed=3, requirements=Requirements(), layer=layer)


def _policy(scorer=None, selector=None, **kwargs) -> kvpolicy.Policy:
    return kvpolicy.Policy("position", scorer or PlantedScorer(lambda s, v: s), selector or "top_k", budget=6, **kwargs)


def _plan(policy: kvpolicy.Policy, view: LayerView) -> Selection:
    return policy.choose(view, policy.extract(view))


def test_nan_score_on_a_real_token_names_scorer_and_layer():
    def nan_at_one_token(scores, view):
        scores[1, 0, 5] = float("nan")
        return scores

    with pytest.raises(InvalidScoresError, match=r"scorer 'planted' returned NaN for 1 .* layer 2 .*row 1, head 0"):
        _plan(_policy(PlantedScorer(nan_at_one_token)), _view())


def test_infinite_scores_stay_legal():
    def pinned(scores, view):
        scores[..., 3] = float("inf")
        scores[..., 4] = float("-inf")
        return scores

    selection = _plan(_policy(PlantedScorer(pinned)), _view())
    assert bool((selection.indices == 3).any(-1).all())  # the pinned token is kept by every head


def _padded_view() -> LayerView:
    """Head 1 of every row keeps 3 fewer tokens than head 0: its last 3 slots are padding (position -1)."""
    view = _view()
    positions = view.positions.clone()
    real = positions[:, 1, 3:].clone()
    positions[:, 1, :-3] = real
    positions[:, 1, -3:] = -1
    view.positions = positions
    return view


def test_nan_on_a_padded_slot_is_ignored():
    view = _padded_view()

    def nan_on_padding(scores, v):
        return scores.masked_fill(v.positions < 0, float("nan"))

    clean = _plan(_policy(PlantedScorer(lambda scores, v: scores)), view)
    planted = _plan(_policy(PlantedScorer(nan_on_padding)), view)
    kept = planted.indices.masked_fill(~planted.valid, -1) if planted.valid is not None else planted.indices
    chosen_positions = view.positions.gather(-1, kept.clamp(min=0))
    assert bool((chosen_positions[kept >= 0] >= 0).all())  # no padded slot is ever kept
    assert torch.equal(planted.indices, clean.indices)  # the NaN on padding changed nothing


def test_padded_selection_slots_may_point_at_zero():
    def pad_last_slot(selection, protected):
        indices = torch.cat([selection.indices, selection.indices[..., :1] * 0], dim=-1)  # one more slot, at 0
        valid = torch.ones_like(indices, dtype=torch.bool)
        valid[..., -1] = False  # ... marked as padding
        return Selection(indices, valid)

    selection = _plan(_policy(selector=PlantedSelector(pad_last_slot), recent=1), _view())
    assert selection.valid is not None


@pytest.mark.parametrize(
    ("plant", "message"),
    [
        (lambda s, p: Selection(s.indices[..., :-1]), r"dropped 4 protected token"),  # the newest is last
        (
            lambda s, p: Selection(torch.cat([s.indices, s.indices[..., -1:]], dim=-1)),
            r"kept slot \d+ twice",
        ),
        (lambda s, p: Selection(s.indices.flip(-1)), "unsorted indices"),
        (lambda s, p: Selection(s.indices + 100), r"must lie in \[0, 12\)"),
        (lambda s, p: Selection(s.indices.float()), "must be integers"),
        (lambda s, p: Selection(s.indices, torch.ones_like(s.indices)), "selection.valid"),
    ],
    ids=["drops-protected", "duplicate", "unsorted", "out-of-range", "float", "valid-not-bool"],
)
def test_malformed_selection_is_a_named_error(plant, message):
    policy = _policy(selector=PlantedSelector(plant), sinks=2)
    with pytest.raises(InvalidSelectionError, match=rf"selector 'planted_selector' on layer 2 .*{message}"):
        _plan(policy, _view())


def test_dropped_sink_is_caught():
    def drop_sinks(selection, protected):
        return sorted_selection(selection.indices[..., 2:])  # sinks sit at slots 0 and 1

    view = _view()
    view.positions[..., :2] = torch.tensor([0, 1])
    with pytest.raises(InvalidSelectionError, match="dropped 8 protected"):
        _plan(_policy(selector=PlantedSelector(drop_sinks), sinks=2), view)


def test_builtin_selectors_pass_the_checks_on_padded_views(registry):
    view = _padded_view()
    for name, config in [("top_k", {}), ("top_k", {"shared_across_heads": True}), ("heavy_recent", {})]:
        policy = kvpolicy.Policy("position", "feature", (name, config), budget=5, sinks=1, registry=registry)
        _plan(policy, view)
    threshold = kvpolicy.Policy("position", ("feature", {"sign": -1.0}), "threshold", sinks=1, registry=registry)
    _plan(threshold, view)


def test_nan_scorer_fails_loudly_inside_generate():
    model = tiny_model("llama")

    def nan_everywhere(scores, view):
        return torch.full_like(scores, float("nan"))

    policy = kvpolicy.Policy(
        "position", PlantedScorer(nan_everywhere), "top_k", budget=8, schedule=kvpolicy.Schedule("every_step")
    )
    with pytest.raises(InvalidScoresError, match=r"scorer 'planted' returned NaN .* on layer 0"):
        policy.generate(model, {"input_ids": random_ids(1, 20, seed=1)}, max_new_tokens=2, do_sample=False)
