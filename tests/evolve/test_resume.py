"""Kill-and-resume: interrupted between and inside generations (an exception raised by the event
hook, and a real SIGKILL of a subprocess), the run resumes to the bit-identical result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from evolve_support import generation_records, quadratic_data

from kvpolicy.errors import CheckpointError
from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.runner import Evolution


class Interrupted(Exception):
    pass


def stop_at(event: str, generation: int, job: int | None = None):
    def hook(name: str, info: dict) -> None:
        if name == event and info.get("generation") == generation and (job is None or info.get("job") == job):
            raise Interrupted(f"{event} @ {generation}")

    return hook


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = Evolution(EvolveConfig.from_dict(quadratic_data()), out).run()
    return result, generation_records(out)


def assert_same_run(result, records, expected) -> None:
    reference, reference_records = expected
    assert torch.equal(result.final_params, reference.final_params)
    assert torch.equal(result.best_params, reference.best_params)
    assert result.best_fitness == reference.best_fitness
    assert records == reference_records


@pytest.mark.parametrize(
    "event, generation, job",
    [
        ("calibrated", None, None),
        ("job_done", 2, 1),  # inside a generation: two of its jobs are done
        ("job_done", 3, 0),  # inside the first generation of stage 2
        ("generation_logged", 1, None),  # logged but not checkpointed
        ("checkpoint_saved", 2, None),  # between generations
        ("job_done", 6, 0),  # inside the final held-out evaluation
    ],
)
def test_interrupted_run_resumes_to_the_same_result(tmp_path, uninterrupted, event, generation, job):
    config = EvolveConfig.from_dict(quadratic_data())
    with pytest.raises(Interrupted):
        Evolution(config, tmp_path, on_event=stop_at(event, generation, job)).run()
    result = Evolution(config, tmp_path).run()
    assert_same_run(result, generation_records(tmp_path), uninterrupted)


def test_interrupted_twice_resumes_to_the_same_result(tmp_path, uninterrupted):
    config = EvolveConfig.from_dict(quadratic_data())
    for event, generation, job in [("job_done", 1, 2), ("job_done", 4, 1)]:
        with pytest.raises(Interrupted):
            Evolution(config, tmp_path, on_event=stop_at(event, generation, job)).run()
    assert_same_run(Evolution(config, tmp_path).run(), generation_records(tmp_path), uninterrupted)


def test_finished_run_is_not_rerun(tmp_path, uninterrupted):
    config = EvolveConfig.from_dict(quadratic_data())
    Evolution(config, tmp_path).run()
    seen = []
    again = Evolution(config, tmp_path, on_event=lambda name, info: seen.append(name)).run()
    assert seen == []
    assert_same_run(again, generation_records(tmp_path), uninterrupted)


KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    from kvpolicy.evolve.config import EvolveConfig
    from kvpolicy.evolve.runner import Evolution

    event, generation, job = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

    def hook(name, info):
        if name == event and info.get("generation") == generation and job in (-1, info.get("job")):
            os.kill(os.getpid(), signal.SIGKILL)

    config = EvolveConfig.from_dict(json.loads(open(sys.argv[1]).read()))
    Evolution(config, sys.argv[2], on_event=hook).run()
    """
)


def test_sigkill_inside_and_between_generations_then_cli_resumes(tmp_path, uninterrupted):
    config_path = tmp_path / "run.json"
    config_path.write_text(__import__("json").dumps(quadratic_data()))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for event, generation, job in [("job_done", 2, 1), ("generation_logged", 4, -1)]:
        proc = subprocess.run(
            [sys.executable, str(script), str(config_path), str(out), event, str(generation), str(job)],
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    done = subprocess.run(
        [sys.executable, "-m", "kvpolicy", "evolve", str(config_path), "--out", str(out), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "best mean" in done.stdout
    assert (out / "fitness.png").read_bytes()[:4] == b"\x89PNG"
    result = Evolution(EvolveConfig.from_dict(quadratic_data()), out).run()  # finished: just reads it back
    assert_same_run(result, generation_records(out), uninterrupted)


def _interrupt_after_first_generation(out: Path) -> None:
    config = EvolveConfig.from_dict(quadratic_data())
    with pytest.raises(Interrupted):
        Evolution(config, out, on_event=stop_at("job_done", 1, 1)).run()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    _interrupt_after_first_generation(tmp_path)
    checkpoint = tmp_path / "checkpoint.bin"
    data = bytearray(checkpoint.read_bytes())
    data[-10] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        Evolution(EvolveConfig.from_dict(quadratic_data()), tmp_path).run()


def test_truncated_partial_generation_is_a_clear_error(tmp_path):
    _interrupt_after_first_generation(tmp_path)
    partial = tmp_path / "partial.bin"
    partial.write_bytes(partial.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="corrupt"):
        Evolution(EvolveConfig.from_dict(quadratic_data()), tmp_path).run()


def test_foreign_file_is_a_clear_error(tmp_path):
    _interrupt_after_first_generation(tmp_path)
    (tmp_path / "checkpoint.bin").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="wrong header"):
        Evolution(EvolveConfig.from_dict(quadratic_data()), tmp_path).run()


def test_checkpoint_of_another_config_is_refused(tmp_path):
    _interrupt_after_first_generation(tmp_path)
    other = EvolveConfig.from_dict(quadratic_data(seed=8))
    with pytest.raises(CheckpointError, match="different config.*seed"):
        Evolution(other, tmp_path).run()
    # the executor is not part of the result, so changing it is allowed
    moved = EvolveConfig.from_dict(quadratic_data(executor={"kind": "inprocess", "workers": 3}))
    Evolution(moved, tmp_path).run()


def test_log_without_checkpoint_is_refused(tmp_path):
    _interrupt_after_first_generation(tmp_path)
    (tmp_path / "checkpoint.bin").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint.bin"):
        Evolution(EvolveConfig.from_dict(quadratic_data()), tmp_path).run()
