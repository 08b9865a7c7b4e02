"""Split-aware source text for the tasks: essays and Bible verses divided into disjoint halves.

Essays (sorted by title) alternate between ``train`` and ``test``; the Old Testament is
``train`` and the New Testament ``test``. Every random choice comes from `rng_for`, seeded with
a string of task, split and seed, so generation is reproducible across runs and machines.
"""

from __future__ import annotations

import functools
import random

from kvpolicy import data
from kvpolicy.eval.items import Split, check_split

#: characters per SmolLM2 token, measured on the essays (4.18) and the KJV (4.08); contexts are
#: sized in characters so item generation needs no tokenizer (the harness records true counts).
CHARS_PER_TOKEN = 4.0
_FIRST_NEW_TESTAMENT_BOOK = "The Gospel According to Saint Matthew"


def rng_for(task: str, split: Split, seed: int, length: int) -> random.Random:
    """A generator private to one item (string seeds are hashed deterministically)."""
    return random.Random(f"kvpolicy-eval|{task}|{split}|{length}|{seed}")


@functools.cache
def essay_sentences(split: Split) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(title, sentences)`` of the essays in ``split`` (even positions train, odd test)."""
    check_split(split)
    parity = 0 if split == "train" else 1
    return tuple(
        (title, tuple(data.sentences(text))) for i, (title, text) in enumerate(data.essays()) if i % 2 == parity
    )


@functools.cache
def bible_verses(split: Split) -> tuple[tuple[str, str], ...]:
    """``(reference, text)`` of the Old (train) or New (test) Testament, in order."""
    check_split(split)
    verses = data.bible_verses()
    start = next(i for i, (ref, _) in enumerate(verses) if ref.startswith(_FIRST_NEW_TESTAMENT_BOOK))
    return verses[:start] if split == "train" else verses[start:]


def book_of(reference: str) -> str:
    return reference.rsplit(" ", 1)[0]


def essay_run(rng: random.Random, split: Split, chars: int) -> tuple[list[str], list[str]]:
    """Consecutive sentences (``sentences, essay titles``) totalling about ``chars`` characters,
    starting at a random sentence of a random essay and continuing into the next essays."""
    pool = essay_sentences(split)
    essay = rng.randrange(len(pool))
    start = rng.randrange(len(pool[essay][1]))
    out: list[str] = []
    titles: list[str] = []
    total = 0
    while total < chars:
        title, sents = pool[essay]
        if title not in titles:
            titles.append(title)
        for sentence in sents[start:]:
            out.append(sentence)
            total += len(sentence) + 1
            if total >= chars:
                break
        essay, start = (essay + 1) % len(pool), 0
    return out, titles


def insert_at_depths(sentences: list[str], inserts: list[tuple[float, str]]) -> list[str]:
    """Insert each ``(depth, sentence)`` between sentences at fraction ``depth`` of the text."""
    out = list(sentences)
    for depth, sentence in sorted(inserts, key=lambda pair: -pair[0]):
        out.insert(round(depth * len(sentences)), sentence)
    return out


def spread_depths(rng: random.Random, count: int) -> list[float]:
    """``count`` depths in (0.05, 0.95), one per equal slice, so needles never bunch up."""
    width = 0.9 / count
    return [0.05 + width * (i + rng.random()) for i in range(count)]


def tokens_to_chars(tokens: int) -> int:
    return int(tokens * CHARS_PER_TOKEN)
