"""Many policies on one suite for the price of one prompt per item (``kvpolicy compare --shared-prefill``).

The ordinary harness runs every (policy, budget) over every item: the prompt's forward calls are
repeated for each, and they are most of the cost. Here the items come first: each prompt runs
once with nothing evicted while the statistics every policy asks for are recorded
(`kvpolicy.integrations.hf.shared_prefill.record_prompt`); then each policy takes its own view of that
recording, makes its first eviction pass, and decodes (or teacher-forces) the answer with its own
schedule from there. The full-cache reference comes from the same recording.

The protocol this measures: **every policy's first eviction pass comes after the whole prompt**
(question included) — what SnapKV and kvpolicy's evolved NAMM always do, and how kvpress
compresses. Policies that would otherwise evict between prompt chunks (H2O, TOVA, L2,
StreamingLLM, FastGen with the harness's chunked prefill) keep the whole prompt until then, so
their scores here are for compression *after* prefill, not for a bounded prefill peak. Results
land in the same per-run stores as the ordinary harness (so tables, plots and resuming work the
same); their summaries record ``"prefill": "shared"``.

Under ``context-first`` (`kvpolicy.eval.protocols`) the recording covers the context alone and
each fork seals its cache before the question is fed. A policy that evicts while the context
streams in (every chunk, every step) cannot be forked from a recording that skipped those passes,
so it runs its own chunked prefill of the context (`ItemRows`): the table measures each policy
with its own schedule.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvpolicy import build
from kvpolicy.checkpoint import tensor_checksum
from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.harness import check_run_arguments, evaluate
from kvpolicy.eval.items import Item
from kvpolicy.eval.prompting import encode
from kvpolicy.eval.protocols import DEFAULT_PROTOCOL, EvalProtocol, check_protocol
from kvpolicy.eval.references import reference_path
from kvpolicy.eval.results import ItemResult, ResultStore
from kvpolicy.eval.rows import ContextRows, ForkedRows, ItemRows, Row, shared_prompt
from kvpolicy.integrations.hf.shared_prefill import Prefill, SharedRepeats, due_layers, prepare, record_prompt
from kvpolicy.types import Requirements


def evaluate_many(
    runs: Sequence[tuple[str, Any, Path]],
    items: Sequence[Item],
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    metric: str,
    chunk_size: int,
    reference_dir: str | Path | None = None,
    progress: bool = True,
    protocol: EvalProtocol = DEFAULT_PROTOCOL,
) -> int:
    """Compute every missing result of ``runs`` (``(label, policy, out folder)``) and of the
    full-cache reference from one recorded prompt per `context_groups` entry (an item, or under
    ``context-first`` the questions of one context); returns the prompts recorded."""
    check_run_arguments(metric, chunk_size)
    check_protocol(protocol)
    if metric == "both":
        raise InvalidConfigError("--shared-prefill scores with 'task' or 'loglik', not 'both'")
    references = ResultStore(reference_path(model_name, metric, chunk_size, reference_dir, protocol), protocol)
    evicting = [(label, policy, ResultStore(Path(out) / "results.jsonl", protocol)) for label, policy, out in runs
                if policy.schedule.kind != "never"]  # fmt: skip
    policies = [(label, policy) for label, policy, _ in evicting]
    stores = {label: store for label, _, store in evicting}
    union = bind_policies(policies, tokenizer, protocol)
    recorded = 0

    def save(label: str, results: list[ItemResult]) -> None:  # as soon as a policy is done
        for result in results:
            stores[label].add(result)

    groups = context_groups(items, protocol)
    for group in tqdm(groups, desc="shared prefill", unit="context", dynamic_ncols=True, disable=not progress):
        pending = {label: [i for i in group if not store.done(i.uid, i.fingerprint)] for label, _, store in evicting}
        pending = {label: todo for label, todo in pending.items() if todo}
        need_reference = [i for i in group if not references.done(i.uid, i.fingerprint)]
        if not pending and not need_reference:
            continue
        _, reference = shared_item_results(
            policies, pending, union, group, model, tokenizer, metric=metric, chunk_size=chunk_size,
            reference=need_reference, protocol=protocol, deliver=save,
        )  # fmt: skip
        recorded += 1
        for result in reference:
            references.add(result)
    return recorded


def context_groups(items: Sequence[Item], protocol: EvalProtocol) -> list[list[Item]]:
    """Items that share one recorded prompt: under ``context-first`` the questions of one context
    (`Item.context_id`; e.g. the four of a ``multikey-shared`` context), in first-seen order;
    under ``question-aware`` each item alone (the prompt holds its question)."""
    if protocol != "context-first":
        return [[item] for item in items]
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.context_id, []).append(item)
    return list(groups.values())


def forks_from_recording(policy: Any, protocol: EvalProtocol) -> bool:
    """Whether ``policy`` is forked from the shared recording: under ``question-aware`` every
    policy (its first pass moved after the whole prompt); under ``context-first`` only one whose
    first pass comes at the context's end — one evicting as the context streams in prefills it
    itself, so its passes between chunks are measured."""
    return protocol != "context-first" or policy.schedule.kind == "after_prefill"


def bind_policies(
    policies: Sequence[tuple[str, Any]], tokenizer: Any, protocol: EvalProtocol = DEFAULT_PROTOCOL
) -> Requirements:
    """Bind every evicting policy to ``tokenizer``; the union of what the forked ones ask a recording for."""
    union = Requirements()
    for _, policy in policies:
        policy.bind_tokenizer(tokenizer)
        if forks_from_recording(policy, protocol):
            union = union | policy.requirements
    return union


def shared_item_results(
    policies: Sequence[tuple[str, Any]],
    pending: Mapping[str, Sequence[Item]],
    union: Requirements,
    group: Sequence[Item],
    model: Any,
    tokenizer: Any,
    *,
    metric: str,
    chunk_size: int,
    reference: Sequence[Item] = (),
    protocol: EvalProtocol = DEFAULT_PROTOCOL,
    deliver: Callable[[str, list[ItemResult]], None] | None = None,
) -> tuple[dict[str, list[ItemResult]], list[ItemResult]]:
    """One recorded prompt of ``group`` (items of one `context_groups` entry: under
    ``context-first``, questions of one context): the results of each ``(label, policy)`` of
    ``policies`` for the items ``pending[label]``, and the full-cache results of the items of
    ``reference`` (forked from the recording, nothing evicted). ``union`` is `bind_policies` of all
    ``policies``, so a result does not depend on which of them are pending. Policies not forked
    (`forks_from_recording`) run their own chunked prefill, once per context (`ContextRows`).
    ``deliver(label, results)`` is called as soon as each policy's results exist, so a caller can
    store them before the next policy runs (a context of a long item costs an hour of policies)."""
    run = {"model": model, "tokenizer": tokenizer, "metric": metric, "chunk_size": chunk_size, "protocol": protocol}
    results: dict[str, list[ItemResult]] = {}

    def done(label: str, computed: list[ItemResult]) -> None:
        results[label] = computed
        if deliver is not None:
            deliver(label, computed)

    for label, policy in policies:
        if label in pending and not forks_from_recording(policy, protocol):
            done(label, _own(policy, pending[label], label, **run))
    forked = [(label, policy) for label, policy in policies if forks_from_recording(policy, protocol)]
    if not forked:
        return results, _own(build("full"), reference, "full", **run) if reference else []
    start = time.perf_counter()
    prompt = shared_prompt(Row(group[0], encode(group[0], tokenizer), ""), protocol)
    cache, last = record_prompt(model, prompt, union, chunk_size)
    prompt_seconds = time.perf_counter() - start
    full = []
    if reference:  # any policy's view of the recording, nothing evicted
        policy = forked[0][1]
        full = _forked(
            policy, reference, prepare(policy, model, cache, last, prompt_seconds), "full", evict=False, **run
        )
    prepared: dict[str, Prefill] = {}  # budgets of one policy share its features
    repeats: SharedRepeats = {}  # policies repeating the context alike share KVzip's repeat pass
    for label, policy in forked:
        if label not in pending:
            continue
        key = _feature_key(policy) + str(due_layers(policy, model, cache))
        if key not in prepared:
            prepared[key] = prepare(policy, model, cache, last, prompt_seconds, repeats)
        done(label, _forked(policy, pending[label], prepared[key], label, **run))
    return results, full


def _feature_key(policy: Any) -> str:
    """Policies equal but for their budget extract the same features from a recorded prompt (and,
    after a whole prompt larger than any budget, are due on the same layers)."""
    config = policy.config.to_dict()
    config.pop("budget")
    return json.dumps(config, sort_keys=True) + tensor_checksum(policy.buffers())


def _forked(
    policy: Any,
    items: Sequence[Item],
    shared: Prefill,
    label: str,
    *,
    model: Any,
    tokenizer: Any,
    metric: Any,
    chunk_size: int,
    protocol: EvalProtocol,
    evict: bool = True,
) -> list[ItemResult]:
    """``policy``'s results on ``items`` (one prompt's), each forked from its view of the recording."""
    plan = ForkedRows(lambda row: shared, evict=evict)
    return evaluate(
        policy, items, model, tokenizer, metric=metric, chunk_size=chunk_size, rows=plan, label=label,
        protocol=protocol,
    )  # fmt: skip


def _own(
    policy: Any, items: Sequence[Item], label: str, *, model: Any, tokenizer: Any, metric: Any, chunk_size: int,
    protocol: EvalProtocol,
) -> list[ItemResult]:  # fmt: skip
    """``policy``'s results on ``items`` (one prompt's) with its own chunked prefill (its passes
    between chunks): under ``context-first`` one compression of the shared context for all of them."""
    rows = ContextRows() if protocol == "context-first" else ItemRows()
    return evaluate(
        policy, items, model, tokenizer, metric=metric, chunk_size=chunk_size, rows=rows, label=label,
        protocol=protocol,
    )  # fmt: skip
