"""The run log: one JSON object per line, appended after every generation.

Records have a ``type``: ``calibration``, ``generation`` (fitness of every member and of the
mean, σ, measured cache size, time, held-out score when evaluated) and ``final``. On resume the
log is cut back to the generations the checkpoint holds, so a generation redone after a kill
appears once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kvpolicy.atomic import atomic_write_text
from kvpolicy.errors import CheckpointError


def append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read(path: Path) -> list[dict[str, Any]]:
    """Every complete record; a torn last line (the process died while writing it) is skipped."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise CheckpointError(f"{path} line {number} is not JSON ({exc}); the log is corrupt") from exc
    return records


def truncate(path: Path, next_generation: int, calibrated: bool, finished: bool = False) -> None:
    """Keep only what the checkpoint holds: calibration (if done), generations before
    ``next_generation`` and the final record (if the run finished)."""
    if not path.exists():
        return
    kept = [
        r
        for r in read(path)
        if (r.get("type") == "calibration" and calibrated)
        or (r.get("type") == "generation" and r.get("generation", next_generation) < next_generation)
        or (r.get("type") == "final" and finished)
    ]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
