"""`EvictingLayer.held_share`: which positions of a span survived eviction, read from the cache
(what the vision and control evaluations report as "kept of the asked frame" / "cue kept")."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.integrations.hf import cache
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model
from kvpolicy.types import Schedule


def test_streaming_window_holds_sinks_and_newest_only():
    policy = kvpolicy.build("streaming_llm", budget=8, schedule=Schedule("every_step"))
    with policy.attach(tiny_model("llama")) as handle:
        handle.feed(random_ids(1, 20, seed=3), chunk_size=1)
        layers = handle.cache.layers
        shares = [layer.held_share(0, 20) for layer in layers]
        middle = layers[1].held_share(14, 18)  # a span starting mid-way: its own positions only
    held = [0, 1, 2, 3, 16, 17, 18, 19]  # 4 sinks and the 4 newest
    for share in shares:
        assert share.shape == (1, 20)
        assert share[0].nonzero().flatten().tolist() == held and bool((share[0, held] == 1.0).all())
    assert middle.tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_padded_slots_and_heads_that_differ_count_apart():
    layer = cache.EvictingLayer()
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    positions = torch.tensor([[-1, 0, 1, 2], [0, 1, 2, 3]])
    layer.append(torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8), positions, None, valid, valid.sum(1))
    assert layer.held_share(0, 4).tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    layer.gather(kvpolicy.Selection(torch.tensor([[[0, 1], [2, 3]], [[0, 1], [0, 3]]])))  # a padded slot kept
    assert layer.held_share(0, 4).tolist() == [[0.5, 0.5, 0.5, 0.0], [1.0, 0.5, 0.0, 0.5]]
    assert layer.held_share(1, 1).shape == (2, 0)


@pytest.mark.parametrize(("start", "stop"), [(-1, 3), (4, 2), (True, 3)])
def test_bad_spans_are_refused(start, stop):
    layer = cache.EvictingLayer()
    with pytest.raises(kvpolicy.ShapeError, match="held_share"):
        layer.held_share(start, stop)
