"""Variable tracking (after RULER's VT, Hsieh et al. 2024): follow assignments through noise.

"The value of VAR ABCDE is 41523." appears early in essay text and "VAR FGHIJ is a copy of VAR
ABCDE." later; a second chain with another value is a distractor. The question asks for the value
of the last variable of the first chain; the answer prefix spells out the link and the model must
recall the value assigned far earlier. RULER asks the model to list all variables holding a
value; SmolLM2-135M could do neither that nor follow one ``VAR B = VAR A`` link unaided with a
full cache (0/4), so this is the one-hop, cued form, as a plain-text prompt (in the chat
template it was 1/2). Metric: contains match of the value (chance ≈ 1/2
between the two chains' values).
"""

from __future__ import annotations

import random
import string

from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.sources import essay_run, insert_at_depths, rng_for, tokens_to_chars

NAME = "variables"
HOPS = 1
CHAINS = 2
#: variable names use disjoint alphabets per split: train draws from A–M, test from N–Z
LETTERS: dict[Split, str] = {"train": string.ascii_uppercase[:13], "test": string.ascii_uppercase[13:]}


def _names(rng: random.Random, split: Split, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(LETTERS[split]) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def make_item(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(NAME, split, seed, length)
    names = _names(rng, split, CHAINS * (HOPS + 1))
    values = rng.sample(range(10_000, 100_000), CHAINS)
    inserts: list[tuple[float, str]] = []
    for chain in range(CHAINS):
        chain_names = names[chain * (HOPS + 1) : (chain + 1) * (HOPS + 1)]
        for hop, name in enumerate(chain_names):  # each link in its own slice, so links stay in order
            depth = (hop + rng.random()) / (HOPS + 1) * 0.9 + 0.05
            if hop == 0:
                inserts.append((depth, f"The value of VAR {name} is {values[chain]}."))
            else:
                inserts.append((depth, f"VAR {name} is a copy of VAR {chain_names[hop - 1]}."))
    sentences, titles = essay_run(rng, split, tokens_to_chars(length))
    last = names[HOPS]
    return Item(
        task=NAME,
        split=split,
        seed=seed,
        length=length,
        context=" ".join(insert_at_depths(sentences, inserts)),
        question=f"What is the value of VAR {last}? Follow the chain of variable assignments in the text above.",
        answer_prefix=f"VAR {last} is a copy of VAR {names[0]}. The value of VAR {names[0]} is",
        answers=(str(values[0]),),
        max_new_tokens=10,
        metric="contains",
        template="raw",
        sources=(*titles, f"variable-letters:{split}"),
    )
