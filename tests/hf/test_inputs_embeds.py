"""Decoding driven by ``inputs_embeds`` (a model that embeds its own inputs, e.g. a Decision
Transformer): exact with keep-all, equal to a masked full recompute when evicting, on the causal
LM and on its base model (LlamaModel, no head)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.errors import ShapeError, UnsupportedModelError
from kvpolicy.integrations.hf.attach import cache_keyword
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model
from kvpolicy.testing.reference import ForwardRecord, kept_before_forward, masked_recompute
from kvpolicy.types import Schedule


def _steps(embeds: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(embeds.split(sizes, dim=1))


def _chunks(total: int) -> list[int]:
    """A first chunk of 5 tokens, then 3-token steps (a Decision Transformer's rhythm)."""
    sizes = [5]
    while sum(sizes) < total:
        sizes.append(min(3, total - sum(sizes)))
    return sizes


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_keep_all_on_the_base_model_is_bit_identical_to_the_bare_model(family):
    causal = tiny_model(family)
    base = causal.model  # LlamaModel / Qwen2Model / Gemma3TextModel: no head, no generate
    embeds = causal.get_input_embeddings()(random_ids(1, 41, seed=3))
    sizes = _chunks(embeds.shape[1])
    bare_cache = DynamicCache(config=base.config)
    keyword = cache_keyword(base)
    with torch.no_grad():
        bare = [
            base(inputs_embeds=chunk, use_cache=True, **{keyword: bare_cache}).last_hidden_state
            for chunk in _steps(embeds, sizes)
        ]
    with kvpolicy.build("full").attach(base) as handle:
        attached = [handle.feed_embeds(chunk) for chunk in _steps(embeds, sizes)]
        assert handle.report().seen == embeds.shape[1]
    for expected, got in zip(bare, attached, strict=True):
        assert torch.equal(expected, got)
    assert not hasattr(base, "generate")  # attach added nothing and detach left nothing behind


@pytest.mark.parametrize("preset", ["streaming_llm", "h2o", "tova"])
def test_evicting_embeds_decoding_equals_a_masked_full_recompute(preset):
    model = tiny_model("llama")
    ids = random_ids(1, 60, seed=5)
    embeds = model.get_input_embeddings()(ids).detach()
    policy = kvpolicy.build(preset, budget=12, schedule=Schedule("every_step"))
    logits, records = [], []
    with policy.attach(model) as handle:
        for chunk in _steps(embeds, _chunks(ids.shape[1])):
            cache = handle.cache
            kept, start = kept_before_forward(cache), cache.seen
            logits.append(handle.feed_embeds(chunk))
            records.append(ForwardRecord(start, start + chunk.shape[1], kept))
        assert max(handle.report().kept[-1]) <= 12
    reference = masked_recompute(model, ids, records)
    assert torch.allclose(torch.cat(logits, dim=1), reference, atol=1e-4)
    # and it is the same run as the one fed token ids
    with policy.attach(model) as handle:
        by_ids = [handle.feed(chunk) for chunk in ids.split(_chunks(ids.shape[1]), dim=1)]
    assert torch.equal(torch.cat(by_ids, dim=1), torch.cat(logits, dim=1))


def test_policy_needing_token_ids_refuses_embeddings():
    model = tiny_model("llama")
    embeds = model.get_input_embeddings()(random_ids(1, 8)).detach()
    with kvpolicy.build("fastgen").attach(model) as handle:
        with pytest.raises(UnsupportedModelError, match="needs token ids"):
            handle.feed_embeds(embeds)


def test_feed_embeds_validates_its_input_and_base_models_cannot_generate():
    model = tiny_model("llama")
    with kvpolicy.build("full").attach(model.model) as handle:
        with pytest.raises(ShapeError, match=r"inputs_embeds \[batch, tokens, 64\]"):
            handle.feed_embeds(torch.zeros(1, 4, 32))
        with pytest.raises(ShapeError, match="floating"):
            handle.feed_embeds(torch.zeros(1, 4, 64, dtype=torch.long))
    with pytest.raises(UnsupportedModelError, match="cannot generate"):
        kvpolicy.build("full").generate(model.model, random_ids(1, 4))
