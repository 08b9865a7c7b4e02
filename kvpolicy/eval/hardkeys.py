"""Multi-key and multi-value retrieval whose answer prefix gives no cue (``multikey-hard``,
``multivalue-hard``).

The easy ``multikey`` / ``multivalue`` tasks open the reply with "The special magic number for
KEY is", so the prompt's last tokens repeat the key and a policy that only keeps the end of the
prompt still attends to the right needle. Here the reply opens with a neutral "The number is", so the
key must be matched from the question alone, against many same-template needles.

``multikey-hard``: 8–16 needles "The special magic number for KEY is N." with different keys
(the count is drawn per item) are spread over essay text; the question asks about one. A guess
among the needles' numbers scores ``1/count``; the task's ``chance`` is its mean over the draw.

``multivalue-hard``: one key has 3–4 numbers ("One of the special magic numbers for KEY is N."),
scattered among 3–4 numbers each of two other keys with the same template; the model lists the
key's numbers. Metric: token F1. Listing as many needles' numbers at random has an expected F1 of
``values / all needles`` ≈ 1/3, the task's ``chance``.

Keys come from the needle task's split-disjoint key lists, filler from the split's essays.
"""

from __future__ import annotations

import random
from fractions import Fraction

from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.needle import KEYS
from kvpolicy.eval.sources import essay_run, insert_at_depths, rng_for, spread_depths, tokens_to_chars

MULTIKEY = "multikey-hard"
MULTIVALUE = "multivalue-hard"
MIN_KEYS, MAX_KEYS = 8, 16
MIN_VALUES, MAX_VALUES = 3, 4
DISTRACTOR_KEYS = 2
ANSWER_PREFIX = "The number is"
LIST_PREFIX = "The numbers are"

#: mean of 1/keys over the uniform draw of the key count
MULTIKEY_CHANCE = float(sum(Fraction(1, n) for n in range(MIN_KEYS, MAX_KEYS + 1)) / (MAX_KEYS - MIN_KEYS + 1))


def _multivalue_chance() -> float:
    """Mean of ``values / all needles`` over the draw (every value count equally likely)."""
    counts = range(MIN_VALUES, MAX_VALUES + 1)
    ratios = [
        Fraction(mine, mine + sum(others)) for mine in counts for others in ((a, b) for a in counts for b in counts)
    ]
    return float(sum(ratios) / len(ratios))


MULTIVALUE_CHANCE = _multivalue_chance()


def distinct_numbers(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct 7-digit numbers."""
    return [str(n) for n in rng.sample(range(1_000_000, 10_000_000), count)]


def make_multikey(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(MULTIKEY, split, seed, length)
    count = rng.randint(MIN_KEYS, MAX_KEYS)
    keys = rng.sample(KEYS[split], count)
    values = distinct_numbers(rng, count)
    depths = spread_depths(rng, count)
    target = rng.randrange(count)
    sentences, titles = essay_run(rng, split, tokens_to_chars(length))
    needles = [(d, f"The special magic number for {k} is {v}.") for d, k, v in zip(depths, keys, values, strict=True)]
    return Item(
        task=MULTIKEY,
        split=split,
        seed=seed,
        length=length,
        context=" ".join(insert_at_depths(sentences, needles)),
        question=f"What is the special magic number for {keys[target]} mentioned in the text above? "
        "Reply with the number only.",
        answer_prefix=ANSWER_PREFIX,
        answers=(values[target],),
        max_new_tokens=10,
        metric="contains",
        sources=(*titles, f"needle-keys:{split}"),
        depth=depths[target],
    )


def make_multivalue(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(MULTIVALUE, split, seed, length)
    keys = rng.sample(KEYS[split], 1 + DISTRACTOR_KEYS)
    counts = [rng.randint(MIN_VALUES, MAX_VALUES) for _ in keys]
    values = distinct_numbers(rng, sum(counts))
    groups, start = [], 0
    for count in counts:
        groups.append(values[start : start + count])
        start += count
    facts = [
        f"One of the special magic numbers for {key} is {value}."
        for key, group in zip(keys, groups, strict=True)
        for value in group
    ]
    rng.shuffle(facts)
    sentences, titles = essay_run(rng, split, tokens_to_chars(length))
    context = " ".join(insert_at_depths(sentences, list(zip(spread_depths(rng, len(facts)), facts, strict=True))))
    return Item(
        task=MULTIVALUE,
        split=split,
        seed=seed,
        length=length,
        context=context,
        question=f"List all the special magic numbers for {keys[0]} mentioned in the text above, separated by commas.",
        answer_prefix=LIST_PREFIX,
        answers=(", ".join(groups[0]),),
        max_new_tokens=40,
        metric="f1",
        sources=(*titles, f"needle-keys:{split}"),
    )
