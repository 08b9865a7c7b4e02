"""Worker pools: run picklable jobs in spawned local processes or on Ray actors, each worker
building its state (a model copy) once and then running jobs one after another.

They only decide *where* a job runs, never what it computes: evolution (`kvpolicy.evolve.executors`)
and evaluation (`kvpolicy.eval.distributed`) both rely on a job's result depending on the job
alone. A job is any picklable object with an ``index``; ``make_worker`` is a picklable callable
(called once in each worker process) that returns an object whose ``run(job)`` computes a result.
``map`` yields ``(job.index, result)`` as jobs finish, in any order, so the caller can record each
at once and a killed run loses at most the jobs in flight.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import attrs
import torch

from kvpolicy.errors import InvalidConfigError, KVPolicyError


class JobRunner(Protocol):
    """What ``make_worker`` returns: built once per worker process, then given jobs."""

    def run(self, job: Any) -> Any: ...


WorkerFactory = Callable[[], JobRunner]

_WORKER: JobRunner | None = None

#: how often a worker checks that its parent is still alive (seconds)
PARENT_CHECK_SECONDS = 0.5


def exit_with_parent(parent_pid: int, interval: float = PARENT_CHECK_SECONDS) -> None:
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


def init_worker(make_worker: WorkerFactory, threads: int, parent_pid: int | None = None) -> None:
    """Set this process's torch threads and build its worker (once per process)."""
    global _WORKER
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    torch.set_num_threads(threads)
    _WORKER = make_worker()


def run_in_worker(job: Any) -> tuple[int, Any]:
    if _WORKER is None:
        raise RuntimeError("worker used before it was built")
    return job.index, _WORKER.run(job)


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


class ProcessPool:
    """``workers`` spawned processes, each building its worker (model copy) once and running with
    ``threads`` torch threads. Spawned, not forked: forking a process that has started torch's
    thread pools can deadlock. Workers die with this process, even when it is SIGKILLed
    (`exit_with_parent`)."""

    def __init__(self, make_worker: WorkerFactory, *, workers: int, threads: int) -> None:
        if workers < 1 or threads < 1:
            raise InvalidConfigError(f"a process pool needs workers >= 1 and threads >= 1, got {workers} and {threads}")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(make_worker, threads, os.getpid()),
        )
        self._workers = workers

    def wait_ready(self, poll: float = 0.2) -> None:
        """Block until every worker process has built its worker (so timings leave start-up out):
        short waits are queued until each process has taken one."""
        seen: set[int] = set()
        while len(seen) < self._workers:
            seen |= {f.result() for f in [self._pool.submit(_pid_after, poll) for _ in range(self._workers)]}

    def map(self, jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        futures = [self._pool.submit(run_in_worker, job) for job in jobs]
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
    """The body of one Ray actor: its worker built once when the actor starts, then jobs."""

    def __init__(self, make_worker: WorkerFactory, threads: int) -> None:
        init_worker(make_worker, threads)

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: Any) -> tuple[int, Any]:
        return run_in_worker(job)


@attrs.define
class _Actor:
    handle: Any
    #: resolves to the actor's process id once its worker is built
    pid_ref: Any
    pid: int | None = None


#: how many times a job may be started on an actor before an actor loss becomes an error
RAY_ATTEMPTS = 3


def join_ray(address: str | None) -> Any:
    """The ``ray`` module, joined to the cluster at ``address`` (``"auto"``, ``"HEAD:6379"``,
    ``"local"``; None: ``$RAY_ADDRESS``, else a cluster ``ray start`` made on this machine, else a
    local instance started here); one already initialised in this process is used as it is."""
    try:
        import ray
    except ImportError as exc:
        raise InvalidConfigError(
            'the "ray" executor needs Ray, which is not installed: pip install kvpolicy[ray]'
        ) from exc
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise InvalidConfigError(
                f"cannot join a Ray cluster at {address or '$RAY_ADDRESS / the last `ray start`'} ({exc}); "
                "start one with `ray start --head`, or give the address it printed"
            ) from exc
    return ray


class RayPool:
    """``workers`` Ray actors, each holding its own worker (model copy); needs
    ``pip install kvpolicy[ray]``.

    Scheduling is dynamic: a free actor takes the next job, because jobs differ in cost and a
    fixed assignment leaves actors idle behind a slow one. A job whose actor is lost — its process
    killed or out of memory, its node gone — is rerun on a new actor (up to ``attempts`` starts in
    all); since a job's result depends on the job alone, the rerun gives what the first run would
    have. An exception raised by a job, or by an actor building its worker, is not retried: it
    would recur. Each actor reserves ``threads`` CPUs for its life, so Ray places no more actors
    on a node than it has cores. ``describe(job)`` names a job in errors.
    """

    def __init__(
        self,
        make_worker: WorkerFactory,
        *,
        workers: int,
        threads: int = 1,
        address: str | None = None,
        attempts: int = RAY_ATTEMPTS,
        describe: Callable[[Any], str] = lambda job: f"job {job.index}",
    ) -> None:
        if attempts < 1:
            raise InvalidConfigError(f"attempts must be at least 1, got {attempts}")
        if workers < 1:
            raise InvalidConfigError(f"the Ray executor needs at least 1 worker, got {workers}")
        ray = join_ray(address)
        self._ray = ray
        self._threads = threads
        largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
        if self._threads > largest:
            raise InvalidConfigError(
                f"each Ray actor reserves threads={self._threads} CPUs, but the largest node of the "
                f"cluster has {largest:g}; lower threads or add a larger node"
            )
        self._workers = workers
        self._attempts = attempts
        self._describe = describe
        self._make_worker = make_worker
        self._remote = ray.remote(num_cpus=self._threads, max_restarts=0, max_task_retries=0)(_RayWorker)
        self._actors: list[_Actor] = []
        self._running: dict[int, _Actor] = {}
        #: jobs started again on a new actor after losing theirs
        self.reruns = 0
        self._top_up()

    def _top_up(self) -> None:
        while len(self._actors) < self._workers:
            handle = self._remote.remote(self._make_worker, self._threads)
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

    def wait_ready(self) -> None:
        """Block until every actor has built its worker (so timings leave start-up out)."""
        for actor in list(self._actors):
            self._ray.get(actor.pid_ref)

    def pids(self) -> list[int | None]:
        """The process id of every actor (None while it is starting)."""
        return [self._pid(actor) for actor in list(self._actors)]

    def running(self) -> dict[int, int | None]:
        """Job index → process id of the actor running it, for the jobs started and not finished."""
        return {index: self._pid(actor) for index, actor in list(self._running.items())}

    def map(self, jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        lost = (
            ray.exceptions.RayActorError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.OutOfMemoryError,
        )
        self._top_up()
        queue: collections.deque[tuple[Any, int]] = collections.deque((job, 0) for job in jobs)
        idle = list(self._actors)
        in_flight: dict[Any, tuple[_Actor, Any, int]] = {}
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
                    if getattr(exc, "actor_init_failed", False):  # its worker cannot be built: would recur
                        raise KVPolicyError(f"a Ray actor could not build its workload: {exc}") from exc
                    if starts >= self._attempts:
                        raise KVPolicyError(
                            f"{self._describe(job)} lost its Ray actor {starts} times; "
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
