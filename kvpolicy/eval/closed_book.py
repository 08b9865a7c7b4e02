"""Closed-book items: the same question with no context, to measure what the weights already know.

A task is only informative about memory if the model cannot answer without the context: the
keep rule of the task suite (docs/tasks.md) asks that a closed-book run stays within 10 points of
chance. `closed_book` blanks the context and keeps everything else, so the closed-book item is
scored exactly like the original. Its uid is unchanged; runs keep closed-book results apart by
their own output and reference folders (``kvpolicy eval --closed-book``).
"""

from __future__ import annotations

import attrs

from kvpolicy.eval.items import Item

#: suffix of the label of a closed-book run, so its results never pass for an ordinary run's
CLOSED_BOOK_SUFFIX = "+closed-book"


def closed_book(item: Item) -> Item:
    """``item`` with an empty context (question, answer prefix, answers and metric unchanged)."""
    return attrs.evolve(item, context="")


def closed_book_label(label: str) -> str:
    return label if label.endswith(CLOSED_BOOK_SUFFIX) else label + CLOSED_BOOK_SUFFIX
