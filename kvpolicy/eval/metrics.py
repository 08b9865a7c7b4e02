"""Scoring functions: exact / contains match, token F1, Rouge-L, string-match-all, edit
similarity, likelihood.

Text metrics take the generated text and the gold answers and return a score in [0, 1] (best
over the gold answers). Normalisation follows SQuAD (Rajpurkar et al. 2016) as LongBench does:
lower case, no punctuation, no articles, single spaces. Rouge-L (Lin 2004) comes from the
``rouge-score`` package. The teacher-forced log-likelihood of the gold answer is a smooth,
generation-free signal used next to every task metric and alone for perplexity.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import string
from collections.abc import Callable, Sequence

import torch

from kvpolicy.errors import InvalidConfigError, ShapeError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0]


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the first line of the prediction equals a gold answer after normalisation."""
    pred = normalize(first_line(prediction))
    return float(any(pred == normalize(a) for a in answers))


def contains_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if a normalised gold answer appears in the normalised first line of the prediction."""
    pred = normalize(first_line(prediction))
    return float(any(normalize(a) and normalize(a) in pred for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best bag-of-tokens F1 between the prediction and a gold answer (SQuAD / LongBench QA)."""
    pred = normalize(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize(answer).split()
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@functools.cache
def _rouge_scorer():  # noqa: ANN202 - third-party type
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    """Best Rouge-L F-measure of the prediction's first line against a gold answer."""
    line = first_line(prediction)
    if not line:
        return 0.0
    return max(_rouge_scorer().score(a, line)["rougeL"].fmeasure for a in answers)


def recall_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of the whitespace-separated words of ``answers[0]`` found in the prediction
    (RULER's string-match-all, for answers that are lists of names)."""
    pred = prediction.upper()
    words = answers[0].split()
    return sum(w.upper() in pred for w in words) / len(words) if words else 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), one row of the table at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _first_code_line(text: str) -> str:
    """The first non-blank line that is not a Markdown code fence, stripped."""
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("```"):
            return line.strip()
    return ""


def edit_similarity(prediction: str, answers: Sequence[str]) -> float:
    """Best ``1 − Levenshtein / longer length`` between the prediction's first code line and a
    gold line, both stripped (the line-completion score of RepoBench / CodeXGLUE)."""
    line = _first_code_line(prediction)
    best = 0.0
    for answer in answers:
        gold = answer.strip()
        longest = max(len(line), len(gold))
        best = max(best, 1.0 - levenshtein(line, gold) / longest if longest else 1.0)
    return best


TextMetric = Callable[[str, Sequence[str]], float]

#: metric name → function of (prediction, answers); ``likelihood`` is scored from log-probs.
METRICS: dict[str, TextMetric | None] = {
    "exact": exact_match,
    "contains": contains_match,
    "f1": token_f1,
    "rouge_l": rouge_l,
    "recall_all": recall_all,
    "edit_sim": edit_similarity,
    "likelihood": None,
}


def score_text(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """Score generated text with the named metric."""
    if metric not in METRICS:
        raise InvalidConfigError(f"unknown metric {metric!r}; metrics are {', '.join(METRICS)}")
    function = METRICS[metric]
    if function is None:
        raise InvalidConfigError(f"metric {metric!r} scores log-likelihoods, not generated text")
    return function(prediction, answers)


def answer_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token: ``logits [batch, tokens, vocab]`` predicting
    ``targets [batch, tokens]`` (logit ``t`` predicts target ``t``) → ``[batch, tokens]``."""
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ShapeError(
            f"answer_logprobs needs logits [batch, tokens, vocab] and targets [batch, tokens] with the same "
            f"batch and tokens; got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def likelihood_score(mean_logprob: float) -> float:
    """Geometric-mean token probability ``exp(mean log p)`` = 1 / perplexity, in (0, 1]."""
    return math.exp(mean_logprob)
