"""Shared configs and log readers for the evolution tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the real path, small: NAMM-BAM on a tiny random-weight Llama with kvpolicy's needle task
TINY_HF = {
    "model": "tiny:llama",
    # NAMM (stft → bam → threshold) running an eviction pass every 128 tokens so a short prompt sees several
    "policy": {"preset": "namm-bam", "every": 128, "extractor": {"period": 128}},
    "optimizer": {"name": "cma_es", "config": {"popsize": 4, "diagonal": True}},
    "stages": [{"tasks": ["needle"], "generations": 2, "items": 1, "length": 256}],
    "eval_items": 1,
    "calibration_items": 1,
    "members_per_job": 3,
    "fitness": {"metric": "loglik", "cache_weight": 0.5},
    "seed": 0,
    # one torch thread: on a busy shared CPU, OpenMP threads spinning against each other cost ~5x
    "executor": {"kind": "inprocess", "threads": 1},
    "progress": False,
}


def quadratic_data(**overrides: Any) -> dict[str, Any]:
    data = {
        "workload": "quadratic",
        "policy": {"dim": 6},
        "optimizer": {"name": "cma_es", "config": {"popsize": 8, "sigma0": 0.2}},
        "stages": [{"tasks": ["a"], "generations": 3, "items": 2}, {"tasks": ["a", "b"], "generations": 3, "items": 2}],
        "eval_every": 2,
        "members_per_job": 3,
        "seed": 7,
        "progress": False,
    }
    data.update(overrides)
    return data


def generation_records(out: Path) -> list[dict[str, Any]]:
    """Log records without their wall-clock times (everything else must be reproducible)."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    for record in records:
        record.pop("seconds", None)
    return records
