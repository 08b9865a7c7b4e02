"""KVzip on tiny random models: the repeat pass scores what an independent eager reference
computes, leaves the cache untouched, keeps-all exactly, refuses what it cannot serve, and gives
the same selection through a shared prefill and in batches as alone."""

from __future__ import annotations

import functools

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError, MissingTokenizerError
from kvpolicy.integrations.hf.attention import visibility
from kvpolicy.integrations.hf.generate import cache_keyword
from kvpolicy.integrations.hf.reconstruction import attend_recording_max, reconstruct_if_due
from kvpolicy.integrations.hf.shared_prefill import fork, prefill, prepare, record_prompt
from kvpolicy.integrations.hf.tiny import byte_tokenizer, random_ids, tiny_model
from kvpolicy.types import Schedule


@functools.cache
def _model(family: str, implementation: str = "sdpa") -> torch.nn.Module:
    return tiny_model(family, seed=0, attn_implementation=implementation)


def kvzip(budget=8, chunk_size: int | None = None) -> kvpolicy.Policy:
    policy = kvpolicy.build("kvzip", budget=budget)
    if chunk_size is not None:
        policy.extractor.config = type(policy.extractor.config)(chunk_size=chunk_size)
    policy.bind_tokenizer(byte_tokenizer())
    return policy


def scores_of(policy, model, ids, mask=None) -> tuple[dict[int, torch.Tensor], object]:
    """The repeat pass's scores on every managed layer after ``ids``, and the cache (nothing evicted)."""
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.feed(ids, attention_mask=mask, evict=False)
        cache = handle.cache
        reconstruct_if_due(handle._attachment, cache)
    return {i: cache.layers[i].reconstruction for i in cache.managed}, cache


def eager_reference(family: str, ids: torch.Tensor, policy) -> dict[int, torch.Tensor]:
    """Plain transformers, eager attention with ``output_attentions``: each chunk's repeat fed
    after the context on a fresh DynamicCache; every context slot's max over the chunk's queries
    and its group's query heads, taken from the chunk that repeats it."""
    from transformers import DynamicCache

    model = _model(family, "eager")
    keyword = cache_keyword(model)
    config = model.config
    kv_heads = config.num_key_value_heads
    groups = config.num_attention_heads // kv_heads
    tokens = ids.shape[1]
    out = {i: torch.zeros(1, kv_heads, tokens) for i in range(config.num_hidden_layers)}
    for start, stop, repeat in policy.repeat_prompt().chunks(ids):
        with torch.no_grad():
            cache = DynamicCache(config=config)
            model(ids, use_cache=True, **{keyword: cache})
            attentions = model(repeat, use_cache=True, output_attentions=True, **{keyword: cache}).attentions
        for i, weights in enumerate(attentions):  # [1, heads, queries, tokens + queries]
            grouped = weights[:, :, :, :tokens].reshape(1, kv_heads, groups, weights.shape[2], tokens)
            out[i][..., start:stop] = grouped.amax(dim=(2, 3))[..., start:stop]
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk_size", [None, 11])
def test_scores_equal_an_eager_reference(family, chunk_size):
    ids = random_ids(1, 30, seed=1)
    policy = kvzip(chunk_size=chunk_size)
    scores, _ = scores_of(policy, _model(family), ids)
    reference = eager_reference(family, ids, policy)
    assert len(policy.repeat_prompt().chunks(ids)) == (1 if chunk_size is None else 3)
    for index, got in scores.items():
        assert got.shape == reference[index].shape
        torch.testing.assert_close(got, reference[index], rtol=1e-5, atol=1e-6)
        assert bool((got > 0).all())


def test_repeat_pass_leaves_the_cache_bit_identical():
    model, ids = _model("llama"), random_ids(2, 26, seed=3)
    policy = kvzip()
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.feed(ids, evict=False)
        cache = handle.cache
        before = {
            i: [layer.keys, layer.values, layer.positions, layer.token_ids, layer.row_seen, layer.row_new]
            for i, layer in enumerate(cache.layers)
        }
        saved = [t.clone() for tensors in before.values() for t in tensors]
        seen, row_seen = cache.seen, cache.row_seen.clone()
        reconstruct_if_due(handle._attachment, cache)
        assert handle.cache is cache
    after = [t for i, layer in enumerate(cache.layers)
             for t in (layer.keys, layer.values, layer.positions, layer.token_ids, layer.row_seen, layer.row_new)]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(after, saved, strict=True))
    assert cache.seen == seen and torch.equal(cache.row_seen, row_seen)
    assert all(cache.layers[i].reconstruction.shape == (2, 2, 26) for i in cache.managed)


