"""Executors run a generation's jobs: in this process, in local worker processes (each with its
own model copy), or on Ray actors. They only decide *where* a job runs; a job's numbers depend on
the job alone, so every executor yields the same results for the same config and seed.

``map`` yields ``(job index, result)`` as jobs finish, in any order, so the runner can record
each finished job at once and a killed run loses at most the jobs in flight.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import attrs
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


class _RayWorker:
    """The body of one Ray actor: a workload built once when the actor starts, then jobs."""

    def __init__(self, config_data: dict[str, Any], threads: int) -> None:
        _init_worker(config_data, threads)

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: Job) -> tuple[int, JobResult]:
        return _run_in_worker(job)


@attrs.define
class _Actor:
    handle: Any
    #: resolves to the actor's process id once its workload is built
    pid_ref: Any
    pid: int | None = None


#: how many times a job may be started on an actor before an actor loss becomes an error
RAY_ATTEMPTS = 3


class RayExecutor:
    """``workers`` Ray actors, each holding its own workload (model copy); needs
    ``pip install kvpolicy[ray]``.

    Scheduling is dynamic: a free actor takes the next job, because members differ ~2x in cost
    and a fixed assignment leaves actors idle behind a slow one. A job whose actor is lost — its
    process killed or out of memory, its node gone — is rerun on a new actor (up to
    ``attempts`` starts in all); since a job's numbers depend on the job alone, the rerun gives
    what the first run would have. An exception raised by a job, or by an actor building its
    workload, is not retried: it would recur. Each actor reserves ``threads`` CPUs (default 1)
    for its life, so Ray places no more actors on a node than it has cores.

    Ray is joined at ``config.executor.address`` (``"auto"``, ``"HEAD:6379"``, ``"local"``; unset:
    ``$RAY_ADDRESS``, else a cluster ``ray start`` made on this machine, else a local instance
    started here); one already initialised in this process is used as it is.
    """

    def __init__(self, config: EvolveConfig, *, attempts: int = RAY_ATTEMPTS) -> None:
        try:
            import ray
        except ImportError as exc:
            raise InvalidConfigError(
                'the "ray" executor needs Ray, which is not installed: pip install kvpolicy[ray]'
            ) from exc
        if attempts < 1:
            raise InvalidConfigError(f"attempts must be at least 1, got {attempts}")
        self._ray = ray
        if not ray.is_initialized():
            address = config.executor.address
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as exc:
                raise InvalidConfigError(
                    f"cannot join a Ray cluster at {address or '$RAY_ADDRESS / the last `ray start`'} ({exc}); "
                    "start one with `ray start --head`, or give the address it printed"
                ) from exc
        self._threads = config.executor.threads or 1
        largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
        if self._threads > largest:
            raise InvalidConfigError(
                f"each Ray actor reserves executor.threads={self._threads} CPUs, but the largest node of the "
                f"cluster has {largest:g}; lower threads or add a larger node"
            )
        self._workers = config.executor.workers
        self._attempts = attempts
        self._config_data = config.to_dict()
        self._remote = ray.remote(num_cpus=self._threads, max_restarts=0, max_task_retries=0)(_RayWorker)
        self._actors: list[_Actor] = []
        self._running: dict[int, _Actor] = {}
        #: jobs started again on a new actor after losing theirs
        self.reruns = 0
        self._top_up()

    def _top_up(self) -> None:
        while len(self._actors) < self._workers:
            handle = self._remote.remote(self._config_data, self._threads)
            self._actors.append(_Actor(handle, handle.pid.remote()))

    def _discard(self, actor: _Actor) -> None:
        self._actors.remove(actor)
        self._ray.kill(actor.handle, no_restart=True)

    def _pid(self, actor: _Actor) -> int | None:
        if actor.pid is None:
            ready, _ = self._ray.wait([actor.pid_ref], timeout=0)
            if ready:
                try:
                    actor.pid = self._ray.get(ready[0])
                except self._ray.exceptions.RayError:
                    return None
        return actor.pid

    def pids(self) -> list[int | None]:
        """The process id of every actor (None while it is starting)."""
        return [self._pid(actor) for actor in list(self._actors)]

    def running(self) -> dict[int, int | None]:
        """Job index → process id of the actor running it, for the jobs started and not finished."""
        return {index: self._pid(actor) for index, actor in list(self._running.items())}

    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[int, JobResult]]:
        ray = self._ray
        lost = (
            ray.exceptions.RayActorError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.OutOfMemoryError,
        )
        self._top_up()
        queue: collections.deque[tuple[Job, int]] = collections.deque((job, 0) for job in jobs)
        idle = list(self._actors)
        in_flight: dict[Any, tuple[_Actor, Job, int]] = {}
        try:
            while queue or in_flight:
                while queue and idle:
                    (job, starts), actor = queue.popleft(), idle.pop(0)
                    in_flight[actor.handle.run.remote(job)] = (actor, job, starts + 1)
                    self._running[job.index] = actor
                (done,), _ = ray.wait(list(in_flight), num_returns=1)
                actor, job, starts = in_flight.pop(done)
                del self._running[job.index]
                try:
                    index, result = ray.get(done)
                except lost as exc:
                    self._discard(actor)
                    if getattr(exc, "actor_init_failed", False):  # its workload cannot be built: would recur
                        raise KVPolicyError(f"a Ray actor could not build its workload: {exc}") from exc
                    if starts >= self._attempts:
                        raise KVPolicyError(
                            f"job {job.index} ({job.task}, {job.length} tokens) lost its Ray actor {starts} times; "
                            f"last: {type(exc).__name__}: {exc}"
                        ) from exc
                    self.reruns += 1
                    self._top_up()
                    idle.append(self._actors[-1])
                    queue.appendleft((job, starts))
                    continue
                idle.append(actor)
                yield index, result
        finally:
            # left unfinished (an error, or the caller stopped reading): their actors are still busy
            # with jobs nobody will read, so they are replaced rather than waited for
            for actor, job, _ in in_flight.values():
                self._running.pop(job.index, None)
                self._discard(actor)

    def close(self) -> None:
        for actor in list(self._actors):
            self._discard(actor)
        self._running.clear()


def make_executor(config: EvolveConfig, workload: Workload | None = None) -> Executor:
    """The executor the config names (``workload`` is reused by the in-process one)."""
    kind = config.executor.kind
    if kind == "inprocess":
        return InProcessExecutor(config, workload)
    if kind == "process":
        return ProcessPoolExecutor(config)
    return RayExecutor(config)
