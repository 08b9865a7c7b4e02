"""``model.generate`` inside ``attach`` == ``policy.generate`` == a hand-written loop, token for token;
``after_prefill`` fires once the whole prompt is in, with or without chunked prefill."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import RecordingExtractor, greedy_loop, streaming

import kvpolicy
from kvpolicy.integrations.hf.tiny import random_ids
from kvpolicy.types import Schedule


@pytest.mark.parametrize("chunk", [None, 7])
def test_three_ways_of_generating_agree(family_model, chunk):
    prompt = random_ids(2, 41, seed=7)
    policy = streaming(budget=10, slack=2)
    kwargs = {"max_new_tokens": 9, "do_sample": False}
    if chunk:
        kwargs["prefill_chunk_size"] = chunk
    with policy.attach(family_model) as handle:
        inside = family_model.generate(input_ids=prompt, **kwargs)
        inside_report = handle.report()
        loop = greedy_loop(handle, prompt, 9, chunk_size=chunk)
    result = policy.generate(family_model, {"input_ids": prompt}, **kwargs)
    assert inside_report.eviction_passes > 0
    assert torch.equal(inside, loop)
    assert torch.equal(result.sequences, inside)
    assert torch.equal(result.new_tokens, inside[:, prompt.shape[1] :])
    assert result.report.seen == inside_report.seen


@pytest.mark.parametrize("chunk", [None, 5])
def test_after_prefill_fires_once_when_the_prompt_is_in(llama, chunk):
    extractor = RecordingExtractor()
    policy = kvpolicy.Policy(extractor, "feature", "top_k", schedule=Schedule("after_prefill"), budget=8)
    prompt = random_ids(1, 23, seed=8)
    kwargs = {"prefill_chunk_size": chunk} if chunk else {}
    result = policy.generate(llama, {"input_ids": prompt}, max_new_tokens=4, do_sample=False, **kwargs)
    seen_at_update = sorted({view.seen for view in extractor.views})
    assert seen_at_update == [23]  # after the last prompt chunk, not after the first, never again
    assert result.report.kept[1][0] == 8 + 3  # 8 kept after the prompt, then 3 decoded tokens added


def test_feed_chunks_continue_one_sequence(llama):
    prompt = random_ids(1, 20, seed=9)
    with kvpolicy.build("full").attach(llama) as handle:
        whole = handle.feed(prompt)
        handle.reset()
        handle.feed(prompt[:, :13], chunk_size=4)
        tail = handle.feed(prompt[:, 13:])
        assert handle.cache.seen == 20
    assert torch.allclose(tail, whole[:, 13:], atol=1e-5)
