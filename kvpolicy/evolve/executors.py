"""Executors run a generation's jobs: in this process, in local worker processes (each with its
own model copy), or on Ray actors. They only decide *where* a job runs; a job's numbers depend on
the job alone, so every executor yields the same results for the same config and seed.

``map`` yields ``(job index, result)`` as jobs finish, in any order, so the runner can record
each finished job at once and a killed run loses at most the jobs in flight.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from kvpolicy.errors import InvalidConfigError, KVPolicyError
from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.jobs import Job, JobResult, Workload
from kvpolicy.evolve.workloads import build_workload


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


_WORKER_WORKLOAD: Workload | None = None


def worker_threads(config: EvolveConfig) -> int:
    """Torch threads per worker: the config's, or this machine's CPUs shared among the workers."""
    return config.executor.threads or max(1, (os.cpu_count() or 1) // config.executor.workers)


#: how often a worker checks that its parent is still alive (seconds)
PARENT_CHECK_SECONDS = 0.5


def _exit_with_parent(parent_pid: int, interval: float = PARENT_CHECK_SECONDS) -> None:
    """End this worker as soon as ``parent_pid`` is no longer its parent.

    A SIGKILLed parent runs no cleanup, and a worker blocked on the job queue or busy in a job
    would otherwise live on, holding a model copy and CPU. A daemon thread polls ``os.getppid()``
    (the dead parent's children are re-parented) — portable, and unlike Linux's
    ``PR_SET_PDEATHSIG`` not fooled by the exit of whichever parent *thread* spawned the worker.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)  # no cleanup: the parent that would receive results is gone

    threading.Thread(target=watch, name="kvpolicy-parent-watchdog", daemon=True).start()


def _init_worker(config_data: dict[str, Any], threads: int, parent_pid: int | None = None) -> None:
    global _WORKER_WORKLOAD
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    torch.set_num_threads(threads)
    _WORKER_WORKLOAD = build_workload(EvolveConfig.from_dict(config_data))


def _run_in_worker(job: Job) -> tuple[int, JobResult]:
    if _WORKER_WORKLOAD is None:
        raise RuntimeError("worker used before its workload was built")
    return job.index, _WORKER_WORKLOAD.run(job)


class ProcessPoolExecutor:
    """``workers`` spawned processes, each building its own workload (model copy) once and
    running with ``threads`` torch threads. Spawned, not forked: forking a process that has
    started torch's thread pools can deadlock. Workers die with this process, even when it is
    SIGKILLed (`_exit_with_parent`)."""

    def __init__(self, config: EvolveConfig) -> None:
        context = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=config.executor.workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(config.to_dict(), worker_threads(config), os.getpid()),
        )

    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]:
        futures = [self._pool.submit(_run_in_worker, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    yield future.result()
                except concurrent.futures.process.BrokenProcessPool as exc:
                    raise KVPolicyError(
                        "a worker process died (out of memory or killed); rerun the same command to resume"
                    ) from exc
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """``workers`` Ray actors, each holding its own workload; needs ``pip install kvpolicy[ray]``."""

    def __init__(self, config: EvolveConfig) -> None:
        try:
            import ray
        except ImportError as exc:
            raise InvalidConfigError(
                'the "ray" executor needs Ray, which is not installed: pip install kvpolicy[ray]'
            ) from exc
        self._ray = ray
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=False)

        @ray.remote
        class _Actor:
            def __init__(self, config_data: dict[str, Any], threads: int) -> None:
                _init_worker(config_data, threads)

            def run(self, job: Job) -> tuple[int, JobResult]:
                return _run_in_worker(job)

        self._actors = [_Actor.remote(config.to_dict(), worker_threads(config)) for _ in range(config.executor.workers)]

    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]:
        pending = [self._actors[i % len(self._actors)].run.remote(job) for i, job in enumerate(jobs)]
        while pending:
            done, pending = self._ray.wait(pending, num_returns=1)
            yield self._ray.get(done[0])

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []


def make_executor(config: EvolveConfig, workload: Workload | None = None) -> Executor:
    """The executor the config names (``workload`` is reused by the in-process one)."""
    kind = config.executor.kind
    if kind == "inprocess":
        return InProcessExecutor(config, workload)
    if kind == "process":
        return ProcessPoolExecutor(config)
    return RayExecutor(config)
