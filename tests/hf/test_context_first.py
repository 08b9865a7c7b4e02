"""The ``context-first`` protocol (`kvpolicy.integrations.hf.context_first`): the context is
compressed before the question is appended, and no eviction pass ever sees the question.

Tiny random-weight models; every policy case really evicts (asserted)."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.errors import AttachError, InvalidConfigError, UnsupportedModelError, UnsupportedPaddingError
from kvpolicy.integrations.hf.tiny import random_ids

CONTEXT, QUESTION, CHUNK = 256, 24, 64


def _prompt(seed: int = 0, question_seed: int = 1) -> torch.Tensor:
    return torch.cat([random_ids(1, CONTEXT, seed=seed), random_ids(1, QUESTION, seed=question_seed)], 1)


def _kept_context(cache, context_end: int) -> list[list[list[int]]]:
    """The positions below ``context_end`` each managed layer's heads keep (row 0)."""
    out = []
    for index in cache.managed:
        positions = cache.layers[index].positions[0]
        out.append([sorted(p for p in head.tolist() if 0 <= p < context_end) for head in positions])
    return out


@pytest.mark.parametrize("preset", ["snapkv", "tova", "h2o"])
def test_no_eviction_pass_sees_the_question(llama, preset) -> None:
    """What the context keeps does not depend on the question that follows it, every question
    token stays, and generation continues on that cache."""
    policy = kvpolicy.build(preset, budget=64)
    kept = []
    for question_seed in (1, 2):
        prompt = _prompt(question_seed=question_seed)
        with policy.attach(llama) as handle:
            out = llama.generate(prompt, context_end=CONTEXT, prefill_chunk_size=CHUNK, max_new_tokens=6)
            cache = handle.cache
        assert out.shape == (1, CONTEXT + QUESTION + 6) and torch.equal(out[:, : prompt.shape[1]], prompt)
        assert cache.sealed and cache.eviction_passes >= 1
        kept.append(_kept_context(cache, CONTEXT))
        for index in cache.managed:  # every question (and answer) token is still cached, in every head
            positions = cache.layers[index].positions[0]
            for head in positions:
                assert set(range(CONTEXT, CONTEXT + QUESTION + 5)) <= set(head.tolist())
            assert all(len(head) <= 64 + 8 for head in kept[-1][cache.managed.index(index)])  # evicted to budget
    assert kept[0] == kept[1]


def test_question_aware_passes_do_see_the_question(llama) -> None:
    """The control for the test above: with the question in the prompt, SnapKV's pass keeps other
    context tokens for other questions (so the protocol is what makes the difference)."""
    policy = kvpolicy.build("snapkv", budget=64)
    kept = []
    for question_seed in (1, 2):
        with policy.attach(llama) as handle:
            llama.generate(_prompt(question_seed=question_seed), max_new_tokens=2, do_sample=False)
            kept.append(_kept_context(handle.cache, CONTEXT))
    assert kept[0] != kept[1]


def test_an_after_prefill_pass_runs_once_at_the_contexts_end(llama) -> None:
    policy = kvpolicy.build("snapkv", budget=48)
    result = policy.generate(llama, _prompt(), context_end=CONTEXT, prefill_chunk_size=CHUNK, max_new_tokens=4)
    assert result.report.eviction_passes == 1
    assert result.report.seen == CONTEXT + QUESTION + 3  # the last new token is never fed, as in generate
    expected = (48 + QUESTION + 3) / (CONTEXT + QUESTION + 3)
    assert result.report.kept_fraction == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_keep_all_is_the_bare_model(family) -> None:
    from kvpolicy.integrations.hf.tiny import tiny_model

    model = tiny_model(family)
    prompt = _prompt()
    bare = model.generate(prompt, max_new_tokens=8, do_sample=False)
    out = kvpolicy.build("full").generate(model, prompt, context_end=CONTEXT, prefill_chunk_size=CHUNK,
                                          max_new_tokens=8)  # fmt: skip
    assert torch.equal(out.sequences, bare)


