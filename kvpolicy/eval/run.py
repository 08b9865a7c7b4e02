"""One evaluation run on disk: a policy over a suite, with its full-cache reference, resumable.

Writes into ``out``: ``results.jsonl`` (one record per item, appended atomically as each item
finishes, so a rerun skips what is done), ``results.csv`` (with the full-cache score and the
normalised score of each item), ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

import kvpolicy
from kvpolicy.atomic import atomic_write_text
from kvpolicy.errors import ContextTooLongError
from kvpolicy.eval.harness import DEFAULT_CHUNK, Metric, evaluate
from kvpolicy.eval.items import Item
from kvpolicy.eval.protocols import DEFAULT_PROTOCOL, EvalProtocol, check_protocol
from kvpolicy.eval.references import reference_results
from kvpolicy.eval.report import (
    TaskSummary,
    length_table,
    markdown_table,
    per_layer_retention,
    summarise,
    summarise_by_length,
)
from kvpolicy.eval.results import ItemResult, ResultStore, to_csv
from kvpolicy.eval.rows import ChunkAlign, ContextRows, ItemRows, RowPlan


@attrs.frozen
class RunSummary:
    """What `run_suite` wrote: the label, the per-task rows, the per-layer retention, and the
    ``all`` row of each context length (``(length, row)``, shortest first)."""

    label: str
    rows: tuple[TaskSummary, ...]
    per_layer: tuple[float, ...]
    out: Path
    by_length: tuple[tuple[int, TaskSummary], ...] = ()

    @property
    def overall(self) -> TaskSummary:
        return self.rows[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "rows": [attrs.asdict(r) for r in self.rows],
            "per_layer_retention": list(self.per_layer),
            "by_length": [{"length": length, **attrs.asdict(row)} for length, row in self.by_length],
        }

    @classmethod
    def load(cls, out: str | Path) -> RunSummary:
        data = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
        rows = tuple(TaskSummary(**r) for r in data["rows"])
        by_length = tuple((r.pop("length"), TaskSummary(**r)) for r in data.get("by_length", []))
        return cls(data["label"], rows, tuple(data["per_layer_retention"]), Path(out), by_length)


def _summarises_more(out: Path, items: int) -> bool:
    """Whether ``out`` holds a readable summary of more than ``items`` items. A run folder's
    summary files never shrink: a later report that reads only some of its records (curves at 16
    items over a 48-item headline's folders) leaves the larger summary in place; the per-item
    records stay the source of every table."""
    try:
        return RunSummary.load(out).overall.n > items
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _summary_markdown(label: str, rows: Sequence[TaskSummary], lengths: dict[int, list[TaskSummary]]) -> str:
    """The per-task table, then score (points) and normalised score (%) by context length."""
    text = markdown_table(rows, title=label)
    if len(lengths) > 1:
        text += "\n**score by context length (points)**\n\n" + length_table(lengths, "score")
        text += "\n**normalised by the full cache, by context length (%)**\n\n" + length_table(lengths, "normalised")
    return text


def _stored_with(result: ItemResult | None, align: str) -> ItemResult | None:
    """A stored result counts as done only if its prompt was chunked the same way."""
    return result if result is not None and result.chunks == align else None


def check_fits_model(items: Sequence[Item], model: Any, model_name: str) -> None:
    """Refuse items whose nominal length exceeds the model's positions (SmolLM2: 8k), before any
    work: past its limit a RoPE model still runs but its answers mean nothing."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    too_long = sorted({item.length for item in items if item.length > limit})
    if too_long:
        raise ContextTooLongError(
            f"{model_name} takes at most {limit} positions, but the suite has items of "
            f"{', '.join(map(str, too_long))} tokens; choose --lengths of at most {limit} or a longer-context model"
        )


def _is_full_cache(policy: Any) -> bool:
    return policy.config == kvpolicy.build("full").config


def run_suite(
    policy: Any,
    items: Sequence[Item],
    model: Any,
    tokenizer: Any,
    *,
    out: str | Path,
    label: str,
    model_name: str,
    metric: Metric = "task",
    chunk_size: int = DEFAULT_CHUNK,
    reference_dir: str | Path | None = None,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    batch_size: int = 1,
    chunk_align: ChunkAlign | None = None,
    protocol: EvalProtocol = DEFAULT_PROTOCOL,
) -> RunSummary:
    """Evaluate ``policy`` on ``items`` into ``out`` (resuming) and summarise against the full cache.

    ``batch_size`` items run as one left-padded batch; ``chunk_align`` (default: ``end`` for a
    batch, else ``start``) is how prompts are chunked, and a stored result chunked otherwise is
    recomputed. ``protocol`` is when the question reaches the cache (`kvpolicy.eval.protocols`);
    ``out`` holds results of one protocol only."""
    check_protocol(protocol)
    align: ChunkAlign = chunk_align or ("end" if batch_size > 1 else "start")
    plan: RowPlan = ItemRows(batch_size, align)  # checked before any model work
    if protocol == "context-first" and batch_size == 1 and align == "start":
        plan = ContextRows()  # questions of one context share its compression; alone, the same computation
    check_fits_model(items, model, model_name)
    out = Path(out)
    references = reference_results(
        items,
        model,
        tokenizer,
        model_name=model_name,
        metric=metric,
        chunk_size=chunk_size,
        directory=reference_dir,
        progress="full cache" if progress else False,
        protocol=protocol,
    )
    results: list[ItemResult]
    store = ResultStore(out / "results.jsonl", protocol)
    if _is_full_cache(policy):
        results = [references[item.uid] for item in items]
        for result in results:
            if not store.done(result.uid, result.fingerprint):
                store.add(result)
    else:
        results = evaluate(
            policy,
            items,
            model,
            tokenizer,
            metric=metric,
            chunk_size=chunk_size,
            done=lambda item: _stored_with(store.finished(item), align),
            on_result=store.add,
            progress=label if progress else False,
            label=label,
            rows=plan,
            protocol=protocol,
        )
    rows = tuple(summarise(results, references))
    lengths = summarise_by_length(results, references)
    overall_by_length = tuple((length, group[-1]) for length, group in lengths.items())
    summary = RunSummary(label, rows, tuple(per_layer_retention(results)), out, overall_by_length)
    if _summarises_more(out, summary.overall.n):
        return summary  # a report over fewer of this run's items (e.g. curves over a headline's records)
    atomic_write_text(out / "results.csv", to_csv(results, references))
    record = {**summary.to_dict(), "policy": policy.config.to_dict(), "model": model_name, "metric": metric}
    record["chunk_size"] = chunk_size
    record["chunk_align"], record["batch_size"], record["protocol"] = align, batch_size, protocol
    record.update(settings or {})
    atomic_write_text(out / "summary.json", json.dumps(record, indent=2, sort_keys=True))
    atomic_write_text(out / "summary.md", _summary_markdown(label, rows, lengths))
    return summary
