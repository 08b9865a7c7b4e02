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
    """``prompt_ids [1, tokens]`` and ``answer_ids [1, answer_tokens]`` of the first gold answer."""

    prompt_ids: torch.Tensor
    answer_ids: torch.Tensor

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


def encode(item: Item, tokenizer: Any) -> EncodedItem:
    """Token ids of the prompt and of the first gold answer (a space joins them when needed)."""
    text = prompt_text(item, tokenizer)
    answer = item.answers[0]
    if text and not text[-1].isspace() and not answer[:1].isspace():
        answer = " " + answer
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    target = tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids
    return EncodedItem(prompt_ids=prompt, answer_ids=target)