def test_evicted_run_keeps_the_prefill_keys_of_the_kept_positions():
    """After the repeat pass and the eviction pass, every kept slot holds exactly the key and
    value the prefill wrote for its position: only the eviction changed the cache."""
    model, ids = _model("llama"), random_ids(1, 40, seed=4)
    with torch.inference_mode(), kvpolicy.build("full").attach(model) as handle:
        handle.feed(ids)
        full = handle.cache
    policy = kvzip(budget=10)
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.feed(ids)
        report = handle.report()
        cache = handle.cache
    assert report.eviction_passes == 1 and report.kept_fraction < 0.5
    for i in cache.managed:
        layer, reference = cache.layers[i], full.layers[i]
        index = layer.positions.clamp(min=0)
        keys = reference.keys.gather(2, index[..., None].expand(-1, -1, -1, reference.keys.shape[-1]))
        values = reference.values.gather(2, index[..., None].expand(-1, -1, -1, reference.values.shape[-1]))
        real = (layer.positions >= 0)[..., None]
        assert torch.equal(layer.keys * real, keys * real) and torch.equal(layer.values * real, values * real)
        kept = (layer.positions >= 0).sum(-1)
        assert int(kept.sum()) == 10 * kept.shape[1]  # heads share the layer's budget
        assert bool((layer.positions[..., :4] == torch.arange(4)).all())  # sinks kept by every head


def test_heads_keep_different_counts():
    policy = kvzip(budget=12)
    with torch.inference_mode(), policy.attach(_model("llama")) as handle:
        handle.feed(random_ids(1, 60, seed=5))
        counts = [(handle.cache.layers[i].positions >= 0).sum(-1) for i in handle.cache.managed]
    assert any(bool((c != c[..., :1]).any()) for c in counts)  # head-wise, non-uniform
    assert all(int(c.sum()) == 12 * c.shape[1] for c in counts)


def test_keep_all_budget_generates_exactly_the_bare_model():
    model, ids = _model("llama"), random_ids(1, 30, seed=6)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    result = kvzip(budget=10_000).generate(model, {"input_ids": ids}, max_new_tokens=6, do_sample=False)
    assert torch.equal(result.sequences, plain)
    assert result.report.eviction_passes == 1 and result.report.kept_fraction == 1.0


def test_needs_a_tokenizer():
    policy = kvpolicy.build("kvzip", budget=8)
    with pytest.raises(MissingTokenizerError, match="bind_tokenizer"), policy.attach(_model("llama")) as handle:
        handle.feed(random_ids(1, 20, seed=7))
    with pytest.raises(MissingTokenizerError):
        prefill(policy, _model("llama"), random_ids(1, 20, seed=7))


@pytest.mark.parametrize("schedule", [Schedule("every_step"), Schedule("every_n", every=16)])
def test_refuses_a_schedule_evicting_mid_prompt(schedule):
    with pytest.raises(InvalidConfigError, match="after_prefill"):
        kvpolicy.build("kvzip", schedule=schedule)


def test_shared_prefill_and_fork_select_as_a_direct_run():
    model, ids = _model("llama"), random_ids(1, 48, seed=8)
    policy = kvzip(budget=12)
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.feed(ids)
        direct = {i: handle.cache.layers[i].positions.clone() for i in handle.cache.managed}
    shared = prefill(policy, model, ids)
    for rows in (1, 2):
        with fork(shared, policy, model, rows=rows) as handle:
            for i, positions in direct.items():
                assert torch.equal(handle.cache.layers[i].positions, positions.expand(rows, -1, -1))
    assert all(shared.cache.layers[i].reconstruction is not None for i in shared.cache.managed)


