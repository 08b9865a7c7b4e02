"""Does a task leak its answer through the question? A lexical rule with no learning, as a diagnostic.

The rule reads the question and the answer prefix, as any eviction pass after the whole prompt
can (``question-aware``): every context word that also occurs in them, and at most
``max_count`` times in the context (a rare shared word is a cue, not filler), anchors a span of
``window`` words on each side; everything else is dropped. If those spans hold the gold answer
while keeping a small part of the context, the task can be solved by spotting the cue, and a
``question-aware`` table on it ranks cue-spotting, not memory. Under ``context-first`` the rule
has no question to read, which is the point of that protocol.

It works on the item's text (no model): what it reports is whether the kept words contain a gold
answer (each value of a list answer) and what share of the context's words it keeps — an upper bound on what a
policy keeping exactly those tokens could score, not a model's score.

``python -m kvpolicy.eval.leakage --tasks needle,multikey --lengths 4096 --seeds 16`` prints a
table per task (validation items unless ``--split`` says otherwise; no model is loaded).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Sequence

import attrs

from kvpolicy.eval.items import Item

_WORD = re.compile(r"[A-Za-z0-9_]+")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


@attrs.frozen
class LexicalKeep:
    """What the rule keeps of one item: the share of context words, and whether a gold answer survives."""

    kept_fraction: float
    answer_kept: bool


def _holds(kept_text: str, answer: str) -> bool:
    """Every part of ``answer`` (a list answer's comma-separated values each) among the kept words, in order."""
    parts = [words(part) for part in answer.split(",")]
    return any(parts) and all(f" {' '.join(p)} " in kept_text for p in parts if p)


def lexical_keep(item: Item, window: int = 24, max_count: int = 2) -> LexicalKeep:
    """The rule on ``item`` (see the module docstring)."""
    context = words(item.context)
    if not context:
        return LexicalKeep(0.0, False)
    cues = set(words(item.question + " " + item.answer_prefix))
    counts = Counter(context)
    keep = [False] * len(context)
    for i, word in enumerate(context):
        if word in cues and counts[word] <= max_count:
            for j in range(max(0, i - window), min(len(context), i + window + 1)):
                keep[j] = True
    kept = [w for w, k in zip(context, keep, strict=True) if k]
    kept_text = " " + " ".join(kept) + " "
    answer_kept = any(_holds(kept_text, answer) for answer in item.answers)
    return LexicalKeep(sum(keep) / len(context), answer_kept)


def leakage_table(items: Sequence[Item], window: int = 24, max_count: int = 2) -> str:
    """Markdown: per task, items whose gold answer the rule keeps and the context share it keeps."""
    by_task: dict[str, list[LexicalKeep]] = {}
    for item in items:
        by_task.setdefault(item.task, []).append(lexical_keep(item, window, max_count))
    lines = ["| task | items | answer kept | context kept (mean) |", "|---|---:|---:|---:|"]
    for task, kept in by_task.items():
        answers = sum(k.answer_kept for k in kept)
        mean = sum(k.kept_fraction for k in kept) / len(kept)
        lines.append(f"| {task} | {len(kept)} | {answers}/{len(kept)} | {100 * mean:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from kvpolicy.eval.tasks import TASKS, build_suite

    parser = argparse.ArgumentParser(prog="python -m kvpolicy.eval.leakage", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: all)")
    parser.add_argument("--lengths", default="4096", help="comma-separated context lengths (default 4096)")
    parser.add_argument("--seeds", type=int, default=16, help="items per task and length (default 16)")
    parser.add_argument("--split", default="validation", choices=("validation", "train", "test"))
    parser.add_argument("--window", type=int, default=24, help="words kept on each side of a cue (default 24)")
    args = parser.parse_args(argv)
    split, first = ("train", 1000) if args.split == "validation" else (args.split, 0)
    items = build_suite(
        [t for t in args.tasks.split(",") if t],
        split,
        [int(n) for n in args.lengths.split(",")],
        range(first, first + args.seeds),
    )
    print(leakage_table(items, args.window))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
