"""Tasks whose items come in groups of four questions about one context (``multikey-shared``,
``needle-shared``).

Under ``context-first`` the context is compressed before any question exists, so the four
questions of one context share a single compression (`kvpolicy.eval.rows.ContextRows` forks the
compressed cache once per question). That is how the setting is used — a document cached once and
asked several things — and it cuts the cost of a table about four times: the prefill of the
context, and every policy's own chunked prefill, are paid once per context instead of per item.

Seeds ``4c … 4c+3`` ask the four questions of context ``c`` (``divmod(seed, 4)``), so any run of
four consecutive seeds from a multiple of four covers whole contexts. Items of one context share
``Item.context_id``; paired intervals resample whole contexts (`kvpolicy.eval.paired`).

``multikey-shared``: four needles "The special magic number for KEY is N." with different keys,
spread over essay text; item ``q`` asks for key ``q``, and the reply opens with "The special magic
number for KEY is" as in ``multikey``. Under ``context-first`` that prefix reaches the cache only
after the context was compressed, so it points the *model* at the right needle without telling a
*policy* which needle to keep. (A neutral "The number is" was tried on validation items: SmolLM2
then scored 40.6 % with a full cache on 32 items, 16 points from chance, short of the keep rule.)
Chance: 1/4 (one of the needles' numbers).

``needle-shared``: four needles of four *different* templates (a locker number, an office's phone
extension, a ticket number, an account PIN), each with its own key, spread over essay text; item
``q`` asks for needle ``q`` and the reply opens with that needle's own words ("The KEY ticket
number is"). A small model tells four templates apart more easily than four keys of one
template, so the task measures what the policy kept rather than the model's key matching.
(On validation items SmolLM2 answered the ticket and PIN needles 10 of 10 times with a full
cache, while "the special magic number for KEY" drew another needle's number and "the secret
code of the KEY vault" drew prose, 2 of 10: those two templates were replaced.) Chance: 1/4 (a
number of the context picked at random).

The code task has no shared form: a test-split code window of 8k tokens rarely holds four int
defaults of different functions (of 30 test windows drawn, none held four and 3 held two), so ``code-default``
stays one question per context.
"""

from __future__ import annotations

from kvpolicy.eval.hardkeys import distinct_numbers
from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.needle import KEYS
from kvpolicy.eval.sources import essay_run, insert_at_depths, rng_for, spread_depths, tokens_to_chars

QUESTIONS_PER_CONTEXT = 4
MULTIKEY = "multikey-shared"
NEEDLE = "needle-shared"
#: (needle, question, answer prefix) of ``multikey-shared``: one template, four keys
MAGIC_NUMBER = (
    "The special magic number for {key} is {value}.",
    "What is the special magic number for {key} mentioned in the text above?",
    "The special magic number for {key} is",
)
#: (needle, question, answer prefix) templates of ``needle-shared``, one per question of a context
TEMPLATES = (
    ("The {key} locker number is {value}.", "What is the {key} locker number mentioned in the text above?", "The {key} locker number is"),
    ("The phone extension of the {key} office is {value}.", "What is the phone extension of the {key} office mentioned in the text above?", "The phone extension of the {key} office is"),
    ("The {key} ticket number is {value}.", "What is the {key} ticket number mentioned in the text above?", "The {key} ticket number is"),
    ("The PIN for the {key} account is {value}.", "What is the PIN for the {key} account mentioned in the text above?", "The PIN for the {key} account is"),
)  # fmt: skip
CHANCE = 1 / QUESTIONS_PER_CONTEXT


def context_of(seed: int) -> tuple[int, int]:
    """``(context seed, question index)`` of an item seed."""
    return divmod(seed, QUESTIONS_PER_CONTEXT)


def make_multikey(split: Split, seed: int, length: int) -> Item:
    return _four_needles(MULTIKEY, (MAGIC_NUMBER,) * QUESTIONS_PER_CONTEXT, split, seed, length)


def make_needle(split: Split, seed: int, length: int) -> Item:
    return _four_needles(NEEDLE, TEMPLATES, split, seed, length)


def _four_needles(task: str, templates: tuple[tuple[str, str, str], ...], split: Split, seed: int, length: int) -> Item:
    """Context ``seed // 4``: needle ``i`` is ``templates[i]`` with its own key and number, at a
    depth of its own; item ``seed % 4`` asks for needle ``seed % 4``."""
    group, asked = context_of(seed)
    rng = rng_for(task, split, group, length)
    keys = rng.sample(KEYS[split], QUESTIONS_PER_CONTEXT)
    values = distinct_numbers(rng, QUESTIONS_PER_CONTEXT)
    depths = spread_depths(rng, QUESTIONS_PER_CONTEXT)
    rng.shuffle(depths)  # the asked order is not the order in the text
    sentences, titles = essay_run(rng, split, tokens_to_chars(length))
    needles = [
        (depth, needle.format(key=key, value=value))
        for depth, (needle, _, _), key, value in zip(depths, templates, keys, values, strict=True)
    ]
    _, question, prefix = templates[asked]
    return Item(
        task=task,
        split=split,
        seed=seed,
        length=length,
        context=" ".join(insert_at_depths(sentences, needles)),
        question=question.format(key=keys[asked]),
        answer_prefix=prefix.format(key=keys[asked]),
        answers=(values[asked],),
        max_new_tokens=10,
        metric="contains",
        sources=(*titles, f"needle-keys:{split}"),
        depth=depths[asked],
    )
