"""Units of work an executor runs: a `Job` (some members × some items of one task) and its
`JobResult`, plus the `Workload` protocol that turns one into the other.

Jobs are plain picklable data, so the same job gives the same numbers in this process, in a
worker process or on a Ray actor; how the population is split into jobs is fixed by the config,
never by the executor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import attrs
import torch

JobKind = Literal["evaluate", "calibrate"]
#: the split of validation jobs: items of the ``train`` split whose seeds no generation draws
VALIDATION = "validation"


def item_split(split: str) -> str:
    """The task split a job's items come from (validation items are ``train`` items)."""
    return "train" if split == VALIDATION else split


@attrs.frozen(eq=False)
class Job:
    """Evaluate ``params [members, num_params]`` (None: the full-cache reference) on the items
    ``seeds`` of ``task`` / ``split`` at ``length`` tokens, with the frozen ``buffers`` (e.g.
    calibrated STFT statistics). ``calibrate`` jobs run the zero policy and return new buffers."""

    index: int
    kind: JobKind
    task: str
    split: str
    length: int
    seeds: tuple[int, ...]
    params: torch.Tensor | None = None
    buffers: dict[str, torch.Tensor] = attrs.field(factory=dict)
    members: tuple[int, ...] = ()
    #: calibration only: every task whose items the zero policy runs on (``task`` is the first)
    tasks: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return 1 if self.params is None else self.params.shape[0]


@attrs.frozen(eq=False)
class JobResult:
    """``scores [rows, items]`` in the job's metric (higher = better), ``kept [rows, items]``
    the measured fraction of the cache kept, ``buffers`` new frozen state (calibration only)."""

    scores: torch.Tensor
    kept: torch.Tensor
    buffers: dict[str, torch.Tensor] = attrs.field(factory=dict)
    seconds: float = 0.0


@runtime_checkable
class Workload(Protocol):
    """What evolution evaluates: built once per process from the config, then runs jobs."""

    @property
    def num_params(self) -> int: ...

    def run(self, job: Job) -> JobResult: ...

    def save_result(self, params: torch.Tensor, buffers: dict[str, torch.Tensor], path: Path) -> None: ...
