"""The evolution checkpoint: everything needed to continue a run exactly where it stopped.

One file, written atomically after every generation (write beside, fsync, rename), holding the
optimizer's whole state (RNG included), the calibrated buffers, the best mean so far and the
next generation to run. A second file records the jobs already finished inside the generation
in progress, so a run killed mid-generation redoes only the jobs that were in flight.

Both files start with a magic line and the sha256 of their payload: a truncated, corrupt or
foreign file raises `CheckpointError` instead of silently starting over, and so does a
checkpoint written for a different config. The payload is a pickle: load only checkpoints you
wrote yourself.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import attrs
import torch

from kvpolicy.atomic import atomic_write_bytes
from kvpolicy.errors import CheckpointError

#: the first line of each file says plainly what it is: local resume state, never a file to share
CHECKPOINT_MAGIC = b"KVPOLICY-EVOLVE-CHECKPOINT/1 local resume state of one run (a pickle); share result.safetensors\n"
PARTIAL_MAGIC = b"KVPOLICY-EVOLVE-PARTIAL/1 local resume state of one run (a pickle); share result.safetensors\n"
#: headers of earlier versions, still read
_LEGACY = {CHECKPOINT_MAGIC: b"KVPOLICY-EVOLVE-CHECKPOINT/1\n", PARTIAL_MAGIC: b"KVPOLICY-EVOLVE-PARTIAL/1\n"}


@attrs.define(eq=False)
class RunState:
    """Where a run stands between two generations."""

    fingerprint: str
    config: dict[str, Any]
    optimizer: str
    optimizer_state: dict[str, Any]
    next_generation: int = 0
    buffers: dict[str, torch.Tensor] = attrs.field(factory=dict)
    calibrated: bool = False
    best_fitness: float | None = None
    best_generation: int | None = None
    best_params: torch.Tensor | None = None
    stop_reason: str | None = None
    finished: bool = False


@attrs.define(eq=False)
class PartialGeneration:
    """Jobs of generation ``generation`` already finished, for the population hashed ``population_sha``."""

    fingerprint: str
    generation: int
    population_sha: str
    results: dict[int, Any] = attrs.field(factory=dict)


def population_sha(population: torch.Tensor) -> str:
    return hashlib.sha256(population.double().contiguous().numpy().tobytes()).hexdigest()


def _write(path: Path, magic: bytes, payload: object) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write_bytes(path, magic + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


def _read(path: Path, magic: bytes, what: str) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    header = next((m for m in (magic, _LEGACY[magic]) if raw.startswith(m)), None)
    if header is None:
        raise CheckpointError(
            f"{path} is not a kvpolicy {what} (wrong header); move it away or use a new output folder"
        )
    digest, _, data = raw[len(header) :].partition(b"\n")
    if hashlib.sha256(data).hexdigest().encode() != digest:
        raise CheckpointError(
            f"the {what} {path} is corrupt (its checksum does not match; truncated or overwritten). "
            "Restore it from a backup or start a new run in another output folder"
        )
    try:
        return pickle.loads(data)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as exc:
        raise CheckpointError(f"the {what} {path} cannot be unpickled here: {exc}") from exc


def save_state(path: Path, state: RunState) -> None:
    _write(path, CHECKPOINT_MAGIC, attrs.asdict(state, recurse=False))


def load_state(path: Path, fingerprint: str, config: dict[str, Any]) -> RunState:
    """The checkpoint at ``path``; `CheckpointError` if it is unreadable or from another config."""
    data = _read(path, CHECKPOINT_MAGIC, "evolution checkpoint")
    try:
        state = RunState(**data)
    except TypeError as exc:
        raise CheckpointError(f"{path} does not hold an evolution run state: {exc}") from exc
    if state.fingerprint != fingerprint:
        differ = sorted(k for k in set(config) | set(state.config) if config.get(k) != state.config.get(k))
        raise CheckpointError(
            f"{path} was written by a run with a different config (fields that differ: {', '.join(differ) or '?'}). "
            "Resume with the config it was started with, or use a new output folder for the new config"
        )
    return state


def save_partial(path: Path, partial: PartialGeneration) -> None:
    _write(path, PARTIAL_MAGIC, attrs.asdict(partial, recurse=False))


def load_partial(path: Path) -> PartialGeneration:
    data = _read(path, PARTIAL_MAGIC, "partial-generation record")
    try:
        return PartialGeneration(**data)
    except TypeError as exc:
        raise CheckpointError(f"{path} does not hold a partial-generation record: {exc}") from exc
