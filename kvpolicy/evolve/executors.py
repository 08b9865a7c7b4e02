"""Executors run a generation's jobs: in this process, in local worker processes (each with its
own model copy), or on Ray actors. They only decide *where* a job runs; a job's numbers depend on
the job alone, so every executor yields the same results for the same config and seed.

``map`` yields ``(job index, result)`` as jobs finish, in any order, so the runner can record
each finished job at once and a killed run loses at most the jobs in flight.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.jobs import Job, JobResult, Workload
from kvpolicy.evolve.workloads import build_workload
from kvpolicy.worker_pools import RAY_ATTEMPTS, ProcessPool, RayPool


class Executor(Protocol):
    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]: ...

    def close(self) -> None: ...


class InProcessExecutor:
    """Runs every job here, one after another, on one workload (one model copy)."""

    def __init__(self, config: EvolveConfig, workload: Workload | None = None) -> None:
        self._config = config
        self._workload = workload

    @property
    def workload(self) -> Workload:
        if self._workload is None:
            self._workload = build_workload(self._config)
        return self._workload

    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]:
        threads = self._config.executor.threads
        for job in jobs:
            outside = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                result = self.workload.run(job)
            finally:
                torch.set_num_threads(outside)
            yield job.index, result

    def close(self) -> None:
        self._workload = None


def worker_threads(config: EvolveConfig) -> int:
    """Torch threads per worker: the config's, or this machine's CPUs shared among the workers."""
    return config.executor.threads or max(1, (os.cpu_count() or 1) // config.executor.workers)


class _BuildWorkload:
    """A worker's workload, built from the config's data (picklable: sent to each worker)."""

    def __init__(self, config_data: dict[str, Any]) -> None:
        self._config_data = config_data

    def __call__(self) -> Workload:
        return build_workload(EvolveConfig.from_dict(self._config_data))


class ProcessPoolExecutor(ProcessPool):
    """``workers`` spawned processes, each building its own workload (model copy) once and
    running with ``threads`` torch threads (`kvpolicy.worker_pools.ProcessPool`)."""

    def __init__(self, config: EvolveConfig) -> None:
        super().__init__(
            _BuildWorkload(config.to_dict()), workers=config.executor.workers, threads=worker_threads(config)
        )


def _describe(job: Job) -> str:
    return f"job {job.index} ({job.task}, {job.length} tokens)"


class RayExecutor(RayPool):
    """``workers`` Ray actors, each holding its own workload (model copy); needs
    ``pip install kvpolicy[ray]`` (`kvpolicy.worker_pools.RayPool`: a free actor takes the next
    job, a job whose actor is lost reruns on a new one, up to ``attempts`` starts).

    Each actor reserves ``executor.threads`` CPUs (default 1). Ray is joined at
    ``config.executor.address`` (`kvpolicy.worker_pools.join_ray`).
    """

    def __init__(self, config: EvolveConfig, *, attempts: int = RAY_ATTEMPTS) -> None:
        super().__init__(
            _BuildWorkload(config.to_dict()),
            workers=config.executor.workers,
            threads=config.executor.threads or 1,
            address=config.executor.address,
            attempts=attempts,
            describe=_describe,
        )


def make_executor(config: EvolveConfig, workload: Workload | None = None) -> Executor:
    """The executor the config names (``workload`` is reused by the in-process one)."""
    kind = config.executor.kind
    if kind == "inprocess":
        return InProcessExecutor(config, workload)
    if kind == "process":
        return ProcessPoolExecutor(config)
    return RayExecutor(config)
