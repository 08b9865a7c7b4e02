"""Genealogy questions on counterfactually renamed KJV text: facts of the text, not planted needles.

The context is a run of consecutive KJV verses around a verse of a genealogy chapter ("And
Arphaxad lived five and thirty years, and begat Salah", "And Hezron begat Ram"), placed at a
random depth; the question asks "Who was the father of Y?" for a ``begat`` fact of that verse
(one whose son is named as a son only once in the context). The answer is an ordinary phrase of
the text, found by its meaning, not by a marked sentence.

Every model has read the KJV, so every person who appears in a ``begat`` fact of the context is
renamed, consistently over the whole context, to an invented name that is no word of the KJV
("Salah" → "Trivek"): the answer cannot come from memory (closed-book ≈ 0) and a guess among
the renamed people (~20–60 of them) is right a few times in a hundred (``CHANCE``).

Split (the usual Old/New Testament split does not work: the genealogies are in the Old
Testament): ``train`` asks about Genesis 4, 5, 10, 11, 25 with context drawn from Genesis only;
``test`` asks about 1 Chronicles 2–9 with context drawn from 1 Chronicles 2 to the end of
2 Chronicles (1 Chronicles 1 repeats Genesis 10–11 and is left out). Invented names end in
split-specific syllables, so no answer of one split is ever an answer of the other.
"""

from __future__ import annotations

import functools
import random
import re

from kvpolicy import data
from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.sources import rng_for, tokens_to_chars

NAME = "genealogy"
GENESIS = "The First Book of Moses, called Genesis"
CHRONICLES_1 = "The First Book of the Chronicles"
CHRONICLES_2 = "The Second Book of the Chronicles"
#: split → (books the context is drawn from, first chapter of the first book, target chapters)
SPLIT_MATERIAL: dict[Split, tuple[tuple[str, ...], int, tuple[int, ...]]] = {
    "train": ((GENESIS,), 1, (4, 5, 10, 11, 25)),
    "test": ((CHRONICLES_1, CHRONICLES_2), 2, (2, 4, 6, 8, 9)),
}
#: "X begat Y" and "X lived … years, and begat Y"
BEGAT = re.compile(r"\b([A-Z][a-z]+),? (?:lived [^.;:]*?, and )?begat ([A-Z][a-z]+)")
_NOT_NAMES = frozenset({"And", "The", "He", "Also", "Then", "Now", "These", "Which", "Who", "But", "Of"})
_ONSETS = ("B", "D", "G", "K", "L", "M", "N", "P", "R", "S", "T", "V", "Z", "Br", "Dr", "Gr", "Kr", "Tr", "Th", "St")
_VOWELS = ("a", "e", "i", "o", "u")
_MIDDLES = ("l", "n", "r", "m", "v", "d", "s", "rv", "nd", "lt")
_ENDINGS: dict[Split, tuple[str, ...]] = {
    "train": ("an", "ek", "or", "ulf", "is"),
    "test": ("ax", "em", "od", "yr", "unt"),
}
CHANCE = 0.02
ANSWER_PREFIX = "His father was"


def _chapter(reference: str) -> int:
    return int(reference.rsplit(" ", 1)[1].split(":", 1)[0])


def _book(reference: str) -> str:
    return reference.rsplit(" ", 1)[0]


@functools.cache
def _verses(split: Split) -> tuple[tuple[str, str], ...]:
    """The split's verses in order, as ``(reference, text)``."""
    books, first_chapter, _ = SPLIT_MATERIAL[split]
    verses = tuple(
        (ref, text)
        for ref, text in data.bible_verses()
        if _book(ref) in books and (_book(ref) != books[0] or _chapter(ref) >= first_chapter)
    )
    if not verses:
        raise InvalidConfigError(f"the KJV data has none of {', '.join(books)}")
    return verses


@functools.cache
def _kjv_words() -> frozenset[str]:
    return frozenset(word for _, text in data.bible_verses() for word in re.findall(r"[A-Za-z]+", text))


@functools.cache
def invented_names(split: Split) -> tuple[str, ...]:
    """Every invented name of ``split``: onset + vowel + middle + split-specific ending, minus KJV words."""
    kjv = _kjv_words()
    return tuple(
        name
        for name in (o + v + m + e for o in _ONSETS for v in _VOWELS for m in _MIDDLES for e in _ENDINGS[split])
        if name not in kjv and name.lower() not in kjv
    )


def _facts(text: str) -> list[tuple[str, str]]:
    return [(f, s) for f, s in BEGAT.findall(text) if f not in _NOT_NAMES and s not in _NOT_NAMES and f != s]


def _window(rng: random.Random, split: Split, verse: int, chars: int) -> list[tuple[str, str]]:
    """Consecutive verses of about ``chars`` characters with verse number ``verse`` at a random depth."""
    verses = _verses(split)
    before = int(rng.random() * chars)
    start = verse
    while start > 0 and before > len(verses[start - 1][1]):
        start -= 1
        before -= len(verses[start][1]) + 1
    end, total = start, 0
    while end < len(verses) and (total < chars or end <= verse):
        total += len(verses[end][1]) + 1
        end += 1
    while total < chars and start > 0:  # the window hit the end of the material: grow it backwards
        start -= 1
        total += len(verses[start][1]) + 1
    return list(verses[start:end])


def make_item(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(NAME, split, seed, length)
    books, _, chapters = SPLIT_MATERIAL[split]
    verses = _verses(split)
    chapter = rng.choice(chapters)
    in_chapter = [
        i
        for i, (ref, text) in enumerate(verses)
        if _book(ref) == books[0] and _chapter(ref) == chapter and _facts(text)
    ]
    for verse in rng.sample(in_chapter, len(in_chapter)):
        window = _window(rng, split, verse, tokens_to_chars(length))
        text = " ".join(t for _, t in window)
        facts = _facts(text)
        sons = [s for _, s in facts]
        candidates = sorted({(f, s) for f, s in _facts(verses[verse][1]) if sons.count(s) == 1})
        if candidates:
            break
    else:
        raise InvalidConfigError(f"no begat fact of {books[0]} {chapter} names a son only once")
    father, son = rng.choice(candidates)
    people = sorted({name for fact in facts for name in fact})
    renamed = dict(zip(people, rng.sample(invented_names(split), len(people)), strict=True))
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(people, key=len, reverse=True))) + r")\b")
    context = pattern.sub(lambda m: renamed[m.group(1)], text)
    position = context.find(f"begat {renamed[son]}")
    return Item(
        task=NAME,
        split=split,
        seed=seed,
        length=length,
        context=context,
        question=f"According to the text above, who was the father of {renamed[son]}? Reply with his name only.",
        answer_prefix=ANSWER_PREFIX,
        answers=(renamed[father],),
        max_new_tokens=8,
        metric="contains",
        sources=tuple(sorted({f"kjv:{_book(ref)}" for ref, _ in window})) + (f"names:{split}",),
        depth=position / max(1, len(context)),
    )
