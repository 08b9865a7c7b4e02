"""Per-item results and the resumable store that keeps them on disk.

Every finished item is appended to ``results.jsonl`` by rewriting the file atomically
(`kvpolicy.atomic`), so a run killed at any moment leaves a valid file and a rerun skips the
items already done. ``results.csv`` is the same table for spreadsheets.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from kvpolicy.atomic import atomic_write_text
from kvpolicy.errors import CheckpointError


@attrs.frozen
class ItemResult:
    """What one policy did on one item, measured.

    ``score`` is the task metric (or ``exp`` of the mean answer log-probability when scored by
    likelihood); ``answer_logprob`` is the mean teacher-forced log-probability per gold-answer
    token when measured (None otherwise). Cache figures come from the integration's
    `CacheReport`: ``kept_fraction`` is the mean over layers and KV heads of kept ÷ seen at the
    end of the item, ``per_layer_fraction`` the same per layer.
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
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    result = ItemResult.from_dict(json.loads(line))
                except (json.JSONDecodeError, TypeError) as exc:
                    raise CheckpointError(
                        f"{self.path}:{number} is not a result record ({exc}); delete the file to start over"
                    ) from exc
                self._results[result.uid] = result

    def done(self, uid: str, fingerprint: str) -> bool:
        result = self._results.get(uid)
        return result is not None and result.fingerprint == fingerprint

    def get(self, uid: str) -> ItemResult | None:
        return self._results.get(uid)

    def add(self, result: ItemResult) -> None:
        """Record one result and rewrite the file atomically."""
        self._results[result.uid] = result
        text = "".join(json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False) + "\n" for r in self)
        atomic_write_text(self.path, text)

    def __iter__(self) -> Iterator[ItemResult]:
        return iter(self._results.values())

    def __len__(self) -> int:
        return len(self._results)
