"""Two-hop retrieval: a fact that only makes sense through another fact read much earlier.

Early in essay filler (depth 0.05–0.4) the context states a few people's locker codes ("Mira
Holt's locker code is 4821."); much later (depth 0.6–0.95) it says "The vault code of the
Lindqvist archive is the same as Mira Holt's locker code." The question asks for the vault code.
The vault sentence carries no number, so a policy that judged the early locker sentences
unimportant when it read them has lost the answer; the distractor lockers make a number picked
from the context right one time in ``LOCKERS`` (``CHANCE``). The reply opens with "The code is", so
the prompt's end does not point back at either fact. Codes and names are invented, so the
closed-book score is ≈ 0. Names, places and code ranges are disjoint between the splits.
"""

from __future__ import annotations

from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.sources import essay_run, insert_at_depths, rng_for, tokens_to_chars

NAME = "two-hop"
LOCKERS = 3
CHANCE = 1 / LOCKERS
ANSWER_PREFIX = "The code is"
PEOPLE: dict[Split, tuple[str, ...]] = {
    "train": (
        "Mira Holt", "Jonas Feld", "Greta Lund", "Oskar Brandt", "Lena Voss", "Tobias Kern", "Ines Marlow",
        "Felix Aden", "Clara Wendt", "Hugo Starke", "Nora Pelt", "Emil Roth",
    ),
    "test": (
        "Ada Quill", "Ruben Sato", "Elsa Moritz", "Victor Hale", "Maren Tusk", "Pavel Lorne", "Iris Odell",
        "Linus Crane", "Vera Saltz", "Anton Pryce", "Selma Rook", "Kasimir Dunn",
    ),
}  # fmt: skip
VAULTS: dict[Split, tuple[str, ...]] = {
    "train": ("Lindqvist archive", "harbour office", "east wing", "Carrow museum", "old mill", "river depot"),
    "test": ("Ostrava gallery", "north tower", "Bellamy library", "glass works", "signal station", "Hartley bank"),
}
CODES: dict[Split, tuple[int, int]] = {"train": (1000, 5499), "test": (5500, 9999)}


def make_item(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(NAME, split, seed, length)
    people = rng.sample(PEOPLE[split], LOCKERS)
    codes = [str(c) for c in rng.sample(range(CODES[split][0], CODES[split][1] + 1), LOCKERS)]
    vault = rng.choice(VAULTS[split])
    target = rng.randrange(LOCKERS)
    lockers = [f"{p}'s locker code is {c}." for p, c in zip(people, codes, strict=True)]
    early = [0.05 + 0.35 * (i + rng.random()) / LOCKERS for i in range(LOCKERS)]
    rng.shuffle(early)
    late = rng.uniform(0.6, 0.95)
    link = f"The vault code of the {vault} is the same as {people[target]}'s locker code."
    sentences, titles = essay_run(rng, split, tokens_to_chars(length))
    inserts = [*zip(early, lockers, strict=True), (late, link)]
    return Item(
        task=NAME,
        split=split,
        seed=seed,
        length=length,
        context=" ".join(insert_at_depths(sentences, inserts)),
        question=f"What is the vault code of the {vault}? Reply with the four-digit code only.",
        answer_prefix=ANSWER_PREFIX,
        answers=(codes[target],),
        max_new_tokens=8,
        metric="contains",
        sources=(*titles, f"two-hop:{split}"),
        depth=early[target],
    )
