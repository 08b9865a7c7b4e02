"""Score every row of a population on one item from a prefill shared by all of them.

`kvpolicy.integrations.hf.shared_prefill` runs the prompt once and forks one batch row per member at the
policy's first eviction pass; here each row's continuation is scored with the harness's metrics:
``loglik`` teacher-forces the gold answer (``exp(mean log p)``), ``task`` decodes greedily in
every row and scores each row's text (items scored by likelihood are always teacher-forced).
A `PrefillStore` keeps prefills across calls (generations of an evolution see the same training
items again), bounded in bytes, least recently used out first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import attrs
import torch

from kvpolicy.eval.items import Item
from kvpolicy.eval.metrics import answer_logprobs, likelihood_score, score_text
from kvpolicy.eval.prompting import EncodedItem
from kvpolicy.integrations.hf.shared_prefill import Prefill, fork
from kvpolicy.types import CacheReport


class PrefillStore:
    """Prefills by key, at most ``max_bytes`` of them (the newest always stays)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, Prefill] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable, make: Callable[[], Prefill]) -> Prefill:
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        shared = make()
        self._items[key] = shared
        while len(self._items) > 1 and sum(p.nbytes for p in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)
        return shared

    def clear(self) -> None:
        self._items.clear()


@attrs.frozen(eq=False)
class ForkedScores:
    """Per row: ``scores [rows]`` (the metric), ``reports`` (each row's cache, measured when it
    finished), ``predictions`` (greedy text; empty when teacher-forced) and ``logprobs [rows]``
    (mean log-probability of the gold answer; None when decoded greedily)."""

    scores: torch.Tensor
    reports: list[CacheReport]
    predictions: list[str]
    logprobs: torch.Tensor | None

    @property
    def kept(self) -> torch.Tensor:
        return torch.tensor([r.kept_fraction for r in self.reports], dtype=torch.float64)


def forked_scores(
    policy: Any,
    rows: int,
    item: Item,
    encoded: EncodedItem,
    shared: Prefill,
    model: Any,
    tokenizer: Any,
    metric: str = "loglik",
    *,
    evict: bool = True,
) -> ForkedScores:
    """Scores of ``rows`` members forked from ``shared``; the policy must hold one parameter set
    or a population ``[rows, num_params]``. ``evict=False`` scores the full cache of the same
    prefill (the reference)."""
    by_likelihood = metric == "loglik" or item.metric == "likelihood"
    with fork(shared, policy, model, rows, evict=evict) as handle:
        first = shared.last_logits.unsqueeze(1).expand(rows, -1, -1)
        if by_likelihood:
            answer = encoded.answer_ids.expand(rows, -1)
            logits = first
            if answer.shape[1] > 1:
                logits = torch.cat([first, handle.feed(answer[:, :-1])], dim=1)
            reports = [handle.report(row=r) for r in range(rows)]
            logprobs = answer_logprobs(logits, answer).mean(dim=-1).double()
            scores = torch.tensor([likelihood_score(float(v)) for v in logprobs], dtype=torch.float64)
            return ForkedScores(scores, reports, [""] * rows, logprobs)
        tokens, reports = _greedy(handle, first[:, -1], item.max_new_tokens, tokenizer.eos_token_id, rows)
    predictions = [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]
    scores = torch.tensor([score_text(item.metric, p, item.answers) for p in predictions], dtype=torch.float64)
    return ForkedScores(scores, reports, predictions, None)


def _greedy(
    handle: Any, logits: torch.Tensor, max_new_tokens: int, eos: int | None, rows: int
) -> tuple[list[list[int]], list[CacheReport]]:
    """Greedy decoding in every row; a row that emits end-of-sequence stops (its report is taken then)."""
    out: list[list[int]] = [[] for _ in range(rows)]
    reports: list[CacheReport | None] = [None] * rows
    done = torch.zeros(rows, dtype=torch.bool)
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1)
        for r in range(rows):
            if done[r]:
                continue
            if eos is not None and int(token[r]) == eos:
                done[r] = True
                reports[r] = handle.report(row=r)
            else:
                out[r].append(int(token[r]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = handle.feed(token.unsqueeze(1))[:, -1]
    for r in range(rows):
        if reports[r] is None:
            reports[r] = handle.report(row=r)
    return out, reports  # type: ignore[return-value]
