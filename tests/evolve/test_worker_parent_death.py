"""Process-pool workers die with their parent: a real parent process starts a real pool, one
worker idle on the job queue and one busy in a job, and is SIGKILLed (no cleanup runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from evolve_support import quadratic_data

PARENT = textwrap.dedent(
    """
    import json, os, sys, time
    from kvpolicy.evolve.config import EvolveConfig
    from kvpolicy.evolve.executors import ProcessPoolExecutor

    if __name__ == "__main__":
        executor = ProcessPoolExecutor(EvolveConfig.from_dict(json.loads(sys.argv[1])))
        pool = executor._pool
        for future in [pool.submit(os.getpid) for _ in range(4)]:
            future.result()  # every worker has run its initializer
        pool.submit(time.sleep, 600)  # one worker stays busy in a job
        print(json.dumps(sorted(pool._processes)), flush=True)
        time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back on signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_workers_exit_when_the_parent_is_sigkilled(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    config = quadratic_data(executor={"kind": "process", "workers": 2, "threads": 1})
    parent = subprocess.Popen(
        [sys.executable, str(script), json.dumps(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    workers: list[int] = []
    try:
        line = parent.stdout.readline()
        assert line, parent.stderr.read()[-2000:]
        workers = json.loads(line)
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        os.kill(parent.pid, signal.SIGKILL)
        assert parent.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), f"workers {workers} outlived their SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in workers:  # only the workers this test started, by pid
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
