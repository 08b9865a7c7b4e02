"""A known test function as a workload: score = exp(−‖x − target‖² · weight(item)).

It lets the runner, its checkpoints and the executors be checked in milliseconds against a
problem whose optimum is known (every task's ``target`` vector, derived from its name), while
the real path (`kvpolicy.evolve.hf_workload`) runs a model. The "full cache" reference of every
item is 1.0, the score at the optimum; the cache is always reported as fully kept.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvpolicy.atomic import atomic_path
from kvpolicy.errors import InvalidConfigError
from kvpolicy.evolve.jobs import Job, JobResult


def task_target(task: str, dim: int) -> torch.Tensor:
    """The optimum of ``task``: a fixed vector in [-0.5, 0.5]^dim derived from the task name."""
    seed = int.from_bytes(hashlib.sha256(task.encode()).digest()[:4], "little")
    return torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5


def item_weight(seed: int) -> float:
    """Items differ in how sharply they punish distance (1.0 to 2.0), like prompts of varying difficulty."""
    return 1.0 + (seed * 0.618033988749895) % 1.0


class QuadraticWorkload:
    """``policy`` config ``{"dim": n}``: the number of parameters searched."""

    def __init__(self, policy: object) -> None:
        dim = policy.get("dim") if isinstance(policy, dict) else None
        if not isinstance(dim, int) or dim < 2:
            raise InvalidConfigError(f'the quadratic workload takes "policy": {{"dim": n}} with n >= 2, got {policy!r}')
        self.dim = dim

    @property
    def num_params(self) -> int:
        return self.dim

    def run(self, job: Job) -> JobResult:
        start = time.perf_counter()
        items = len(job.seeds)
        if job.kind == "calibrate" or job.params is None:
            ones = torch.ones(1, items, dtype=torch.float64)
            return JobResult(ones, ones.clone(), {}, time.perf_counter() - start)
        params = job.params.double()
        distance = (params - task_target(job.task, self.dim)).square().sum(dim=1, keepdim=True)
        weights = torch.tensor([item_weight(s) for s in job.seeds], dtype=torch.float64)
        scores = torch.exp(-distance * weights)
        return JobResult(scores, torch.ones_like(scores), {}, time.perf_counter() - start)

    def save_result(self, params: torch.Tensor, buffers: dict[str, torch.Tensor], path: Path) -> None:
        with atomic_path(path) as tmp:
            save_file({"params": params.double().contiguous()}, str(tmp), metadata={"format": "kvpolicy.quadratic/1"})
