"""Score one item for every member of a population in one batched run (population as the batch).

CMA-ES evaluates many parameter vectors of the same scorer on the same items (common random
numbers). Instead of one run per member, the encoded item is repeated once per member — the
same prompt in every row, so no padding — and the population ``[members, num_params]`` is set
on the policy, so batch row *i* is scored with parameter row *i* and evicts on its own
(`Policy.set_flat`); the reference NAMM code batches its population the same way (Cetin et al.
2024, arXiv 2410.13166). Each member's kept fraction is measured from its own row of the cache
(``handle.report(row=i)``), not averaged over the batch.

The metric modes are the harness's (`kvpolicy.eval.harness`): ``loglik`` teacher-forces the
gold answer in every row; ``task`` decodes greedily in every row and scores each row's text;
``both`` does the two. A row that stops early (end of sequence) has its cache report taken at
the step it stopped, exactly when a run of that member alone would have ended; the other rows
go on. Results equal member-by-member runs up to floating-point rounding of batched kernels.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.eval.harness import DEFAULT_CHUNK, Metric, check_run_arguments, item_result, policy_name
from kvpolicy.eval.items import Item
from kvpolicy.eval.metrics import answer_logprobs, likelihood_score, score_text
from kvpolicy.eval.prompting import EncodedItem, encode
from kvpolicy.eval.results import ItemResult
from kvpolicy.types import CacheReport


def check_population(policy: Any, population: torch.Tensor) -> torch.Tensor:
    """``population`` as float32 ``[members, num_params]``, or a `ShapeError` saying what fits."""
    if policy.num_params == 0:
        raise InvalidConfigError(f"policy {policy!r} has no learnable parameters, so it has no population to evaluate")
    population = torch.as_tensor(population)
    if (
        population.dim() != 2
        or population.shape[0] < 1
        or population.shape[1] != policy.num_params
        or not population.is_floating_point()
    ):
        raise ShapeError(
            f"a population is a float tensor [members >= 1, {policy.num_params}] (one parameter row per member); "
            f"got {tuple(population.shape)} ({population.dtype})"
        )
    return population.float()


def population_logprobs(
    policy: Any, model: Any, encoded: EncodedItem, members: int, chunk_size: int
) -> tuple[torch.Tensor, list[CacheReport]]:
    """Mean log-probability per gold-answer token for each row ``[members]`` and each row's report.

    The harness's teacher forcing (`kvpolicy.eval.harness.teacher_forced_logprob`) with the item
    repeated ``members`` times; the policy must already hold the population.
    """
    prompt = encoded.prompt_ids.expand(members, -1)
    answer = encoded.answer_ids.expand(members, -1)
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.reset()
        logits = handle.feed(prompt, chunk_size=chunk_size, last_only=True)
        if answer.shape[-1] > 1:
            logits = torch.cat([logits, handle.feed(answer[:, :-1])], dim=1)
        reports = [handle.report(row=i) for i in range(members)]
    return answer_logprobs(logits, answer).mean(-1), reports


class _ReportWhenRowStops:
    """Takes a row's cache report at the step its newest token is an end-of-sequence token (when
    a run of that row alone would stop); never stops generation itself. ``generate`` calls every
    entry of ``stopping_criteria`` with ``(input_ids, scores)``, so no transformers base class is needed."""

    def __init__(self, handle: Any, eos: set[int], members: int) -> None:
        self.handle = handle
        self.eos = eos
        self.reports: list[CacheReport | None] = [None] * members

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.reports[row] is None and token in self.eos:
                self.reports[row] = self.handle.report(row=row)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _eos_ids(model: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def population_answers(
    policy: Any, model: Any, tokenizer: Any, encoded: EncodedItem, members: int, max_new_tokens: int, chunk_size: int
) -> tuple[list[str], list[CacheReport]]:
    """Greedy answer of each row (cut at its first end-of-sequence token) and each row's report."""
    prompt = encoded.prompt_ids.expand(members, -1).contiguous()
    eos = _eos_ids(model)
    with torch.inference_mode(), policy.attach(model) as handle:
        watcher = _ReportWhenRowStops(handle, eos, members)
        sequences = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            prefill_chunk_size=chunk_size,
            stopping_criteria=[watcher],
        )
        sequences = sequences if isinstance(sequences, torch.Tensor) else sequences.sequences
        reports = [r if r is not None else handle.report(row=i) for i, r in enumerate(watcher.reports)]
    answers = []
    for row in sequences[:, encoded.prompt_tokens :].tolist():
        stop = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        answers.append(tokenizer.decode(row[:stop], skip_special_tokens=True))
    return answers, reports


def run_population(
    policy: Any,
    population: torch.Tensor,
    item: Item,
    model: Any,
    tokenizer: Any,
    *,
    metric: Metric = "task",
    chunk_size: int = DEFAULT_CHUNK,
    label: str | None = None,
) -> list[ItemResult]:
    """Evaluate ``item`` for every member of ``population [members, num_params]`` in one batch.

    Returns one `ItemResult` per member, in order, each with that member's own measured cache
    figures; ``policy`` is labelled ``<label>[i]`` and ``seconds`` is the batch's wall time
    divided by the members (the cost of one evaluation). The policy's parameters are restored
    afterwards.
    """
    check_run_arguments(metric, chunk_size)
    population = check_population(policy, population)
    members = population.shape[0]
    start = time.perf_counter()
    encoded = encode(item, tokenizer)
    by_likelihood = metric == "loglik" or item.metric == "likelihood"
    logprobs: list[float | None] = [None] * members
    predictions = [""] * members
    previous = policy.get_flat()
    policy.set_flat(population)
    try:
        if by_likelihood or metric == "both":
            mean_logprobs, reports = population_logprobs(policy, model, encoded, members, chunk_size)
            logprobs = [float(x) for x in mean_logprobs.tolist()]
        if by_likelihood:
            scores = [likelihood_score(x) for x in logprobs]  # type: ignore[arg-type]
        else:
            predictions, reports = population_answers(
                policy, model, tokenizer, encoded, members, item.max_new_tokens, chunk_size
            )
            scores = [score_text(item.metric, p, item.answers) for p in predictions]
    finally:
        policy.set_flat(previous)
    seconds = (time.perf_counter() - start) / members
    name = label or policy_name(policy)
    return [
        item_result(
            item,
            encoded,
            reports[i],
            policy=f"{name}[{i}]",
            by_likelihood=by_likelihood,
            score=scores[i],
            prediction=predictions[i],
            answer_logprob=logprobs[i],
            seconds=seconds,
        )
        for i in range(members)
    ]
