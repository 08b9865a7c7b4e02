"""``--executor ray`` on a real local Ray cluster (``ray.init(num_cpus=2)``), two actors each
holding the tiny Llama: the stores hold exactly the in-process results, a rerun computes
nothing, and a job whose actor process is SIGKILLed mid-job reruns on a new actor, so every
result is stored once.

Skipped where Ray is not installed (``pip install kvpolicy[ray]``)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from distributed_support import MODEL, in_process, line_count, runs_into, stored, suite

from kvpolicy.eval.distributed import evaluate_distributed, make_pool

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class _Killer(threading.Thread):
    """SIGKILLs the actor process of the first job seen running for ``after`` seconds, once."""

    def __init__(self, pool, after: float = 0.3, deadline: float = 900.0) -> None:
        # the deadline counts from before the actors have loaded their model: generous, so a busy
        # machine's slow start does not end the watch before any job runs
        super().__init__(daemon=True)
        self.pool, self.after, self.deadline = pool, after, deadline
        self.killed: tuple[int, int] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        first_seen: dict[int, float] = {}
        end = time.monotonic() + self.deadline
        while not self.stop.is_set() and time.monotonic() < end:
            now = time.monotonic()
            running = self.pool.running()
            for index, pid in running.items():
                first_seen.setdefault(index, now)
                if pid is not None and now - first_seen[index] >= self.after:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = (index, pid)
                    return
            for index in set(first_seen) - set(running):
                del first_seen[index]
            time.sleep(0.02)


def test_actors_store_the_in_process_results_and_a_killed_actor_loses_nothing(tmp_path):
    items = suite(length=1024)  # long enough for a job to be caught running
    in_process(tmp_path / "here", items)
    pool = make_pool("ray", MODEL, workers=2)
    out = tmp_path / "ray"
    kwargs = dict(model_name=MODEL, chunk_size=128, reference_dir=out / "ref", progress=False)
    killer = _Killer(pool)
    killer.start()
    try:
        assert evaluate_distributed(runs_into(out), items, pool, **kwargs) == len(items) * 3
    finally:
        killer.stop.set()
        killer.join()
    try:
        assert killer.killed is not None, "no job ran long enough to be killed mid-job"
        assert pool.reruns == 1  # the killed job, once, on a new actor
        assert line_count(out) == {"h2o@48": 4, "snapkv@25%": 4, "full": 4}  # every result once
        assert stored(out) == stored(tmp_path / "here")
        assert evaluate_distributed(runs_into(out), items, pool, **kwargs) == 0  # resumed: nothing to compute
        assert line_count(out) == {"h2o@48": 4, "snapkv@25%": 4, "full": 4}
    finally:
        pool.close()


def test_shared_prefill_jobs_on_actors_store_the_in_process_results(tmp_path):
    items = suite()
    in_process(tmp_path / "here", items, shared_prefill=True)
    pool = make_pool("ray", MODEL, workers=2)
    out = tmp_path / "ray"
    try:
        jobs = evaluate_distributed(runs_into(out), items, pool, model_name=MODEL, chunk_size=128,
                                    reference_dir=out / "ref", shared_prefill=True, progress=False)  # fmt: skip
    finally:
        pool.close()
    assert jobs == len(items)  # one job per item: its prefill serves both runs and the reference
    assert stored(out) == stored(tmp_path / "here")
