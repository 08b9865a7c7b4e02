"""Needle in a haystack (Kamradt 2023; the retrieval probe of RULER, Hsieh et al. 2024).

One sentence "The special magic number for KEY is VALUE." is hidden at a chosen depth of
Paul Graham essays; the model is asked for the number. Measures whether a single fact survives
eviction wherever it sits in the context. Metric: contains match of the 7-digit number.
"""

from __future__ import annotations

from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.sources import essay_run, insert_at_depths, rng_for, tokens_to_chars

NAME = "needle"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: needle keys; train and test draw from disjoint lists
KEYS: dict[Split, tuple[str, ...]] = {
    "train": (
        "apple", "river", "lantern", "falcon", "copper", "meadow", "violin", "harbor", "cactus", "glacier",
        "pepper", "saddle", "thunder", "walnut", "anchor", "bamboo", "canyon", "dolphin", "ember", "fern",
    ),
    "test": (
        "orchid", "marble", "comet", "badger", "velvet", "quartz", "tundra", "kettle", "magpie", "lagoon",
        "pebble", "sparrow", "tulip", "cobalt", "beacon", "juniper", "otter", "saffron", "thistle", "zephyr",
    ),
}  # fmt: skip


def make_item(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(NAME, split, seed, length)
    key = rng.choice(KEYS[split])
    value = str(rng.randrange(1_000_000, 10_000_000))
    depth = DEPTHS[seed % len(DEPTHS)]
    sentences, titles = essay_run(rng, split, tokens_to_chars(length))
    needle = f"The special magic number for {key} is {value}."
    context = " ".join(insert_at_depths(sentences, [(depth, needle)]))
    return Item(
        task=NAME,
        split=split,
        seed=seed,
        length=length,
        context=context,
        question=f"What is the special magic number for {key} mentioned in the text above?",
        answer_prefix=f"The special magic number for {key} is",
        answers=(value,),
        max_new_tokens=10,
        metric="contains",
        sources=(*titles, f"needle-keys:{split}"),
        depth=depth,
    )
