"""Chance-corrected scores and paired bootstrap intervals between two runs on the same items.

A task's *skill kept* is ``(mean score − chance) / (full-cache mean − chance)``: 100% is the full
cache, 0% a guess (multi-key retrieval is 25% by chance, so a raw ratio flatters a policy that
guesses). The summary over tasks is the mean of the tasks' figures. Two runs on the same items
are compared by a paired bootstrap: items are resampled with replacement within each task (the
same draw for both runs and the reference), the difference of their summaries is recomputed
each time, and the 2.5th–97.5th percentiles give the 95% interval. Items that ask about one
context are not independent: when a task has such items (same ``context_id``), its *contexts*
are resampled, each with all its items (a cluster bootstrap), so the interval is not narrowed by
counting one document several times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import numpy as np

from kvpolicy.eval.results import ItemResult
from kvpolicy.eval.tasks import TASKS


def chance(task: str) -> float:
    return TASKS[task].chance if task in TASKS else 0.0


def _skill(scores: np.ndarray, full: np.ndarray, floor: float) -> np.ndarray:
    """Chance-corrected ratio along the last axis (items); NaN where the full cache is at chance."""
    gap = full.mean(-1) - floor
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gap > 1e-9, (scores.mean(-1) - floor) / np.where(gap > 1e-9, gap, 1.0), np.nan)


@attrs.frozen
class PairedDifference:
    """``a`` and ``b`` (chance-corrected skill kept, mean over tasks) and ``a − b`` with its 95%
    paired bootstrap interval, over ``n`` items (per task counts in ``items``)."""

    a: float
    b: float
    delta: float
    low: float
    high: float
    n: int
    items: dict[str, int]


def _by_task(
    a: Sequence[ItemResult], b: Sequence[ItemResult], references: Mapping[str, ItemResult]
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Per task: ``[3, items]`` scores of a, b and the reference on the items all three have, and
    each item's context (its own uid where the record has no context id)."""
    theirs = {r.uid: r for r in b}
    grouped: dict[str, list[tuple[float, float, float]]] = {}
    contexts: dict[str, list[str]] = {}
    for result in a:
        other, ref = theirs.get(result.uid), references.get(result.uid)
        if other is not None and ref is not None:
            grouped.setdefault(result.task, []).append((result.score, other.score, ref.score))
            contexts.setdefault(result.task, []).append(result.context_id or result.uid)
    tasks = {task: np.array(rows, dtype=np.float64).T for task, rows in sorted(grouped.items())}
    return tasks, contexts


def _resample(scores: np.ndarray, contexts: list[str], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[resamples, 3, items]`` bootstrap draws of one task: items, or whole contexts when items share one."""
    if len(set(contexts)) == len(contexts):
        return scores[:, rng.integers(0, scores.shape[1], size=(resamples, scores.shape[1]))].transpose(1, 0, 2)
    members: dict[str, list[int]] = {}
    for index, context in enumerate(contexts):
        members.setdefault(context, []).append(index)
    clusters = list(members.values())
    size = scores.shape[1]
    draws = np.empty((resamples, 3, size))
    for r in range(resamples):  # contexts drawn until the draw has as many items as the task
        picked: list[int] = []
        while len(picked) < size:
            picked += clusters[rng.integers(0, len(clusters))]
        draws[r] = scores[:, picked[:size]]
    return draws


def paired_difference(
    a: Sequence[ItemResult],
    b: Sequence[ItemResult],
    references: Mapping[str, ItemResult],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """Chance-corrected skill of ``a`` and ``b`` and the bootstrap interval of ``a − b``."""
    tasks, contexts = _by_task(a, b, references)
    if not tasks:
        raise ValueError("the two runs share no item with a full-cache reference")
    rng = np.random.default_rng(seed)

    def summary(draws: dict[str, np.ndarray]) -> np.ndarray:  # [..., 2]: a and b
        per_task = [
            np.stack([_skill(s[..., 0, :], s[..., 2, :], chance(t)), _skill(s[..., 1, :], s[..., 2, :], chance(t))], -1)
            for t, s in draws.items()
        ]
        return np.nanmean(np.stack(per_task, 0), axis=0)

    point = summary(tasks)
    boot = {t: _resample(s, contexts[t], resamples, rng) for t, s in tasks.items()}
    diffs = summary(boot)
    diffs = diffs[..., 0] - diffs[..., 1]
    low, high = np.nanpercentile(diffs, [2.5, 97.5])
    return PairedDifference(
        a=float(point[0]),
        b=float(point[1]),
        delta=float(point[0] - point[1]),
        low=float(low),
        high=float(high),
        n=sum(s.shape[1] for s in tasks.values()),
        items={t: int(s.shape[1]) for t, s in tasks.items()},
    )
