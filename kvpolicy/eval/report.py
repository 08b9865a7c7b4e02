"""Summaries of results: per-task means with standard errors, normalised by the full cache.

Scores are normalised per task as NAMM reports LongBench (Cetin et al. 2024): the policy's mean
score divided by the full-cache mean on the same items. The difference to the full cache is
paired item by item, so its standard error is the one that says whether a gap is real.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import attrs

from kvpolicy.eval.results import ItemResult

ALL = "all"


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / √n); 0 for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


@attrs.frozen
class TaskSummary:
    """One task (or ``all``) of one run. ``normalised`` = mean ÷ full-cache mean; ``delta`` is the
    paired mean difference to the full cache with its standard error ``delta_se``."""

    task: str
    n: int
    score: float
    score_se: float
    reference: float | None
    reference_se: float | None
    normalised: float | None
    normalised_se: float | None
    delta: float | None
    delta_se: float | None
    kept_fraction: float
    tokens_seen: float
    seconds: float


def summarise_task(task: str, results: Sequence[ItemResult], references: Mapping[str, ItemResult]) -> TaskSummary:
    scores = [r.score for r in results]
    refs = [references[r.uid].score for r in results if r.uid in references]
    paired = [r.score - references[r.uid].score for r in results if r.uid in references]
    complete = len(refs) == len(results) and refs
    ref_mean = mean(refs) if complete else None
    normalised = normalised_se = None
    if ref_mean:
        normalised = mean(scores) / ref_mean
        normalised_se = standard_error(scores) / ref_mean
    return TaskSummary(
        task=task,
        n=len(results),
        score=mean(scores),
        score_se=standard_error(scores),
        reference=ref_mean,
        reference_se=standard_error(refs) if complete else None,
        normalised=normalised,
        normalised_se=normalised_se,
        delta=mean(paired) if complete else None,
        delta_se=standard_error(paired) if complete else None,
        kept_fraction=mean([r.kept_fraction for r in results]),
        tokens_seen=mean([r.tokens_seen for r in results]),
        seconds=sum(r.seconds for r in results),
    )


def summarise(results: Iterable[ItemResult], references: Mapping[str, ItemResult]) -> list[TaskSummary]:
    """Per-task summaries plus an ``all`` row: mean over tasks of each figure (tasks weigh
    equally, as in the paper); its standard errors combine the tasks' as independent."""
    by_task: dict[str, list[ItemResult]] = {}
    for result in results:
        by_task.setdefault(result.task, []).append(result)
    rows = [summarise_task(task, items, references) for task, items in by_task.items()]
    if not rows:
        return rows

    def combined(field: str) -> tuple[float | None, float | None]:
        values = [getattr(r, field) for r in rows]
        errors = [getattr(r, f"{field}_se") for r in rows]
        if any(v is None for v in values):
            return None, None
        return mean(values), math.sqrt(sum(e * e for e in errors)) / len(rows)

    score, score_se = combined("score")
    reference, reference_se = combined("reference")
    normalised, normalised_se = combined("normalised")
    delta, delta_se = combined("delta")
    rows.append(
        TaskSummary(
            task=ALL,
            n=sum(r.n for r in rows),
            score=score,  # type: ignore[arg-type]
            score_se=score_se,  # type: ignore[arg-type]
            reference=reference,
            reference_se=reference_se,
            normalised=normalised,
            normalised_se=normalised_se,
            delta=delta,
            delta_se=delta_se,
            kept_fraction=mean([r.kept_fraction for r in rows]),
            tokens_seen=mean([r.tokens_seen for r in rows]),
            seconds=sum(r.seconds for r in rows),
        )
    )
    return rows


def summarise_by_length(
    results: Iterable[ItemResult], references: Mapping[str, ItemResult]
) -> dict[int, list[TaskSummary]]:
    """`summarise` for each context length apart: how a policy degrades as the prompt grows."""
    by_length: dict[int, list[ItemResult]] = {}
    for result in results:
        by_length.setdefault(result.length, []).append(result)
    return {length: summarise(group, references) for length, group in sorted(by_length.items())}


def length_table(by_length: Mapping[int, Sequence[TaskSummary]], field: str = "score") -> str:
    """Markdown: one row per task (and ``all``), one column per context length; cells are
    ``field`` (``score`` in points or ``normalised`` in %) ± its standard error."""
    lengths = list(by_length)
    tasks = list(dict.fromkeys(r.task for rows in by_length.values() for r in rows))
    cells = {(length, r.task): r for length, rows in by_length.items() for r in rows}
    unit = "%" if field == "normalised" else ""
    lines = [
        "| task | " + " | ".join(f"{length:,} tokens" for length in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for task in tasks:
        row = [cells.get((length, task)) for length in lengths]
        text = [_cell(r, field, unit) for r in row]
        lines.append(f"| {task} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: TaskSummary | None, field: str, unit: str) -> str:
    if row is None or getattr(row, field) is None:
        return "–"
    return _pm(getattr(row, field), getattr(row, f"{field}_se")) + unit


def per_layer_retention(results: Iterable[ItemResult]) -> list[float]:
    """Mean kept fraction of each layer over the results."""
    layers = [r.per_layer_fraction for r in results if r.per_layer_fraction]
    if not layers:
        return []
    return [mean([row[i] for row in layers]) for i in range(len(layers[0]))]


def _pm(value: float | None, error: float | None, scale: float = 100.0) -> str:
    if value is None:
        return "–"
    return f"{value * scale:.1f} ± {(error or 0.0) * scale:.1f}"


def markdown_table(rows: Sequence[TaskSummary], title: str | None = None) -> str:
    """A markdown table of one run's summary (scores in points, i.e. ×100)."""
    lines = [f"**{title}**", ""] if title else []
    lines += [
        "| task | n | score | full cache | normalised | Δ vs full (paired) | cache kept | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.n} | {_pm(r.score, r.score_se)} | {_pm(r.reference, r.reference_se)} | "
            f"{_pm(r.normalised, r.normalised_se)}% | {_pm(r.delta, r.delta_se)} | {r.kept_fraction:.1%} | "
            f"{r.tokens_seen:.0f} |"
        )
    return "\n".join(lines) + "\n"
