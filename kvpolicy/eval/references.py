"""Full-cache reference results, computed once per (model, metric mode, chunk size) and cached.

Every policy score is also reported normalised by the full-cache score on the same items, as
NAMM reports LongBench (Cetin et al. 2024). The reference is the ``full`` preset run through the
same harness, so both sides are measured identically. Results are cached as JSONL in a user
cache directory (``$KVPOLICY_EVAL_CACHE`` or ``~/.cache/kvpolicy/eval``), keyed by item fingerprint, so
they are never recomputed for an unchanged item and always recomputed for a changed one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kvpolicy
from kvpolicy.eval.harness import DEFAULT_CHUNK, Metric, evaluate
from kvpolicy.eval.items import Item
from kvpolicy.eval.protocols import DEFAULT_PROTOCOL, EvalProtocol
from kvpolicy.eval.results import ItemResult, ResultStore
from kvpolicy.eval.rows import ContextRows


def cache_dir() -> Path:
    """Where references are cached: ``$KVPOLICY_EVAL_CACHE`` or ``~/.cache/kvpolicy/eval``."""
    return Path(os.environ.get("KVPOLICY_EVAL_CACHE") or Path.home() / ".cache" / "kvpolicy" / "eval")


def reference_path(
    model_name: str,
    metric: Metric,
    chunk_size: int,
    directory: str | Path | None = None,
    protocol: EvalProtocol = DEFAULT_PROTOCOL,
) -> Path:
    """One file per (model, metric mode, chunk size, protocol): a full cache fed context first
    differs from one fed as one prompt only by the rounding of other forward calls, but results of
    the two protocols never share a file."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)
    suffix = "" if protocol == DEFAULT_PROTOCOL else f"-{protocol}"
    return Path(directory or cache_dir()) / f"reference-{safe}-{metric}-chunk{chunk_size}{suffix}.jsonl"


def reference_results(
    items: Sequence[Item],
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    metric: Metric = "task",
    chunk_size: int = DEFAULT_CHUNK,
    directory: str | Path | None = None,
    progress: bool | str = False,
    protocol: EvalProtocol = DEFAULT_PROTOCOL,
) -> dict[str, ItemResult]:
    """Full-cache results for ``items`` by uid, computing only those not cached yet (under
    ``context-first``, the questions of one context from one prefill of it: `ContextRows`)."""
    store = ResultStore(reference_path(model_name, metric, chunk_size, directory, protocol), protocol)
    results = evaluate(
        kvpolicy.build("full"),
        items,
        model,
        tokenizer,
        metric=metric,
        chunk_size=chunk_size,
        done=store.finished,
        on_result=store.add,
        progress="full cache" if progress is True else progress,
        label="full",
        protocol=protocol,
        rows=ContextRows() if protocol == "context-first" else None,
    )
    return {r.uid: r for r in results}
