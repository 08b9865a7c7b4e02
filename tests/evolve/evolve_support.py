"""Shared configs and log readers for the evolution tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
