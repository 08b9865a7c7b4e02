"""Turn an item into token ids: the prompt (context, question, answer prefix) and the gold answer.

Chat items are one user turn of the model's chat template followed by the answer prefix inside
the assistant turn, which is what lets a 135M instruct model answer in the expected form.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.items import Item


@attrs.frozen(eq=False)
class EncodedItem:
    """``prompt_ids [1, tokens]`` and ``answer_ids [1, answer_tokens]`` of the first gold answer;
    the first ``context_tokens`` prompt tokens are the context (the chat template's opening and
    the item's context), the rest the question and the answer prompt."""

    prompt_ids: torch.Tensor
    answer_ids: torch.Tensor
    context_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_ids.shape[-1]


def prompt_text(item: Item, tokenizer: Any) -> str:
    """The full prompt as text, ending with the answer prefix."""
    if item.template == "raw":
        question = f"{item.question}\n" if item.question else ""
        return "\n\n".join(part for part in (item.context, question) if part) + item.answer_prefix
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidConfigError(
            f"task {item.task!r} uses a chat prompt, but the tokenizer has no chat template; use an instruct model"
        )
    # a closed-book item has no context: the turn is the question alone, with no blank lines first
    content = "\n\n".join(part for part in (item.context, item.question) if part)
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + item.answer_prefix


def context_tokens(text: str, context: str, prompt_ids: torch.Tensor, tokenizer: Any) -> int:
    """How many of ``prompt_ids`` (the tokens of ``text``) belong to the context: the tokens of the
    text up to the context's end, as far as they agree with the prompt's own tokenization (a
    token spanning the boundary goes with the question, so no question character is compressed
    with the context). The prompt's tokens are the same under both protocols."""
    end = text.find(context) + len(context) if context else 0
    if end <= 0:
        return 0
    head = tokenizer(text[:end], add_special_tokens=False, return_tensors="pt").input_ids[0]
    prompt = prompt_ids[0]
    shared = min(head.shape[0], prompt.shape[0])
    differ = (head[:shared] != prompt[:shared]).nonzero()
    return int(differ[0]) if differ.numel() else shared


def encode(item: Item, tokenizer: Any) -> EncodedItem:
    """Token ids of the prompt and of the first gold answer (a space joins them when needed)."""
    text = prompt_text(item, tokenizer)
    answer = item.answers[0]
    if text and not text[-1].isspace() and not answer[:1].isspace():
        answer = " " + answer
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    target = tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids
    return EncodedItem(
        prompt_ids=prompt, answer_ids=target, context_tokens=context_tokens(text, item.context, prompt, tokenizer)
    )