def test_policies_repeating_alike_share_one_repeat_pass():
    """``prepare`` with one ``repeats`` dict per recording runs KVzip's repeat pass once for
    policies that repeat the context alike, and each gets the scores (and is charged the cost)
    it gets alone."""
    model, ids = _model("llama"), random_ids(1, 48, seed=12)
    threshold = kvpolicy.build("kvzip-threshold")
    threshold.bind_tokenizer(byte_tokenizer())
    policies = [kvzip(budget=12), threshold]
    cache, last = record_prompt(model, ids, policies[0].requirements | threshold.requirements)
    repeats: dict = {}
    shared = [prepare(policy, model, cache, last, repeats=repeats) for policy in policies]
    assert len(repeats) == 1  # one pass for both
    ((scores, cost),) = repeats.values()
    for policy, got in zip(policies, shared, strict=True):
        alone = prepare(policy, model, cache, last)
        for i in alone.cache.managed:
            assert torch.equal(got.cache.layers[i].reconstruction, alone.cache.layers[i].reconstruction)
        for i, features in alone.features.items():
            assert torch.equal(got.features[i], features)
        assert got.cache.policy_seconds >= cost and got.seconds >= cost  # charged as if it ran the pass
    other = kvzip(budget=12, chunk_size=16)  # another repeat prompt: its own pass
    prepare(other, model, cache, last, repeats=repeats)
    assert len(repeats) == 2


def test_same_length_rows_score_as_each_row_alone():
    model, ids = _model("qwen2"), random_ids(2, 32, seed=9)
    together, _ = scores_of(kvzip(), model, ids)
    for row in range(2):
        alone, _ = scores_of(kvzip(), model, ids[row : row + 1])
        for i, scores in alone.items():
            torch.testing.assert_close(together[i][row : row + 1], scores, rtol=1e-5, atol=1e-6)


def test_left_padded_rows_are_repeated_on_their_own_tokens():
    model = _model("llama")
    long, short = random_ids(1, 30, seed=10), random_ids(1, 21, seed=11)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    together, _ = scores_of(kvzip(), model, ids, mask)
    for row, alone_ids, pad in ((0, long, 0), (1, short, 9)):
        alone, _ = scores_of(kvzip(), model, alone_ids)
        for i, scores in alone.items():
            torch.testing.assert_close(together[i][row : row + 1, :, pad:], scores, rtol=1e-5, atol=1e-6)
            assert bool((together[i][row, :, :pad] == 0).all())
    policy = kvzip(budget=8)
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.feed(ids, attention_mask=mask)
        report = handle.report(row=1)
    assert report.eviction_passes == 1 and report.kept_fraction < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the fused CPU kernel, the plain pass
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_maximum_equals_the_softmax_maximum(dtype, softcap, padded):
    generator = torch.Generator().manual_seed(12)
    batch, kv_heads, groups, before, new, dim = 2, 2, 3, 17, 9, 8
    query = torch.randn(batch, kv_heads * groups, new, dim, generator=generator, dtype=dtype)
    key = torch.randn(batch, kv_heads, before + new, dim, generator=generator, dtype=dtype)
    value = torch.randn(batch, kv_heads, before + new, dim, generator=generator, dtype=dtype)
    valid = None
    if padded:
        valid = torch.ones(batch, kv_heads, before + new, dtype=torch.bool)
        valid[1, :, :5] = False  # left padding of row 1
        valid[0, 1, 3] = False  # a slot head 1 no longer holds
    output, received = attend_recording_max(query, key, value, valid, 0.3, softcap, max_elements=64)
    scores = query @ key.repeat_interleave(groups, 1).mT * 0.3
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    seen = visibility(before, new, valid, key.device)
    seen = seen if seen.shape[1] == 1 else seen.repeat_interleave(groups, 1)
    probabilities = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    expected = (probabilities @ value.repeat_interleave(groups, 1)).transpose(1, 2)
    most = probabilities[..., :before].reshape(batch, kv_heads, groups, new, before).amax(dim=(2, 3))
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(output, expected, **tolerance)
    torch.testing.assert_close(received, most.float(), **tolerance)
    if padded:
        assert bool((received[1, :, :5] == 0).all()) and float(received[0, 1, 3]) == 0.0
