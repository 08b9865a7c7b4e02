"""A policy that keeps everything changes nothing: identical logits and tokens to plain transformers."""

from __future__ import annotations

import torch
from hf_helpers import streaming

import kvpolicy
from kvpolicy.integrations.hf.tiny import random_ids


def test_full_policy_gives_identical_logits_and_tokens(family_model):
    ids = random_ids(2, 37, seed=1)
    with torch.no_grad():
        plain_logits = family_model(ids).logits
        plain_tokens = family_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        plain_chunked = family_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=8)
    with kvpolicy.build("full").attach(family_model) as handle:
        logits = handle.feed(ids)
        tokens = family_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        chunked = family_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=8)
    assert torch.equal(logits, plain_logits)
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(chunked, plain_chunked)


def test_budget_larger_than_prompt_gives_identical_logits(family_model):
    ids = random_ids(1, 30, seed=2)
    with torch.no_grad():
        plain = family_model(ids).logits
        plain_tokens = family_model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    policy = streaming(budget=64)
    with policy.attach(family_model) as handle:
        logits = handle.feed(ids)
        assert handle.report().eviction_passes == 0
    result = policy.generate(family_model, {"input_ids": ids}, max_new_tokens=5, do_sample=False)
    assert torch.equal(logits, plain)
    assert torch.equal(result.sequences, plain_tokens)
    fractions = result.report.per_layer_fraction
    assert all(fractions[i] == 1.0 for i in result.report.evicting_layers)  # sliding layers trim themselves
