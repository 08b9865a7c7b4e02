"""The full-cache score of every item an evolution run uses, computed once and kept on disk.

Fitness compares each member's score with the full-cache score of the same item
(`kvpolicy.evolve.fitness`), so those references are computed the first time an item is drawn,
written atomically to ``references.json`` in the output folder and read back by a resumed run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from kvpolicy.atomic import atomic_write_text
from kvpolicy.errors import CheckpointError
from kvpolicy.evolve.executors import Executor
from kvpolicy.evolve.jobs import Job


class ReferenceScores:
    """Full-cache scores by ``(task, split, length, seed)`` for one fitness ``metric``, kept in ``path``."""

    def __init__(self, path: Path, metric: str) -> None:
        self.path = path
        self.metric = metric
        self.scores: dict[str, float] = {}

    def load(self) -> None:
        """Read the scores a previous run wrote (none yet: nothing to read)."""
        if not self.path.exists():
            return
        try:
            self.scores = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{self.path} is corrupt ({exc}); delete it to recompute the full-cache references"
            ) from exc

    def _key(self, task: str, split: str, length: int, seed: int) -> str:
        return f"{task}|{split}|{length}|{seed}|{self.metric}"

    def ensure(self, wanted: Sequence[tuple[str, str, int, tuple[int, ...]]], executor: Executor) -> None:
        """Compute (once, then cached on disk) the full-cache score of every item in ``wanted``."""
        jobs = []
        for task, split, length, seeds in wanted:
            missing = tuple(s for s in seeds if self._key(task, split, length, s) not in self.scores)
            if missing:
                jobs.append(Job(len(jobs), "evaluate", task, split, length, missing))
        if not jobs:
            return
        for index, result in executor.map(jobs):
            job = jobs[index]
            for seed, score in zip(job.seeds, result.scores[0].tolist(), strict=True):
                self.scores[self._key(job.task, job.split, job.length, seed)] = float(score)
        atomic_write_text(self.path, json.dumps(self.scores, indent=1, sort_keys=True))

    def of(self, task: str, split: str, length: int, seeds: Sequence[int]) -> torch.Tensor:
        """``[len(seeds)]`` float64: the full-cache scores of these items (computed by `ensure`)."""
        return torch.tensor([self.scores[self._key(task, split, length, s)] for s in seeds], dtype=torch.float64)
