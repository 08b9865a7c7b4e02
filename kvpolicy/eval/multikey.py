"""Multi-key and multi-value retrieval over confusable needles (RULER's MK/MV-NIAH).

``multikey``: four needles of one template ("The special magic number for KEY is N.") with
different keys are spread over essay text; the question asks about one. A policy that keeps the
wrong needle (or none) answers with a confusable number. Metric: contains match (chance ≈ 1/4
when the model picks one of the needles). hard-needle's look-alike entities (Demeter / Demitra)
were tried first: a 135M model confuses them even with a full cache, so they are not used here.

``multivalue``: one entity has three project codes, scattered among three needles about a
second entity (codes, not names: every name of the pool starts with "Dr.", which would give F1
credit for free), drawn from the entity / value pools of the ``hard-needle`` package (its
``default`` pools for ``train``, its disjoint ``unseen`` pools for ``test``); the model must list
them. Metric: token F1 against the list of values.
"""

from __future__ import annotations

import random
from typing import Any

from kvpolicy.errors import ModelUnavailableError
from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.needle import KEYS
from kvpolicy.eval.sources import essay_run, insert_at_depths, rng_for, spread_depths, tokens_to_chars

POOLS: dict[Split, str] = {"train": "default", "test": "unseen"}
HARD_NEEDLE_PACKAGE = "hard-needle==0.1.2"
KEYS_PER_ITEM = 4
VALUES_PER_KEY = 3


def _pool_sets() -> dict[str, Any]:
    """hard-needle's pools, imported when a multi-value item is made (a data package, not a
    dependency: nothing else needs it installed)."""
    try:
        from hard_needle.entities import POOL_SETS
    except ImportError as exc:
        raise ModelUnavailableError(
            f"the multivalue task needs the package {HARD_NEEDLE_PACKAGE}; install with "
            f"`pip install --no-deps {HARD_NEEDLE_PACKAGE}`"
        ) from exc
    return POOL_SETS


def _distinct(rng: random.Random, pool: tuple[str, ...] | list[str], count: int) -> list[str]:
    """``count`` values from different look-alike pairs (hard-needle lists them pairwise:
    Aurora/Atlas…, AUR-4521/AUR-4523…), so the needles are similar but not near-duplicates,
    which a 135M model cannot tell apart even with a full cache."""
    pairs = [tuple(pool[i : i + 2]) for i in range(0, len(pool), 2)]
    return [rng.choice(pair) for pair in rng.sample(pairs, count)]


def make_multikey(split: Split, seed: int, length: int) -> Item:
    rng = rng_for("multikey", split, seed, length)
    keys = rng.sample(KEYS[split], KEYS_PER_ITEM)
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
    depths = spread_depths(rng, KEYS_PER_ITEM)
    target = rng.randrange(KEYS_PER_ITEM)
    sentences, titles = essay_run(rng, split, tokens_to_chars(length))
    needles = [(d, f"The special magic number for {k} is {v}.") for d, k, v in zip(depths, keys, values, strict=True)]
    return Item(
        task="multikey",
        split=split,
        seed=seed,
        length=length,
        context=" ".join(insert_at_depths(sentences, needles)),
        question=f"What is the special magic number for {keys[target]} mentioned in the text above?",
        answer_prefix=f"The special magic number for {keys[target]} is",
        answers=(values[target],),
        max_new_tokens=10,
        metric="contains",
        sources=(*titles, f"needle-keys:{split}"),
        depth=depths[target],
    )


def make_multivalue(split: Split, seed: int, length: int) -> Item:
    rng = rng_for("multivalue", split, seed, length)
    pool = _pool_sets()[POOLS[split]]
    entities = _distinct(rng, pool["entities"], 2)
    values = _distinct(rng, pool["project_code"], 2 * VALUES_PER_KEY)
    mine, other = values[:VALUES_PER_KEY], values[VALUES_PER_KEY:]
    facts = [
        f"One of the special project codes for {e} is {v}."
        for e, group in zip(entities, (mine, other), strict=True)
        for v in group
    ]
    rng.shuffle(facts)
    sentences, titles = essay_run(rng, split, tokens_to_chars(length))
    context = " ".join(insert_at_depths(sentences, list(zip(spread_depths(rng, len(facts)), facts, strict=True))))
    return Item(
        task="multivalue",
        split=split,
        seed=seed,
        length=length,
        context=context,
        question=f"List all the special project codes for {entities[0]} mentioned in the text above.",
        answer_prefix=f"The special project codes for {entities[0]} are",
        answers=(", ".join(mine),),
        max_new_tokens=32,
        metric="f1",
        sources=(*titles, f"hard-needle:{POOLS[split]}"),
    )
