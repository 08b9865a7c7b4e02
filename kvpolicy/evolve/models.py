"""Models an evolution run can name: a shipped model (`kvpolicy.models`) or ``tiny:<family>``,
a seeded random-weight test model (`kvpolicy.testing.tiny`) with a byte-level tokenizer.

The tiny models have a 256-token vocabulary, so their tokenizer maps every UTF-8 byte to one
token (a real `tokenizers` BPE model with no merges) and carries a minimal chat template; the
task prompts then run unchanged on a model that loads in milliseconds.
"""

from __future__ import annotations

import functools
from typing import Any

from kvpolicy.errors import InvalidConfigError

TINY_PREFIX = "tiny:"
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.cache
def byte_tokenizer() -> Any:
    """A transformers tokenizer with one token per byte (ids 0–255), decoding back to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()  # byte value → printable unicode symbol, as GPT-2's byte-level BPE
    vocab = {symbol: byte for byte, symbol in alphabet.items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def load_model_and_tokenizer(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a shipped model name or ``tiny:<family>`` (e.g. ``tiny:llama``)."""
    if name.startswith(TINY_PREFIX):
        from kvpolicy.testing.tiny import tiny_model

        return tiny_model(name[len(TINY_PREFIX) :]), byte_tokenizer()
    try:
        from kvpolicy.models import load_model
    except ImportError as exc:
        raise InvalidConfigError(f"model {name!r} needs kvpolicy.models, which cannot be imported: {exc}") from exc
    return load_model(name)
