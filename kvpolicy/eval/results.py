"""Per-item results and the resumable store that keeps them on disk.

Every finished item is appended to ``results.jsonl`` as one line, written in a single
``O_APPEND`` write under an exclusive lock and fsynced. Appending (rather than rewriting the file)
keeps each save O(1) over a 600-item run and lets several processes share one store, e.g. the
full-cache reference cache while two halves of a suite run in parallel: none overwrites the
other's results. A run killed mid-write leaves at most a torn last line, which the next open
drops (that item is recomputed); a corrupt line anywhere else is an error naming it.
``results.csv`` is the same table for spreadsheets.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from kvpolicy.errors import CheckpointError

try:  # POSIX; elsewhere appends rely on O_APPEND alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@attrs.frozen
class ItemResult:
    """What one policy did on one item, measured.

    ``score`` is the task metric (or ``exp`` of the mean answer log-probability when scored by
    likelihood); ``answer_logprob`` is the mean teacher-forced log-probability per gold-answer
    token when measured (None otherwise). Cache figures come from the integration's
    `CacheReport`: ``kept_fraction`` is the mean over layers and KV heads of kept ÷ seen at the
    end of the item, ``per_layer_fraction`` the same per layer. ``chunks`` says how the
    prompt was chunked (``start``; ``end`` in a left-padded batch), since eviction between chunks
    depends on it: a resumed run recomputes a result chunked otherwise.
    """

    uid: str
    fingerprint: str
    task: str
    split: str
    length: int
    seed: int
    policy: str
    metric: str
    score: float
    prediction: str
    answer_logprob: float | None
    prompt_tokens: int
    tokens_seen: int
    kept_fraction: float
    per_layer_fraction: tuple[float, ...] = attrs.field(converter=tuple)
    kv_bytes: int
    full_kv_bytes: int
    policy_seconds: float
    seconds: float
    #: where the prompt's prefill chunks were aligned (`kvpolicy.eval.harness.CHUNK_ALIGNMENTS`)
    chunks: str = "start"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemResult:
        return cls(**data)


CSV_FIELDS = [f.name for f in attrs.fields(ItemResult) if f.name != "per_layer_fraction"]


def to_csv(results: Iterable[ItemResult], references: Mapping[str, ItemResult] | None = None) -> str:
    """CSV of results with the full-cache score of each item and the score normalised by it;
    the per-layer fractions go in one ``;``-separated column."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_FIELDS, "reference_score", "normalised_score", "per_layer_fraction"])
    for result in results:
        row = result.to_dict()
        reference = (references or {}).get(result.uid)
        ref_score = reference.score if reference is not None else ""
        normalised = result.score / reference.score if reference is not None and reference.score > 0 else ""
        layers = ";".join(f"{x:.4f}" for x in result.per_layer_fraction)
        writer.writerow([*(row[f] for f in CSV_FIELDS), ref_score, normalised, layers])
    return buffer.getvalue()


class ResultStore:
    """Results of one run in ``path`` (JSONL), keyed by item uid and fingerprint.

    A result whose fingerprint differs from the item now generated under the same uid (the
    generator changed) is not counted as done, so stale results are recomputed, never reused.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._results: dict[str, ItemResult] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        # under the lock, so a line another process is writing is never mistaken for a torn one
        with self._locked() as fd:
            text = self.path.read_text(encoding="utf-8")
            lines = text.split("\n")
            torn = lines.pop()  # "" when the file ends with a newline, as every complete write does
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    self._remember(self._parse(line, number))
            if torn.strip():
                self._repair_tail(fd, torn, len(lines) + 1)

    def _repair_tail(self, fd: int, torn: str, number: int) -> None:
        """End the file on a newline so the next append starts a line of its own: in place, under
        the lock the caller holds (a rename could swallow another process's append)."""
        try:
            self._remember(self._parse(torn, number))
            complete = True  # a whole record that only lacks its newline
        except CheckpointError:
            complete = False
            warnings.warn(
                f"{self.path}: dropped a torn last line (a run stopped while writing it); that item will be recomputed",
                stacklevel=4,
            )
        if complete:
            os.write(fd, b"\n")
        else:
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - len(torn.encode("utf-8")))
        os.fsync(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """An append-mode descriptor of the file, held under an exclusive lock where there is one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # closing releases the lock

    def _parse(self, line: str, number: int) -> ItemResult:
        try:
            return ItemResult.from_dict(json.loads(line))
        except (json.JSONDecodeError, TypeError) as exc:
            raise CheckpointError(
                f"{self.path}:{number} is not a result record ({exc}); delete the file to start over"
            ) from exc

    def _remember(self, result: ItemResult) -> None:
        self._results[result.uid] = result

    def done(self, uid: str, fingerprint: str) -> bool:
        result = self._results.get(uid)
        return result is not None and result.fingerprint == fingerprint

    def get(self, uid: str) -> ItemResult | None:
        return self._results.get(uid)

    def finished(self, item: Any) -> ItemResult | None:
        """The stored result of ``item`` (anything with ``uid`` and ``fingerprint``) if it is
        done for the item as generated now, else None: the harness's ``done`` callback."""
        return self.get(item.uid) if self.done(item.uid, item.fingerprint) else None

    def add(self, result: ItemResult) -> None:
        """Record one result: one locked, fsynced append of one line."""
        self._remember(result)
        line = (json.dumps(result.to_dict(), sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        with self._locked() as fd:
            while line:
                line = line[os.write(fd, line) :]
            os.fsync(fd)

    def __iter__(self) -> Iterator[ItemResult]:
        return iter(self._results.values())

    def __len__(self) -> int:
        return len(self._results)
