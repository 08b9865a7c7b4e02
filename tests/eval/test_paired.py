"""Chance-corrected skill and paired bootstrap intervals between two runs on the same items."""

from __future__ import annotations

import pytest

from kvpolicy.eval.paired import paired_difference
from kvpolicy.eval.results import ItemResult


def result(task: str, seed: int, score: float, policy: str) -> ItemResult:
    return ItemResult(
        uid=f"{task}/test/2048/{seed}", fingerprint="f", task=task, split="test", length=2048, seed=seed,
        policy=policy, metric="contains", score=score, prediction="", answer_logprob=None, prompt_tokens=2000,
        tokens_seen=2010, kept_fraction=0.25, per_layer_fraction=(0.25,), kv_bytes=1, full_kv_bytes=4,
        policy_seconds=0.0, seconds=1.0,
    )  # fmt: skip


def test_chance_is_subtracted_before_dividing_by_the_full_cache():
    # multikey: chance 0.25; full cache 1.0 everywhere; a guesser at 0.25 keeps no skill
    full = {f"multikey/test/2048/{i}": result("multikey", i, 1.0, "full") for i in range(8)}
    guess = [result("multikey", i, 0.25, "guess") for i in range(8)]
    perfect = [result("multikey", i, 1.0, "perfect") for i in range(8)]
    diff = paired_difference(perfect, guess, full)
    assert diff.a == pytest.approx(1.0) and diff.b == pytest.approx(0.0)
    assert diff.delta == pytest.approx(1.0) and diff.low == pytest.approx(1.0) and diff.high == pytest.approx(1.0)
    assert diff.items == {"multikey": 8}


def test_interval_covers_a_noisy_difference_and_is_paired():
    refs = {f"needle/test/2048/{i}": result("needle", i, 1.0, "full") for i in range(40)}
    a = [result("needle", i, float(i % 2), "a") for i in range(40)]  # 50%
    b = [result("needle", i, float(i % 4 == 1), "b") for i in range(40)]  # 25%, only where a succeeds
    diff = paired_difference(a, b, refs, resamples=500, seed=1)
    assert diff.delta == pytest.approx(0.25)
    assert 0.0 < diff.low < 0.25 < diff.high < 0.5
    same = paired_difference(a, a, refs, resamples=200)
    assert same.low == same.high == 0.0  # paired: identical runs differ by exactly nothing


def test_runs_without_common_items_are_an_error():
    with pytest.raises(ValueError, match="share no item"):
        paired_difference([result("needle", 0, 1.0, "a")], [result("needle", 1, 1.0, "b")], {})


def test_items_of_one_context_are_resampled_together():
    """Four questions per context, each context all right or all wrong: counted as 40 independent
    items the interval is about half as wide as the 10 contexts it really has allow."""
    import attrs

    refs = {f"needle/test/2048/{i}": result("needle", i, 1.0, "full") for i in range(40)}
    a = [result("needle", i, float((i // 4) % 2), "a") for i in range(40)]
    b = [result("needle", i, 0.0, "b") for i in range(40)]
    alone = paired_difference(a, b, refs, resamples=2000, seed=3)
    grouped = paired_difference([attrs.evolve(r, context_id=f"c{r.seed // 4}") for r in a], b, refs,
                                resamples=2000, seed=3)  # fmt: skip
    assert alone.delta == grouped.delta == pytest.approx(0.5)
    assert (grouped.high - grouped.low) > 1.6 * (alone.high - alone.low)
