"""Long-document perplexity of a continuation given the (evicted) cache, on the King James Bible.

The context is a run of consecutive verses; the gold answer is the text that follows. Scored by
teacher forcing only (no generation): ``score = exp(mean log-likelihood)`` of the continuation,
i.e. the geometric-mean token probability (1 / perplexity), so higher is better and the ratio to
the full cache is ``ppl_full / ppl_policy``. Old Testament for ``train``, New for ``test``.
"""

from __future__ import annotations

from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.sources import bible_verses, book_of, rng_for, tokens_to_chars

NAME = "perplexity"
CONTINUATION_CHARS = 400


def make_item(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(NAME, split, seed, length)
    verses = bible_verses(split)
    budget = tokens_to_chars(length)
    start = rng.randrange(len(verses) - (budget + CONTINUATION_CHARS) // 20)
    context: list[str] = []
    continuation: list[str] = []
    books: list[str] = []
    index = start
    while sum(len(v) + 1 for v in continuation) < CONTINUATION_CHARS:
        ref, text = verses[index]
        if book_of(ref) not in books:
            books.append(book_of(ref))
        (context if sum(len(v) + 1 for v in context) < budget else continuation).append(text)
        index += 1
    return Item(
        task=NAME,
        split=split,
        seed=seed,
        length=length,
        context=" ".join(context),
        question="",
        answer_prefix="",
        answers=(" " + " ".join(continuation),),
        max_new_tokens=0,
        metric="likelihood",
        template="raw",
        sources=tuple(books),
    )
