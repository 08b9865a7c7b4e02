"""Requirements are honoured: attention rows and accumulated attention equal eager attention
probabilities (GQA-averaged), and a key-only policy computes no attention statistics at all."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from hf_helpers import AccumulatedScorer, RecordingExtractor

import kvpolicy
from kvpolicy.integrations.hf import cache, in_pass
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model
from kvpolicy.testing import statistics
from kvpolicy.types import EmptyConfig, LayerView, Requirements, Schedule, extend_tokens


def _eager_probabilities(family: str, ids: torch.Tensor) -> list[torch.Tensor]:
    """``[batch, kv_heads, tokens, tokens]`` per layer from eager attention, GQA-averaged."""
    model = tiny_model(family, attn_implementation="eager")
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    kv = model.config.num_key_value_heads
    return [a.reshape(a.shape[0], kv, -1, *a.shape[2:]).mean(2) for a in attentions]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_rows_match_eager_attention(family):
    ids = random_ids(1, 24, seed=14)
    extractor = RecordingExtractor(Requirements(attention_window=6))
    policy = kvpolicy.Policy(extractor, "feature", "threshold", schedule=Schedule("every_n", every=24))
    with policy.attach(tiny_model(family)) as handle:
        handle.feed(ids, chunk_size=5)  # rows buffered across forward calls of different sizes
    reference = _eager_probabilities(family, ids)
    assert [v.layer for v in extractor.views] == [0, 1]
    for view in extractor.views:
        assert view.attention.shape == (1, 2, 6, 24)
        assert view.query_positions.tolist() == list(range(18, 24))
        assert torch.allclose(view.attention, reference[view.layer][:, :, 18:], atol=1e-5)
        assert view.keys is None and view.accumulated_attention is None and view.token_ids is None


def test_accumulated_attention_matches_eager_attention():
    ids = random_ids(2, 20, seed=15)
    extractor = RecordingExtractor()
    policy = kvpolicy.Policy(extractor, AccumulatedScorer(), "threshold", schedule=Schedule("every_n", every=20))
    with policy.attach(tiny_model("llama")) as handle:
        handle.feed(ids, chunk_size=6)
    reference = _eager_probabilities("llama", ids)
    for view in extractor.views:
        assert torch.allclose(view.accumulated_attention, reference[view.layer].sum(2), atol=1e-5)
        assert view.attention is None


def test_key_only_policy_computes_no_attention_statistics(llama, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("attention statistics computed for a key-only policy")

    monkeypatch.setattr(statistics, "attention_columns", forbidden)  # recorded through the cache
    monkeypatch.setattr(statistics, "attention_rows", forbidden)
    monkeypatch.setattr(in_pass, "attend", forbidden)
    extractor = RecordingExtractor(Requirements(keys=True))
    policy = kvpolicy.Policy(extractor, "feature", "top_k", schedule=Schedule("every_step"), budget=6)
    with policy.attach(llama) as handle:
        handle.feed(random_ids(1, 15, seed=16), chunk_size=4)
        layers = [handle.cache.layers[i] for i in handle.cache.managed]
    assert extractor.views and all(v.keys is not None and v.attention is None for v in extractor.views)
    assert all(v.accumulated_attention is None and v.token_ids is None for v in extractor.views)
    assert all(layer.window is None and layer.accumulated is None for layer in layers)


class CountingExtractor:
    """Keeps a per-token count in ``state`` (appending new tokens with `extend_tokens`) and asks for ids."""

    name: ClassVar[str] = "counting"
    Config = EmptyConfig

    def __init__(self) -> None:
        self.config = EmptyConfig()

    @property
    def requirements(self) -> Requirements:
        return Requirements(token_ids=True)

    def extract(self, view: LayerView) -> torch.Tensor:
        count = view.state.get("count", torch.zeros(view.batch, view.kv_heads, 0))
        count = extend_tokens(count, view.tokens) + 1
        view.state["count"] = count
        view.state["id_copy"] = view.token_ids.clone().float()
        return view.positions.float().unsqueeze(-1)


def test_state_and_token_ids_are_gathered_with_the_keys(llama):
    ids = random_ids(1, 30, seed=17)
    policy = kvpolicy.Policy(
        CountingExtractor(), "feature", "top_k", schedule=Schedule("every_step"), budget=5, sinks=1
    )
    with policy.attach(llama) as handle:
        handle.feed(ids, chunk_size=4)
        layer = handle.cache.layers[1]
        positions = layer.positions[0, 0]
        assert layer.token_ids[0, 0].tolist() == ids[0, positions].tolist()
        assert torch.equal(layer.state["id_copy"][0, 0], ids[0, positions].float())
        assert layer.state["count"].shape[2] == layer.keys.shape[2] == 5
        assert positions.tolist() == [0, 26, 27, 28, 29]


def test_gather_rejects_bad_selections():
    layer = cache.EvictingLayer()
    layer.append(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.arange(4), None)
    with pytest.raises(kvpolicy.ShapeError, match=r"\[0, 4\)"):
        layer.gather(kvpolicy.Selection(torch.tensor([[[0, 4], [1, 2]]])))
    with pytest.raises(kvpolicy.ShapeError, match="kv_heads=2"):
        layer.gather(kvpolicy.Selection(torch.tensor([[[0, 1]]])))
