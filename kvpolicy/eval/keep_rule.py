"""The keep rule of a task, recomputed from committed validation runs.

A task is kept for a model only where, on validation items, the full cache scores at least
``FULL_MARGIN`` above chance and a no-context (closed-book) run at most ``CLOSED_MARGIN`` above
it: a task the model cannot do with a full cache cannot rank policies, and one it can answer
from its weights does not measure memory. The runs are ordinary ``kvpolicy eval --policy full``
folders (with and without ``--closed-book``); their ``summary.json`` names the model and their
``results.jsonl`` holds one record per item, so the table below is recomputed from the records:

``python -m kvpolicy.eval.keep_rule docs/task-validation``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import attrs

from kvpolicy.eval.paired import chance
from kvpolicy.eval.results import ResultStore

FULL_MARGIN = 0.25
CLOSED_MARGIN = 0.10


@attrs.frozen
class Cell:
    """One task × model × length: mean scores (0–1) and item counts of the two runs."""

    task: str
    model: str
    length: int
    full: float | None = None
    full_items: int = 0
    closed: float | None = None
    closed_items: int = 0

    @property
    def verdict(self) -> str:
        floor = chance(self.task)
        if self.full is None or self.closed is None:
            return "undecided (a run is missing)"
        if self.full < floor + FULL_MARGIN:
            return (
                f"no: full cache {100 * (self.full - floor):+.1f} points from chance (needs +{100 * FULL_MARGIN:.0f})"
            )
        if self.closed > floor + CLOSED_MARGIN:
            return f"no: closed-book {100 * (self.closed - floor):+.1f} points from chance (at most +{100 * CLOSED_MARGIN:.0f})"
        return "kept"


def cells(folders: Sequence[Path]) -> list[Cell]:
    """Every task × model × length of the run ``folders`` (each with summary.json and results.jsonl)."""
    found: dict[tuple[str, str, int], Cell] = {}
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        closed = bool(summary.get("closed_book", False))
        groups: dict[tuple[str, int], list[float]] = {}
        for result in ResultStore(folder / "results.jsonl"):
            groups.setdefault((result.task, result.length), []).append(result.score)
        for (task, length), scores in groups.items():
            key = (task, summary["model"], length)
            cell = found.get(key, Cell(task, summary["model"], length))
            mean = sum(scores) / len(scores)
            cell = (
                attrs.evolve(cell, closed=mean, closed_items=len(scores))
                if closed
                else attrs.evolve(cell, full=mean, full_items=len(scores))
            )
            found[key] = cell
    return [found[key] for key in sorted(found)]


def table(rows: Sequence[Cell]) -> str:
    def points(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    lines = [
        "| task | model | length | full cache (items) | closed-book (items) | chance | kept? |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for c in rows:
        lines.append(
            f"| {c.task} | {c.model} | {c.length} | {points(c.full)} ({c.full_items}) | "
            f"{points(c.closed)} ({c.closed_items}) | {100 * chance(c.task):.1f} | {c.verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpolicy.eval.keep_rule", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a folder of validation runs (each a `kvpolicy eval` output folder)")
    args = parser.parse_args(argv)
    folders = sorted(p.parent for p in Path(args.root).glob("*/summary.json"))
    print(table(cells(folders)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
