"""`handle.report()` measures the stored tensors: bytes, tokens per layer and head, notes."""

from __future__ import annotations

from hf_helpers import streaming

import kvpolicy
from kvpolicy.integrations.hf.tiny import random_ids


def test_report_counts_bytes_and_tokens(llama):
    with streaming(budget=10).attach(llama) as handle:
        handle.feed(random_ids(2, 40, seed=18), chunk_size=8)
        report = handle.report()
        stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in handle.cache.layers)
    per_token = 2 * 2 * 16 * 4 * 2  # batch × kv_heads × head_dim × fp32 bytes × (keys + values)
    assert report.seen == 40
    assert report.kept == ((10.0, 10.0), (10.0, 10.0))
    assert report.kv_bytes == stored == 2 * 10 * per_token
    assert report.full_kv_bytes == 2 * 40 * per_token
    assert report.kept_fraction == 0.25 and report.eviction_passes == 4 and report.policy_seconds > 0
    assert report.evicting_layers == (0, 1) and report.notes == ()
    assert "; 4 eviction passes, " in report.summary()


def test_sliding_layers_are_left_alone_and_said_so(gemma3):
    with streaming(budget=10).attach(gemma3) as handle:
        handle.feed(random_ids(1, 30, seed=19))
        report = handle.report()
    assert report.evicting_layers == (1,)
    assert report.kept == ((7.0, 7.0), (10.0, 10.0))  # the sliding layer (window 8) keeps its 7 newest itself
    assert any("sliding-window" in note for note in report.notes)


def test_full_policy_report(llama):
    with kvpolicy.build("full").attach(llama) as handle:
        handle.feed(random_ids(1, 12))
        report = handle.report()
    assert report.kv_bytes == report.full_kv_bytes and report.eviction_passes == 0
    assert "; 0 eviction passes, " in report.summary()


def test_summary_says_one_eviction_pass(llama):
    with kvpolicy.build("snapkv", budget=8).attach(llama) as handle:
        handle.feed(random_ids(1, 20))
        report = handle.report()
    assert report.eviction_passes == 1 and "; 1 eviction pass, " in report.summary()
