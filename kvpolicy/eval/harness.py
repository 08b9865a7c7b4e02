"""Run a policy over evaluation items on a model and measure score, cache kept and time.

`evaluate` is the programmatic entry point (the evolution runner calls it): it takes a built
`kvpolicy.Policy`, items, a model and its tokenizer, and returns one `ItemResult` per item.

The prompt is fed in chunks of ``chunk_size`` tokens with the policy evicting between chunks,
as NAMM does during prefill (Cetin et al. 2024, every 512 tokens); otherwise the first answer
token would be computed while the whole, un-evicted prompt is still in the cache.

``metric``:
- ``"task"``: greedy generation scored by the item's metric (likelihood items are teacher-forced);
- ``"loglik"``: teacher forcing only, ``score = exp(mean log p(gold answer))``: smooth and cheap;
- ``"both"``: the task score, with the answer log-likelihood measured too (two passes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch

from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.items import Item
from kvpolicy.eval.metrics import answer_logprobs, likelihood_score, score_text
from kvpolicy.eval.prompting import EncodedItem, encode
from kvpolicy.eval.results import ItemResult
from kvpolicy.types import CacheReport

Metric = Literal["task", "loglik", "both"]
ChunkAlign = Literal["start", "end"]
#: ``start``: prefill chunks from the prompt's first token (the last takes the remainder);
#: ``end``: from its last (the first takes the remainder), what left-padded batches need
CHUNK_ALIGNMENTS: tuple[str, ...] = ("start", "end")
METRIC_MODES: tuple[str, ...] = ("task", "loglik", "both")
DEFAULT_CHUNK = 512


def policy_name(policy: Any) -> str:
    """``extractor/scorer/selector@budget``: a default label when the caller gives none."""
    budget = policy.budget.tokens or policy.budget.ratio
    parts = f"{policy.extractor.name}/{policy.scorer.name}/{policy.selector.name}"
    return parts + (f"@{budget}" if budget is not None else "")


def check_run_arguments(metric: str, chunk_size: int) -> None:
    """The arguments every evaluation entry point shares, checked before any model work."""
    if metric not in METRIC_MODES:
        raise InvalidConfigError(f"unknown metric mode {metric!r}; use one of {', '.join(METRIC_MODES)}")
    if chunk_size <= 0:
        raise InvalidConfigError(f"chunk_size must be a positive number of tokens, got {chunk_size}")


def item_result(
    item: Item,
    encoded: EncodedItem,
    report: CacheReport,
    *,
    policy: str,
    by_likelihood: bool,
    score: float,
    prediction: str,
    answer_logprob: float | None,
    seconds: float,
    chunks: ChunkAlign = "start",
) -> ItemResult:
    """One `ItemResult`: the item's identity, the score, and the cache figures of ``report``."""
    return ItemResult(
        uid=item.uid,
        fingerprint=item.fingerprint,
        task=item.task,
        split=item.split,
        length=item.length,
        seed=item.seed,
        policy=policy,
        metric="likelihood" if by_likelihood else item.metric,
        score=float(score),
        prediction=prediction,
        answer_logprob=answer_logprob,
        prompt_tokens=encoded.prompt_tokens,
        tokens_seen=report.seen,
        kept_fraction=report.kept_fraction,
        per_layer_fraction=report.per_layer_fraction,
        kv_bytes=report.kv_bytes,
        full_kv_bytes=report.full_kv_bytes,
        policy_seconds=report.policy_seconds,
        seconds=seconds,
        chunks=chunks,
    )


def teacher_forced_logprob(policy: Any, model: Any, encoded: EncodedItem, chunk_size: int) -> tuple[float, CacheReport]:
    """Mean log-probability per token of the gold answer given the prompt, through the policy.

    The prompt goes in chunks (eviction between them); the last prompt logit predicts the first
    answer token and the answer tokens but the last are fed as one more chunk.
    """
    answer = encoded.answer_ids
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.reset()
        logits = handle.feed(encoded.prompt_ids, chunk_size=chunk_size, last_only=True)
        if answer.shape[-1] > 1:
            logits = torch.cat([logits, handle.feed(answer[:, :-1])], dim=1)
        report = handle.report()
    return answer_logprobs(logits, answer).mean().item(), report


