"""Evaluation items as one left-padded batch: a batched prefill, then each item's continuation.

The prompts of ``batch`` items are left-padded to one batch and fed in chunks aligned to their
end (the first chunk takes the remainder), so every row meets the chunk boundaries and eviction
passes it would meet alone (`Handle.feed(..., align_end=True)`; each row keeps its own schedule
and budget in the padded cache). Then:

- greedy answers are decoded for all rows in lockstep, one token per call as a batch of one
  decodes; a row that is done (end-of-sequence or its ``max_new_tokens``) has its report taken at
  that point and leaves the batch;
- teacher-forced answers, whose lengths differ, continue row by row on a copy of the prefilled
  cache (`Handle.fork_row`).

A batch of one through this path is the reference a larger batch equals: same calls per row, so
the same scores up to the rounding of batched kernels (measured in `benchmarks/bench_batch.py`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from kvpolicy.eval.harness import Metric, item_result, policy_name
from kvpolicy.eval.items import Item
from kvpolicy.eval.metrics import answer_logprobs, likelihood_score, score_text
from kvpolicy.eval.prompting import EncodedItem
from kvpolicy.eval.results import ItemResult
from kvpolicy.integrations.hf.batching import left_pad


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def run_batch(
    policy: Any,
    batch: Sequence[tuple[Item, EncodedItem]],
    model: Any,
    tokenizer: Any,
    *,
    metric: Metric,
    chunk_size: int,
    label: str | None = None,
) -> list[ItemResult]:
    """Evaluate ``batch`` (items with their encoding) as one batch (see the module docstring);
    one `ItemResult` per item."""
    start = time.perf_counter()
    policy.bind_tokenizer(tokenizer)
    items = [item for item, _ in batch]
    encoded = [encoding for _, encoding in batch]
    by_likelihood = [metric == "loglik" or item.metric == "likelihood" for item in items]
    forced = [likely or metric == "both" for likely in by_likelihood]
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    ids, mask = left_pad([e.prompt_ids[0] for e in encoded], pad)
    ids, mask = ids.to(model.device), mask.to(model.device)
    logprobs: list[float | None] = [None] * len(items)
    reports: list[Any] = [None] * len(items)
    predictions = [""] * len(items)
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.reset()
        last = handle.feed(ids, chunk_size, attention_mask=mask, last_only=True, align_end=True)[:, -1]
        for row in (r for r, f in enumerate(forced) if f):
            answer = encoded[row].answer_ids.to(model.device)
            with handle.fork_row(row):
                logits = last[row : row + 1, None]
                if answer.shape[-1] > 1:
                    logits = torch.cat([logits, handle.feed(answer[:, :-1])], dim=1)
                logprobs[row] = answer_logprobs(logits, answer).mean().item()
                reports[row] = handle.report()
        limits = {r: items[r].max_new_tokens for r, likely in enumerate(by_likelihood) if not likely}
        for row, (tokens, report) in _greedy_lockstep(handle, last, limits, _eos_ids(model, tokenizer)).items():
            predictions[row] = tokenizer.decode(tokens, skip_special_tokens=True)
            reports[row] = report
    seconds = (time.perf_counter() - start) / len(items)  # the batch's time, shared evenly
    results = []
    for row, item in enumerate(items):
        if by_likelihood[row]:
            score = likelihood_score(logprobs[row])  # type: ignore[arg-type]
        else:
            score = score_text(item.metric, predictions[row], item.answers)
        results.append(
            item_result(
                item,
                encoded[row],
                reports[row],
                policy=label or policy_name(policy),
                by_likelihood=by_likelihood[row],
                score=score,
                prediction=predictions[row],
                answer_logprob=logprobs[row],
                seconds=seconds,
                chunks="end",
            )
        )
    return results


def _greedy_lockstep(
    handle: Any, last: torch.Tensor, limits: dict[int, int], eos: set[int]
) -> dict[int, tuple[list[int], Any]]:
    """Greedy tokens of the rows in ``limits`` (row → max new tokens) from the prompt's last
    logits ``[batch, vocab]``, all rows decoding together; each row's tokens and its report at
    the moment it stopped (its last token is never fed, as in ``generate``)."""
    out: dict[int, tuple[list[int], Any]] = {}
    if not limits:
        return out
    tokens: dict[int, list[int]] = {row: [] for row in limits}
    active = sorted(limits)  # batch rows still decoding, in cache order
    if len(active) < last.shape[0]:  # rows that only teacher-force leave the batch
        handle.cache.batch_select_indices(torch.tensor(active, device=last.device))
        last = last[active]
    while True:
        chosen = last.argmax(-1)
        for place, row in enumerate(active):
            token = int(chosen[place])
            tokens[row].append(token)
            if token in eos or len(tokens[row]) >= limits[row]:
                out[row] = (tokens[row], handle.report(row=place))
        if len(out) == len(tokens):
            return out
        keep = [place for place, row in enumerate(active) if row not in out]
        if len(keep) < len(active):  # finished rows leave the batch: later steps cost only the others
            handle.cache.batch_select_indices(torch.tensor(keep, device=last.device))
            active, chosen = [active[place] for place in keep], chosen[keep]
        last = handle.feed(chosen[:, None])[:, -1]
