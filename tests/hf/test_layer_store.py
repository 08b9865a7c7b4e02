"""Keys and values live at the front of a store the layer writes in place: decoding appends into
free slots, a pass moves only what follows the first evicted slot, and nothing shared with a copy
is ever written."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.integrations.hf.layer import SPARE_SLOTS, EvictingLayer, expand_index, gather_tokens
from kvpolicy.integrations.hf.tiny import random_ids


def _layer(tokens: int, seed: int = 0) -> EvictingLayer:
    generator = torch.Generator().manual_seed(seed)
    layer = EvictingLayer()
    keys, values = torch.randn(2, 3, tokens, 4, generator=generator), torch.randn(2, 3, tokens, 4, generator=generator)
    layer.append(keys, values, torch.arange(tokens).expand(2, -1), None)
    return layer


def _managed(cache):
    return [cache.layers[i] for i in cache.managed]


def test_appends_write_into_free_slots_until_the_store_is_full():
    layer = _layer(5)
    store = layer.store[0]
    assert store.shape[2] == 5 + SPARE_SLOTS and layer.keys.shape[2] == 5
    written = []
    for step in range(SPARE_SLOTS):
        new = torch.full((2, 3, 1, 4), float(step))
        layer.append(new, -new, torch.full((2, 1), 5 + step), None)
        written.append(new)
        assert layer.store[0] is store  # no copy of the cache for this token
    assert torch.equal(layer.keys[:, :, 5:], torch.cat(written, 2))
    assert torch.equal(layer.values[:, :, 5:], -torch.cat(written, 2))
    layer.append(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4), torch.full((2, 1), 5 + SPARE_SLOTS), None)
    assert layer.store[0] is not store and layer.keys.shape[2] == 6 + SPARE_SLOTS  # full: a new, larger store


def test_a_prefill_chunk_leaves_room_for_the_next_one():
    layer = _layer(300)
    assert layer.store[0].shape[2] == 600  # as many free slots as the call appended
    store = layer.store[0]
    layer.append(torch.zeros(2, 3, 300, 4), torch.zeros(2, 3, 300, 4), torch.arange(300, 600).expand(2, -1), None)
    assert layer.store[0] is store
    big = _layer(4096)
    assert big.store[0].shape[2] == 4096 + 8 * SPARE_SLOTS  # bounded: a whole prompt in one call


@pytest.mark.parametrize("kept", ["prefix", "one_dropped", "heads_differ", "all_moved"])
def test_a_pass_in_the_store_keeps_what_gather_keeps(kept):
    layer = _layer(40, seed=1)
    keys, values = layer.keys.clone(), layer.values.clone()
    if kept == "prefix":
        indices = torch.arange(30).expand(2, 3, -1)
    elif kept == "one_dropped":
        indices = torch.cat([torch.arange(17), torch.arange(18, 40)]).expand(2, 3, -1)
    elif kept == "heads_differ":
        generator = torch.Generator().manual_seed(2)
        indices = torch.stack([torch.randperm(40, generator=generator)[:33].sort().values for _ in range(6)]).view(
            2, 3, 33
        )
    else:
        indices = torch.arange(10, 40).expand(2, 3, -1)
    store = layer.store[0]
    layer._take(indices)
    assert layer.store is not None and layer.store[0] is store  # moved in place, not copied out
    assert torch.equal(layer.keys, keys.gather(2, expand_index(indices, keys)))
    assert torch.equal(layer.values, values.gather(2, expand_index(indices, values)))
    assert torch.equal(
        gather_tokens(layer.keys, indices[..., :5]), layer.keys.gather(2, expand_index(indices[..., :5], layer.keys))
    )


def test_a_pass_keeping_far_fewer_tokens_gathers_a_smaller_store():
    layer = _layer(600, seed=3)
    store = layer.store[0]
    layer._take(torch.arange(0, 600, 10).expand(2, 3, -1))
    assert layer.store is None and layer.keys.shape[2] == 60 and layer.keys.data_ptr() != store.data_ptr()


def test_a_copy_never_sees_the_cache_it_was_copied_from_change(llama):
    """A cache copied mid-decoding (a shared prefill, a fork) keeps its tokens while the
    original goes on appending and evicting in place."""
    policy = kvpolicy.build("tova", budget=24)
    with torch.inference_mode(), policy.attach(llama) as handle:
        handle.feed(random_ids(1, 40, seed=4), chunk_size=16)
        snapshot = handle.cache.copy()
        before = [(layer.keys.clone(), layer.values.clone()) for layer in _managed(snapshot)]
        for step in range(5):
            handle.feed(random_ids(1, 1, seed=10 + step))
        for (keys, values), layer in zip(before, _managed(snapshot), strict=True):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        original = _managed(handle.cache)[0]
        assert original.store is not None and original.store[0].data_ptr() != _managed(snapshot)[0].keys.data_ptr()


def test_decoding_continues_outside_inference_mode(llama):
    """A cache filled under inference_mode (inference tensors cannot be written outside it)
    takes new tokens under no_grad, as transformers' generate runs."""
    policy = kvpolicy.build("tova", budget=24)
    ids = random_ids(1, 40, seed=5)
    with policy.attach(llama) as handle:
        with torch.inference_mode():
            handle.feed(ids, chunk_size=16)
        with torch.no_grad():
            logits = handle.feed(random_ids(1, 1, seed=6))
    with torch.inference_mode(), policy.attach(llama) as handle:
        handle.feed(ids, chunk_size=16)
        same = handle.feed(random_ids(1, 1, seed=6))
    torch.testing.assert_close(logits, same)
