"""Per-item results and the resumable store that keeps them on disk.

Every finished item is appended to ``results.jsonl`` as one line, written in a single
``O_APPEND`` write under an exclusive lock and fsynced. Appending (rather than rewriting the file)
keeps each save O(1) over a 600-item run and lets several processes share one store, e.g. the
full-cache reference cache while two halves of a suite run in parallel: none overwrites the
other's results. A run killed mid-write leaves a torn line (cut anywhere, inside a multi-byte
character too), which the next open drops with a warning (that item is recomputed); a line that
is whole JSON but not a valid record (a field of the wrong type, a NaN score, a kept fraction
outside [0, 1]) is an error naming its line, since no run writes one.
``results.csv`` is the same table for spreadsheets.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from kvpolicy.errors import CheckpointError, InvalidConfigError
from kvpolicy.eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS

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
    depends on it: a resumed run recomputes a result chunked otherwise. ``protocol`` says whether
    eviction passes could see the question (`kvpolicy.eval.protocols`).
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
    #: when the question reached the cache (`kvpolicy.eval.protocols`); records made before
    #: protocols existed were all ``question-aware``
    protocol: str = DEFAULT_PROTOCOL
    #: sha256 (16 hex digits) of the item's context: items asking about one context share it, and
    #: paired intervals resample contexts, not items (``""``: a record made before it existed)
    context_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemResult:
        """A result from its `to_dict`, every field checked (`InvalidConfigError` naming it)."""
        if not isinstance(data, dict):
            raise InvalidConfigError(f"a result record is a JSON object, got {type(data).__name__}")
        names = {f.name for f in attrs.fields(cls)}
        required = {f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING}
        if unknown := sorted(set(data) - names):
            raise InvalidConfigError(f"unknown fields {unknown}")
        if missing := sorted(required - set(data)):
            raise InvalidConfigError(f"missing fields {missing}")
        for name, value in data.items():
            _check_field(name, value)
        return cls(**data)


_TEXT = ("uid", "fingerprint", "task", "split", "policy", "metric", "prediction", "chunks", "context_id")
_COUNTS = ("length", "seed", "prompt_tokens", "tokens_seen", "kv_bytes", "full_kv_bytes")
_FRACTION = ("kept_fraction",)
_SECONDS = ("policy_seconds", "seconds")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_field(name: str, value: Any) -> None:
    """Raise `InvalidConfigError` when ``value`` is not what a run writes for field ``name``."""
    ok = True
    if name in _TEXT:
        ok = isinstance(value, str)
    elif name in _COUNTS:
        ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 or name == "seed")
    elif name in _FRACTION:
        ok = _is_number(value) and 0.0 <= value <= 1.0
    elif name == "per_layer_fraction":
        ok = isinstance(value, list | tuple) and all(_is_number(v) and 0.0 <= v <= 1.0 for v in value)
    elif name in _SECONDS or name == "score":
        ok = _is_number(value) and value >= 0
    elif name == "protocol":
        ok = value in PROTOCOLS
    elif name == "answer_logprob":
        ok = value is None or (_is_number(value) and value <= 0)
    if not ok:
        raise InvalidConfigError(f"field {name!r} has the invalid value {value!r}")


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
    Given a ``protocol``, the store holds results of that protocol only: a record of the other
    (on disk, or added) is an error, so a resumed run never mixes the two.
    """

    def __init__(self, path: str | Path, protocol: str | None = None) -> None:
        self.path = Path(path)
        self.protocol = protocol
        self._results: dict[str, ItemResult] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        # under the lock, so a line another process is writing is never mistaken for a torn one
        with self._locked() as fd:
            lines = self.path.read_bytes().split(b"\n")
            torn = lines.pop()  # b"" when the file ends with a newline, as every complete write does
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    self._remember_line(line, number, last=False)
            if torn.strip():
                self._repair_tail(fd, torn, len(lines) + 1)

    def _remember_line(self, line: bytes, number: int, *, last: bool) -> bool:
        """Remember the record on ``line``; False (with a warning) when the line is torn."""
        try:
            data = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            where = "last line" if last else f"line {number}"
            warnings.warn(
                f"{self.path}: dropped a torn {where} (a run stopped while writing it); that item will be recomputed",
                stacklevel=5,
            )
            return False
        self._remember(self._parse(data, number))
        return True

    def _repair_tail(self, fd: int, torn: bytes, number: int) -> None:
        """End the file on a newline so the next append starts a line of its own: in place, under
        the lock the caller holds (a rename could swallow another process's append)."""
        if self._remember_line(torn, number, last=True):  # a whole record that only lacks its newline
            os.write(fd, b"\n")
        else:
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - len(torn))
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

    def _parse(self, data: Any, number: int) -> ItemResult:
        try:
            return ItemResult.from_dict(data)
        except (InvalidConfigError, TypeError) as exc:
            raise CheckpointError(
                f"{self.path}:{number} is not a valid result record ({exc}); delete that line or the file to start over"
            ) from exc

    def _remember(self, result: ItemResult) -> None:
        if self.protocol is not None and result.protocol != self.protocol:
            raise InvalidConfigError(
                f"{self.path} holds {result.protocol} results (item {result.uid}); this run is {self.protocol}. "
                "Results of the two protocols never share a file: write this run to another folder"
            )
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
        """Record one result: one locked, fsynced append of one line (checked first, so a file
        never holds a record its reader refuses)."""
        try:
            ItemResult.from_dict(result.to_dict() | {"per_layer_fraction": list(result.per_layer_fraction)})
        except InvalidConfigError as exc:
            raise InvalidConfigError(f"the result of item {result.uid!r} cannot be stored: {exc}") from exc
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
