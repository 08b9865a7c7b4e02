"""The Ray executor on a real local Ray cluster (``ray.init(num_cpus=2)``) with the real workload
(a tiny random-weight Llama on kvpolicy's needle task): a free actor takes the next job, a job
whose actor process is SIGKILLed mid-job is rerun on a new actor and the run ends bit-identical
to the in-process one, and errors that would recur are raised, not retried.

Skipped where Ray is not installed (``pip install kvpolicy[ray]``)."""

from __future__ import annotations

import os
import signal
import threading
import time

import attrs
import pytest
import torch
from evolve_support import TINY_HF, generation_records, quadratic_data

from kvpolicy.errors import KVPolicyError
from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.executors import RayExecutor
from kvpolicy.evolve.jobs import Job
from kvpolicy.evolve.runner import Evolution

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _ray_config(data: dict) -> EvolveConfig:
    config = EvolveConfig.from_dict(data)
    return attrs.evolve(config, executor=attrs.evolve(config.executor, kind="ray", workers=2, threads=1))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _reference_job(index: int, length: int) -> Job:
    """The full-cache score of one needle item: its cost grows with ``length``."""
    return Job(index, "evaluate", "needle", "train", length, (index,))


def test_a_free_actor_takes_the_next_job():
    executor = RayExecutor(_ray_config(TINY_HF))
    try:
        # both actors build their workload (model, texts) before the timed part
        assert sorted(index for index, _ in executor.map([_reference_job(10, 256), _reference_job(11, 256)])) == [
            10,
            11,
        ]
        # one job ~10x the cost of each of the others: while one actor runs it, the other runs all
        # the cheap ones (a fixed round-robin would queue two of them behind the slow job)
        jobs = [_reference_job(0, 2048)] + [_reference_job(i, 256) for i in range(1, 5)]
        order = [index for index, _ in executor.map(jobs)]
        assert order[-1] == 0 and sorted(order[:4]) == [1, 2, 3, 4]
        assert executor.reruns == 0
    finally:
        executor.close()


class _Killer(threading.Thread):
    """SIGKILLs the actor process of the first job seen running for ``after`` seconds, once."""

    def __init__(self, executor: RayExecutor, after: float = 0.5, deadline: float = 300.0) -> None:
        super().__init__(daemon=True)
        self.executor, self.after, self.deadline = executor, after, deadline
        self.killed: tuple[int, int] | None = None  # (job index, pid)
        self.stop = threading.Event()

    def run(self) -> None:
        first_seen: dict[int, float] = {}
        end = time.monotonic() + self.deadline
        while not self.stop.is_set() and time.monotonic() < end:
            now = time.monotonic()
            running = self.executor.running()
            for index, pid in running.items():
                first_seen.setdefault(index, now)
                if pid is not None and now - first_seen[index] >= self.after:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = (index, pid)
                    return
            for index in set(first_seen) - set(running):
                del first_seen[index]
            time.sleep(0.05)


def test_a_job_whose_actor_is_killed_reruns_and_the_run_is_bit_identical(tiny_inprocess_run, tmp_path):
    reference, reference_out = tiny_inprocess_run

    config = _ray_config(TINY_HF)
    executor = RayExecutor(config)
    killer = _Killer(executor)
    killer.start()
    try:
        result = Evolution(config, tmp_path, executor=executor).run()
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no job ran long enough to be killed mid-job"
    job, pid = killer.killed
    assert executor.reruns == 1  # the killed job, once, on a new actor
    assert not _alive(pid)
    assert torch.equal(result.final_params, reference.final_params)
    assert torch.equal(result.best_params, reference.best_params)
    assert generation_records(tmp_path) == generation_records(reference_out)


def test_an_error_raised_by_a_job_is_not_retried():
    executor = RayExecutor(_ray_config(quadratic_data()))
    try:
        wrong_width = torch.zeros(2, 5, dtype=torch.float64)  # the workload searches 6 parameters
        with pytest.raises(RuntimeError, match="size of tensor"):
            list(executor.map([Job(0, "evaluate", "a", "train", 256, (0, 1), params=wrong_width)]))
        assert executor.reruns == 0
        # the actor survived its job's exception and runs the next one
        good = torch.zeros(2, 6, dtype=torch.float64)
        ((index, result),) = list(executor.map([Job(1, "evaluate", "a", "train", 256, (0,), params=good)]))
        assert index == 1 and result.scores.shape == (2, 1)
    finally:
        executor.close()


def test_an_actor_that_cannot_build_its_workload_is_reported_once():
    executor = RayExecutor(_ray_config(quadratic_data(policy={"dim": 1})))
    try:
        with pytest.raises(KVPolicyError, match=r"(?s)could not build its workload.*n >= 2"):
            list(executor.map([Job(0, "evaluate", "a", "train", 256, (0,), params=torch.zeros(1, 1))]))
        assert executor.reruns == 0
    finally:
        executor.close()


def test_threads_beyond_any_node_are_refused():
    config = _ray_config(quadratic_data())
    config = attrs.evolve(config, executor=attrs.evolve(config.executor, threads=64))
    with pytest.raises(KVPolicyError, match="largest node of the cluster has 2"):
        RayExecutor(config)
