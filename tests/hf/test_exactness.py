"""Decoding over an evicted cache equals a full recompute in which every query sees exactly the
tokens its layer and head still held (`kvpolicy.testing.reference`), to float tolerance."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import RandomScorer, streaming

import kvpolicy
from kvpolicy.integrations.hf.tiny import random_ids
from kvpolicy.testing.reference import feed_recorded, masked_recompute
from kvpolicy.types import Schedule

TOLERANCE = 1e-4


def _run(model, policy, prompt, chunk_size, decode_steps):
    with policy.attach(model) as handle:
        logits, records = feed_recorded(handle, prompt, chunk_size=chunk_size)
        tokens = [prompt]
        for _ in range(decode_steps):
            nxt = logits[:, -1:].argmax(-1)
            tokens.append(nxt)
            step_logits, step_records = feed_recorded(handle, nxt)
            logits = torch.cat([logits, step_logits], dim=1)
            records += step_records
        report = handle.report()
    return torch.cat(tokens, dim=1), logits, records, report


def test_evicted_decoding_matches_masked_recompute(family_model):
    prompt = random_ids(2, 50, seed=3)
    sequence, logits, records, report = _run(family_model, streaming(budget=12), prompt, 9, 6)
    assert report.eviction_passes > 0 and min(min(h) for h in (report.kept[i] for i in report.evicting_layers)) == 12
    reference = masked_recompute(family_model, sequence, records)
    assert (reference - logits).abs().max() < TOLERANCE
    with torch.no_grad():  # eviction really changed the outcome: the check is not vacuous
        assert (family_model(sequence).logits - logits).abs().max() > 1e-2


@pytest.mark.parametrize("shared", [False, True])
def test_heads_keeping_different_tokens_and_counts(llama, shared):
    """Random per-head choices; with ``shared_across_heads`` heads keep different counts (padded slots)."""
    policy = kvpolicy.Policy(
        "position",
        RandomScorer(seed=4),
        ("top_k", {"shared_across_heads": shared, "min_per_head": 2}),
        schedule=Schedule("every_step", slack=3),
        budget=10,
        sinks=2,
    )
    prompt = random_ids(2, 40, seed=5)
    sequence, logits, records, _ = _run(llama, policy, prompt, 6, 8)
    if shared:
        assert any(r.kept[1] is not None and r.kept[1][1] is not None for r in records), "no padded slots arose"
    assert (masked_recompute(llama, sequence, records) - logits).abs().max() < TOLERANCE


def test_self_sized_heads_keep_their_own_counts(llama):
    """``threshold`` with ``per_head``: each head keeps what it wants; decoding stays exact."""
    policy = kvpolicy.Policy(
        "position",
        RandomScorer(seed=7),
        ("threshold", {"threshold": 0.5, "per_head": True}),
        schedule=Schedule("every_n", every=8),
        sinks=2,
    )
    prompt = random_ids(2, 40, seed=8)
    sequence, logits, records, report = _run(llama, policy, prompt, 8, 8)
    assert any(r.kept[1] is not None and r.kept[1][1] is not None for r in records), "no padded slots arose"
    assert len(set(report.kept[1])) > 1, "every head kept the same count"
    assert (masked_recompute(llama, sequence, records) - logits).abs().max() < TOLERANCE


def test_layers_with_different_lengths(llama):
    """A skipped layer keeps everything while the other evicts: masks are built per layer."""
    policy = kvpolicy.build("streaming_llm", budget=8, schedule=Schedule("every_step"), skip_layers=(0,))
    prompt = random_ids(1, 30, seed=6)
    sequence, logits, records, report = _run(llama, policy, prompt, 7, 4)
    assert report.evicting_layers == (1,)
    assert report.kept[0][0] == report.seen and report.kept[1][0] == 8
    assert (masked_recompute(llama, sequence, records) - logits).abs().max() < TOLERANCE
