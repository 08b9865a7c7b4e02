"""Passage retrieval: which of N numbered passages contains a quoted sentence?

After LongBench's PassageRetrieval (Bai et al. 2023), the first task NAMM was evolved on (Cetin
et al. 2024). Passages are excerpts of different essays, each closed by "End of Passage k."; the
question quotes the closing sentence of one of them and the answer prefix repeats it followed by
"End of Passage", so the model answers by recalling the label that followed the sentence: the task
measures whether a policy keeps both the wording of every passage and its label. Metric: exact
match of the passage number (chance 1/N).

Not in the default profiles: SmolLM2-135M scores 0 on it with a full cache in every form tried
(label at the start, label at the end, this cue, chat or plain text, shuffled or word labels,
choice among the label tokens only); it answers the most recent or the next passage label. It is
kept for larger models (``--tasks passages``); docs/evaluation.md lists the measurements.
"""

from __future__ import annotations

import re

from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.sources import essay_sentences, rng_for, tokens_to_chars

NAME = "passages"
PASSAGES = 6
MIN_QUOTE_CHARS = 60
_GLUED = re.compile(r"[.!?;:][A-Za-z]|\[\d+\]")


def _quotable(sentence: str) -> bool:
    return len(sentence) >= MIN_QUOTE_CHARS and not _GLUED.search(sentence)


def make_item(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(NAME, split, seed, length)
    pool = essay_sentences(split)
    chosen = rng.sample(range(len(pool)), PASSAGES)
    per_passage = tokens_to_chars(length) // PASSAGES
    target = rng.randrange(PASSAGES)
    blocks: list[str] = []
    quote = ""
    for number, essay in enumerate(chosen, start=1):
        title, sents = pool[essay]
        start = rng.randrange(max(1, len(sents) - 60))
        excerpt: list[str] = []
        # stop once long enough, at a sentence that can be quoted (for every passage alike)
        for sentence in sents[start:]:
            excerpt.append(sentence)
            if sum(len(s) + 1 for s in excerpt) >= per_passage and _quotable(sentence):
                break
        if number - 1 == target:
            quote = excerpt[-1]
        blocks.append(f"Passage {number}:\n{' '.join(excerpt)}\nEnd of Passage {number}.")
    return Item(
        task=NAME,
        split=split,
        seed=seed,
        length=length,
        context="\n\n".join(blocks),
        question=f'Which passage contains the sentence "{quote}"? Answer with the passage number.',
        answer_prefix=f"{quote}\nEnd of Passage",
        answers=(str(target + 1),),
        max_new_tokens=4,
        metric="exact",
        template="raw",
        sources=tuple(pool[i][0] for i in chosen),
        depth=(target + 1) / PASSAGES,
    )