@pytest.mark.parametrize("preset", ["snapkv", "tova"])
def test_a_padded_batch_gives_each_row_what_it_gives_alone(llama, preset) -> None:
    """One context end per row, counted on the row's own tokens; contexts are whole chunks, so the
    padded batch (chunked from the end) and each row alone (from the start) meet the same passes."""
    policy = kvpolicy.build(preset, budget=48)
    rows = [torch.cat([random_ids(1, 256, seed=3), random_ids(1, 20, seed=4)], 1)[0],
            torch.cat([random_ids(1, 192, seed=5), random_ids(1, 31, seed=6)], 1)[0]]  # fmt: skip
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :], mask[r, width - len(row) :] = row, 1
    batch = policy.generate(llama, {"input_ids": ids, "attention_mask": mask}, context_end=[256, 192],
                            prefill_chunk_size=CHUNK, max_new_tokens=6)  # fmt: skip
    for r, (row, end) in enumerate(zip(rows, (256, 192), strict=True)):
        alone = policy.generate(llama, row[None], context_end=end, prefill_chunk_size=CHUNK, max_new_tokens=6)
        assert torch.equal(batch.new_tokens[r], alone.new_tokens[0])
    assert batch.report.kept_fraction < 0.5


def test_top_k_1_sampling_is_greedy(llama) -> None:
    policy = kvpolicy.build("tova", budget=64)
    run = {"context_end": CONTEXT, "prefill_chunk_size": CHUNK, "max_new_tokens": 6}
    greedy = policy.generate(llama, _prompt(), **run)
    sampled = policy.generate(llama, _prompt(), do_sample=True, top_k=1, temperature=0.7, **run)
    assert torch.equal(greedy.sequences, sampled.sequences)


def test_bad_requests_are_named(llama) -> None:
    policy = kvpolicy.build("snapkv", budget=64)
    prompt = _prompt()
    with pytest.raises(InvalidConfigError, match="leave at least one"):
        policy.generate(llama, prompt, context_end=prompt.shape[1], max_new_tokens=2)
    with pytest.raises(InvalidConfigError, match="at least one token"):
        policy.generate(llama, prompt, context_end=0, max_new_tokens=2)
    with pytest.raises(InvalidConfigError, match="one per batch row"):
        policy.generate(llama, prompt, context_end=[10, 20], max_new_tokens=2)
    with pytest.raises(InvalidConfigError, match="context_end"):
        policy.generate(llama, prompt, context_end=2.5, max_new_tokens=2)
    with pytest.raises(UnsupportedModelError, match="num_beams"):
        policy.generate(llama, prompt, context_end=CONTEXT, num_beams=2, max_new_tokens=2)
    with pytest.raises(InvalidConfigError, match="max_new_tokens"):
        policy.generate(llama, prompt, context_end=CONTEXT, max_new_tokens=0)
    with policy.attach(llama), pytest.raises(AttachError, match="use_cache=False"):
        llama.generate(prompt, context_end=CONTEXT, use_cache=False, max_new_tokens=2)


def test_only_a_sealed_cache_takes_a_gap_of_padding(llama) -> None:
    """Padding after a row began is refused while passes can still run, and accepted once sealed
    (the rest of a shorter question in a padded batch)."""
    policy = kvpolicy.build("snapkv", budget=64)
    ids = random_ids(2, 40, seed=9)
    gap = torch.ones(2, 8, dtype=torch.long)
    gap[1, :3] = 0
    with policy.attach(llama) as handle:
        handle.feed(ids, CHUNK)
        with pytest.raises(UnsupportedPaddingError):
            handle.feed(random_ids(2, 8, seed=10), attention_mask=gap)
        handle.reset()
        handle.feed(ids, CHUNK)
        handle.seal()
        logits = handle.feed(random_ids(2, 8, seed=10), attention_mask=gap)
        assert torch.isfinite(logits).all() and handle.cache.row_seen.tolist() == [48, 45]
