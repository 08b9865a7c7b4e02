"""The one evaluation driver: a policy over items on a model, measuring score, cache kept and time.

`evaluate` is the programmatic entry point (the CLI, the full-cache references, the evolution and
the many-policies comparison all call it). For every batch of rows a row plan prepares
(`kvpolicy.eval.rows`: items as a padded batch, a population, or forks of a shared prefill), it
prefills the rows, continues them (`kvpolicy.eval.decoding`: teacher forcing, greedy decoding),
scores each row with its item's metric and returns one `ItemResult` per row.

``metric``:
- ``"task"``: greedy decoding scored by the item's metric (likelihood items are teacher-forced);
- ``"loglik"``: teacher forcing only, ``score = exp(mean log p(gold answer))``: smooth and cheap;
- ``"both"``: the task score, with the answer log-likelihood measured too (on copies of the rows,
  so decoding starts from the same prefilled cache).

``protocol`` (`kvpolicy.eval.protocols`): ``question-aware`` prefills the whole prompt,
``context-first`` compresses the context before the question arrives; every result records it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from tqdm.auto import tqdm

from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.decoding import end_of_sequence_ids, greedy, teacher_force
from kvpolicy.eval.items import Item
from kvpolicy.eval.labels import label_for_policy
from kvpolicy.eval.metrics import likelihood_score, score_text
from kvpolicy.eval.prompting import encode
from kvpolicy.eval.protocols import DEFAULT_PROTOCOL, EvalProtocol, check_protocol
from kvpolicy.eval.results import ItemResult
from kvpolicy.eval.rows import ItemRows, Row, RowPlan
from kvpolicy.types import CacheReport

Metric = Literal["task", "loglik", "both"]
METRIC_MODES: tuple[str, ...] = ("task", "loglik", "both")
DEFAULT_CHUNK = 512


def check_run_arguments(metric: str, chunk_size: int) -> None:
    """The arguments every evaluation shares, checked before any model work."""
    if metric not in METRIC_MODES:
        raise InvalidConfigError(f"unknown metric mode {metric!r}; use one of {', '.join(METRIC_MODES)}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise InvalidConfigError(f"chunk_size must be a positive whole number of tokens, got {chunk_size!r}")


def by_likelihood(item: Item, metric: str) -> bool:
    """Whether ``item`` is scored by the likelihood of its gold answer under ``metric``."""
    return metric == "loglik" or item.metric == "likelihood"


def evaluate(
    policy: Any,
    items: Sequence[Item],
    model: Any,
    tokenizer: Any,
    *,
    metric: Metric = "task",
    chunk_size: int = DEFAULT_CHUNK,
    rows: RowPlan | None = None,
    done: Callable[[Item], ItemResult | None] | None = None,
    on_result: Callable[[ItemResult], None] | None = None,
    progress: bool | str = False,
    label: str | None = None,
    protocol: EvalProtocol = DEFAULT_PROTOCOL,
) -> list[ItemResult]:
    """Run ``policy`` over ``items``; one `ItemResult` per row, items in order (a population plan
    gives each item one row per member, labelled ``<label>[i]``).

    ``rows`` is the row plan (default `ItemRows()`: one item at a time, prompt chunked from its
    start). ``done(item)`` may return a stored result to skip the item (resuming); ``on_result``
    is called after each newly computed result (to store it at once); ``progress`` shows a tqdm
    bar (a string is its label); ``label`` names the policy in the results.
    """
    check_run_arguments(metric, chunk_size)
    check_protocol(protocol)
    plan = rows if rows is not None else ItemRows()
    name = label or label_for_policy(policy)
    policy.bind_tokenizer(tokenizer)
    eos = end_of_sequence_ids(model, tokenizer)
    found: dict[str, list[ItemResult]] = {}
    pending: list[Row] = []
    for item in items:
        stored = done(item) if done is not None else None
        if stored is not None:
            found[item.uid] = [stored]
        else:
            pending += plan.rows(item, encode(item, tokenizer), name)
    for batch in _progress(plan.batches(pending), progress):
        results = _run_batch(policy, model, tokenizer, plan, batch, metric, chunk_size, eos, protocol)
        for result in results:  # a plan keeps an item's rows in one batch, in order
            found.setdefault(result.uid, []).append(result)
            if on_result is not None:
                on_result(result)
    return [result for item in items for result in found[item.uid]]


def _run_batch(
    policy: Any,
    model: Any,
    tokenizer: Any,
    plan: RowPlan,
    batch: Sequence[Row],
    metric: str,
    chunk_size: int,
    eos: frozenset[int],
    protocol: EvalProtocol,
) -> list[ItemResult]:
    """Prefill ``batch`` as the plan says, continue every row, score it."""
    start = time.perf_counter()
    likely = [by_likelihood(row.item, metric) for row in batch]
    forced = {r: row.encoded.answer_ids for r, row in enumerate(batch) if likely[r] or metric == "both"}
    limits = {r: row.item.max_new_tokens for r, row in enumerate(batch) if not likely[r]}
    with plan.prefill(policy, model, batch, chunk_size, protocol) as prefilled:
        logprobs = teacher_force(prefilled.handle, prefilled.last, forced, keep_cache=bool(limits)) if forced else {}
        answers = greedy(prefilled.handle, prefilled.last, limits, eos)
    seconds = (time.perf_counter() - start) / len(batch) + prefilled.seconds  # the batch's time, shared evenly
    results = []
    for r, row in enumerate(batch):
        logprob, report = logprobs.get(r, (None, None))
        prediction = ""
        if r in answers:
            tokens, report = answers[r]
            prediction = tokenizer.decode(tokens, skip_special_tokens=True)
        score = likelihood_score(logprob) if likely[r] else score_text(row.item.metric, prediction, row.item.answers)
        results.append(
            item_result(row, report, plan.chunks, likely=likely[r], score=score, prediction=prediction,
                        logprob=logprob, seconds=seconds, protocol=protocol)
        )  # fmt: skip
    return results


def item_result(
    row: Row,
    report: CacheReport,
    chunks: str,
    *,
    likely: bool,
    score: float,
    prediction: str,
    logprob: float | None,
    seconds: float,
    protocol: EvalProtocol = DEFAULT_PROTOCOL,
) -> ItemResult:
    """One `ItemResult`: the item's identity, the score, and the cache figures of ``report``."""
    item = row.item
    return ItemResult(
        uid=item.uid,
        fingerprint=item.fingerprint,
        task=item.task,
        split=item.split,
        length=item.length,
        seed=item.seed,
        policy=row.label,
        metric="likelihood" if likely else item.metric,
        score=float(score),
        prediction=prediction,
        answer_logprob=logprob,
        prompt_tokens=row.encoded.prompt_tokens,
        tokens_seen=report.seen,
        kept_fraction=report.kept_fraction,
        per_layer_fraction=report.per_layer_fraction,
        kv_bytes=report.kv_bytes,
        full_kv_bytes=report.full_kv_bytes,
        policy_seconds=report.policy_seconds,
        seconds=seconds,
        chunks=chunks,
        protocol=protocol,
        context_id=item.context_id,
    )


def run_item(
    policy: Any,
    item: Item,
    model: Any,
    tokenizer: Any,
    *,
    metric: Metric = "task",
    chunk_size: int = DEFAULT_CHUNK,
    label: str | None = None,
    protocol: EvalProtocol = DEFAULT_PROTOCOL,
) -> ItemResult:
    """`evaluate` on one item, one row."""
    return evaluate(
        policy, [item], model, tokenizer, metric=metric, chunk_size=chunk_size, label=label, protocol=protocol
    )[0]


def _progress(batches: Sequence[Any], progress: bool | str) -> Iterable[Any]:
    if not progress:
        return batches
    return tqdm(batches, desc=progress if isinstance(progress, str) else "batches", unit="batch", dynamic_ncols=True)
