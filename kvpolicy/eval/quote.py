"""Quote completion: finish a sentence of the document, scored by Rouge-L.

A long-passage reading task in the spirit of LongBench's summarisation / QA scoring (Rouge-L,
Lin 2004): after the essays, the prompt gives the first words of a sentence from their middle and
the model must continue it as written. It is a plain-text prompt: inside the chat template
SmolLM2-135M paraphrased instead of copying (Rouge-L 0.09 with a full cache). Measures whether a policy keeps the exact wording of a
passage the question only points at afterwards. Metric: Rouge-L F1 against the rest of the
sentence.
"""

from __future__ import annotations

import re

from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.sources import essay_run, rng_for, tokens_to_chars

NAME = "quote"
PREFIX_WORDS = 8
MIN_WORDS = 16
MAX_WORDS = 40
#: sentences the splitter glued together ("end.Next") or footnote markers make bad quotes
_GLUED = re.compile(r"[.!?;:][A-Za-z]|\[\d+\]")


def make_item(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(NAME, split, seed, length)
    sentences, titles = essay_run(rng, split, tokens_to_chars(length))
    lo, hi = len(sentences) // 10, len(sentences) * 9 // 10
    candidates = [
        i
        for i in range(lo, hi)
        if MIN_WORDS <= len(sentences[i].split()) <= MAX_WORDS and not _GLUED.search(sentences[i])
    ]
    index = rng.choice(candidates or list(range(len(sentences))))
    words = sentences[index].split()
    head, tail = " ".join(words[:PREFIX_WORDS]), " ".join(words[PREFIX_WORDS:])
    return Item(
        task=NAME,
        split=split,
        seed=seed,
        length=length,
        context=" ".join(sentences),
        question="Repeat a sentence of the text above exactly:",
        answer_prefix=head,
        answers=(tail,),
        max_new_tokens=48,
        metric="rouge_l",
        template="raw",
        sources=tuple(titles),
        depth=index / max(1, len(sentences)),
    )
