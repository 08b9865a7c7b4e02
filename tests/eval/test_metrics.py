"""Metrics: known values on hand-made predictions, and the log-likelihood against torch."""

from __future__ import annotations

import math

import pytest
import torch

from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.eval.metrics import (
    answer_logprobs,
    contains_match,
    exact_match,
    likelihood_score,
    normalize,
    recall_all,
    rouge_l,
    score_text,
    token_f1,
)


def test_normalize_follows_squad() -> None:
    assert normalize("  The Answer, is: A 42!  ") == "answer is 42"


@pytest.mark.parametrize(
    ("function", "prediction", "answers", "expected"),
    [
        (exact_match, " 3.", ["3"], 1.0),
        (exact_match, " 13.", ["3"], 0.0),
        (exact_match, " 3.\nand more", ["3"], 1.0),
        (contains_match, " 8894339. It was", ["8894339"], 1.0),
        (contains_match, " 889433", ["8894339"], 0.0),
        (contains_match, "first line\n8894339", ["8894339"], 0.0),  # only the answer line counts
        (token_f1, "dr marco russi", ["Dr. Marco Russi, Dr. Diego Castro"], 2 * 1.0 * 0.5 / 1.5),
        (token_f1, "nothing shared", ["alpha beta"], 0.0),
        (recall_all, "ABCDE and FGHIJ", ["ABCDE FGHIJ KLMNO"], 2 / 3),
    ],
)
def test_text_metrics(function, prediction: str, answers: list[str], expected: float) -> None:
    assert function(prediction, answers) == pytest.approx(expected)


def test_rouge_l_uses_longest_common_subsequence() -> None:
    gold = "the quick brown fox jumps over the lazy dog"
    assert rouge_l(gold, [gold]) == pytest.approx(1.0)
    partial = rouge_l("the quick fox", [gold])  # LCS 3 of 3 predicted and of 9 gold words
    assert partial == pytest.approx(2 * 1.0 * (3 / 9) / (1.0 + 3 / 9))
    assert rouge_l("   ", [gold]) == 0.0


def test_best_over_several_gold_answers() -> None:
    assert exact_match("Paris", ["London", "paris"]) == 1.0


def test_unknown_metric_names_the_known_ones() -> None:
    with pytest.raises(InvalidConfigError, match="metrics are exact, contains"):
        score_text("bleu", "a", ["a"])
    with pytest.raises(InvalidConfigError, match="log-likelihoods"):
        score_text("likelihood", "a", ["a"])


def test_answer_logprobs_matches_log_softmax() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator)
    targets = torch.randint(0, 11, (2, 5), generator=generator)
    got = answer_logprobs(logits, targets)
    expected = torch.stack(
        [torch.stack([logits[b, t].log_softmax(-1)[targets[b, t]] for t in range(5)]) for b in range(2)]
    )
    torch.testing.assert_close(got, expected)
    assert likelihood_score(got.mean().item()) == pytest.approx(math.exp(expected.mean().item()))


def test_answer_logprobs_rejects_mismatched_shapes() -> None:
    with pytest.raises(ShapeError, match=r"logits \[batch, tokens, vocab\]"):
        answer_logprobs(torch.zeros(1, 4, 10), torch.zeros(1, 3, dtype=torch.long))
