"""Models an evolution run can name: a shipped model (`kvpolicy.models`) or ``tiny:<family>``,
a seeded random-weight model with a byte-level tokenizer (`kvpolicy.integrations.hf.tiny`): the
task prompts then run unchanged on a model that loads in milliseconds.
"""

from __future__ import annotations

from typing import Any

from kvpolicy.errors import InvalidConfigError

TINY_PREFIX = "tiny:"


def load_model_and_tokenizer(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a shipped model name or ``tiny:<family>`` (e.g. ``tiny:llama``)."""
    if name.startswith(TINY_PREFIX):
        from kvpolicy.integrations.hf.tiny import byte_tokenizer, tiny_model

        return tiny_model(name[len(TINY_PREFIX) :]), byte_tokenizer()
    try:
        from kvpolicy.models import load_model
    except ImportError as exc:
        raise InvalidConfigError(f"model {name!r} needs kvpolicy.models, which cannot be imported: {exc}") from exc
    return load_model(name)