def generate_answer(
    policy: Any, model: Any, tokenizer: Any, encoded: EncodedItem, max_new_tokens: int, chunk_size: int
) -> tuple[str, CacheReport]:
    """Greedy answer through the policy, prompt prefilled in chunks with eviction between them."""
    inputs = {"input_ids": encoded.prompt_ids, "attention_mask": torch.ones_like(encoded.prompt_ids)}
    with torch.inference_mode():
        out = policy.generate(
            model, inputs, max_new_tokens=max_new_tokens, do_sample=False, prefill_chunk_size=chunk_size
        )
    new_tokens = out.sequences[0, encoded.prompt_tokens :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True), out.report


def run_item(
    policy: Any,
    item: Item,
    model: Any,
    tokenizer: Any,
    *,
    metric: Metric = "task",
    chunk_size: int = DEFAULT_CHUNK,
    label: str | None = None,
) -> ItemResult:
    """Evaluate one item (see the module docstring for ``metric``)."""
    start = time.perf_counter()
    policy.bind_tokenizer(tokenizer)
    encoded = encode(item, tokenizer)
    logprob: float | None = None
    prediction = ""
    by_likelihood = metric == "loglik" or item.metric == "likelihood"
    report: CacheReport
    if by_likelihood or metric == "both":
        logprob, report = teacher_forced_logprob(policy, model, encoded, chunk_size)
    if by_likelihood:
        score = likelihood_score(logprob)  # type: ignore[arg-type]
    else:
        prediction, report = generate_answer(policy, model, tokenizer, encoded, item.max_new_tokens, chunk_size)
        score = score_text(item.metric, prediction, item.answers)
    return item_result(
        item,
        encoded,
        report,
        policy=label or policy_name(policy),
        by_likelihood=by_likelihood,
        score=score,
        prediction=prediction,
        answer_logprob=logprob,
        seconds=time.perf_counter() - start,
    )


def evaluate(
    policy: Any,
    items: Sequence[Item],
    model: Any,
    tokenizer: Any,
    *,
    metric: Metric = "task",
    chunk_size: int = DEFAULT_CHUNK,
    done: Callable[[Item], ItemResult | None] | None = None,
    on_result: Callable[[ItemResult], None] | None = None,
    progress: bool | str = False,
    label: str | None = None,
    batch_size: int = 1,
    chunk_align: ChunkAlign = "start",
) -> list[ItemResult]:
    """Run ``policy`` over ``items``; one `ItemResult` per item, in order.

    ``done(item)`` may return a stored result to skip the item (resuming); ``on_result`` is
    called after each newly computed item (to store it at once); ``progress`` shows a tqdm bar
    (a string is used as its label); ``label`` names the policy in the results.

    ``batch_size > 1`` evaluates that many items as one left-padded batch
    (`kvpolicy.eval.batched`), with prefill chunks aligned to each prompt's end; so does
    ``chunk_align="end"`` at any batch size, which is what a batch equals item by item.
    """
    check_run_arguments(metric, chunk_size)
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be >= 1, got {batch_size}")
    if chunk_align not in CHUNK_ALIGNMENTS:
        raise InvalidConfigError(f"chunk_align must be one of {', '.join(CHUNK_ALIGNMENTS)}, got {chunk_align!r}")
    if batch_size > 1 or chunk_align == "end":
        from kvpolicy.eval.batched import run_batch

        found = {item.uid: done(item) if done is not None else None for item in items}
        # prompts of similar length batch together, so little of a batch is padding
        pending = sorted(
            ((item, encode(item, tokenizer)) for item in items if found[item.uid] is None),
            key=lambda pair: pair[1].prompt_tokens,
        )
        batches = [pending[i : i + batch_size] for i in range(0, len(pending), batch_size)]
        for batch in _progress(batches, progress):
            for result in run_batch(policy, batch, model, tokenizer, metric=metric, chunk_size=chunk_size, label=label):
                found[result.uid] = result
                if on_result is not None:
                    on_result(result)
        return [found[item.uid] for item in items]  # type: ignore[misc]
    results: list[ItemResult] = []
    for item in _progress(items, progress):
        stored = done(item) if done is not None else None
        if stored is not None:
            results.append(stored)
            continue
        result = run_item(policy, item, model, tokenizer, metric=metric, chunk_size=chunk_size, label=label)
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results


def _progress(items: Sequence[Any], progress: bool | str) -> Iterable[Any]:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=progress if isinstance(progress, str) else "items", unit="item", dynamic_ncols=True)
