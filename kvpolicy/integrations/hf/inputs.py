"""Checks on what reaches an attached model, so bad input is a named error before torch sees it.

Without them, out-of-vocabulary ids end in an ``IndexError`` from the embedding, a float64
``inputs_embeds`` in a ``RuntimeError`` from a matmul, a fractional ``chunk_size`` in a
``TypeError`` from ``split``, a batch row that does not exist in an ``IndexError`` from the
cache, and a batch row that is padding only runs silently with nothing to attend to (wrong
tokens for that row).
"""

from __future__ import annotations

from typing import Any

import torch

from kvpolicy.errors import InvalidConfigError, InvalidInputError, ShapeError, UnsupportedPaddingError
from kvpolicy.integrations.hf.report import batch_size


def check_chunk_size(chunk_size: Any) -> None:
    """``chunk_size``: None (one forward call) or a whole number of tokens >= 1."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidConfigError(f"chunk_size must be a whole number of tokens >= 1 or None, got {chunk_size!r}")


def check_row(cache: Any, row: Any) -> None:
    """``row`` names a row of the batch ``cache`` holds."""
    batch = batch_size(cache)
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < batch:
        accepted = f"0..{batch - 1}" if batch else "none: the cache is empty, feed tokens first"
        raise ShapeError(f"fork_row({row!r}): the cache holds {batch} rows (rows {accepted})")


def check_rows_have_tokens(attention_mask: Any) -> None:
    """Every row of a padded batch holds at least one real token: a row of padding alone has
    nothing to attend to, and would generate garbage rather than what the bare model does."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    empty = (~attention_mask.bool().any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise UnsupportedPaddingError(
            f"batch rows {empty} are padding only (their attention_mask is all 0): give each row at least one "
            "token, or leave those rows out of the batch"
        )


def check_forward_inputs(model: Any, input_ids: Any, inputs_embeds: Any, whole_prompt: bool) -> None:
    """Token ids inside the model's vocabulary (checked on prompts, ``whole_prompt``: a decoding
    step feeds back a token the model chose), embeddings in the model's own dtype."""
    embedding = model.get_input_embeddings()
    if isinstance(input_ids, torch.Tensor) and whole_prompt and input_ids.numel():
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= embedding.num_embeddings:
            bad = low if low < 0 else high
            raise InvalidInputError(
                f"token id {bad} is outside the model's vocabulary (ids 0..{embedding.num_embeddings - 1}); "
                "was the prompt tokenized for another model?"
            )
    if isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.dtype != embedding.weight.dtype:
        raise InvalidInputError(
            f"inputs_embeds are {inputs_embeds.dtype}, but the model runs in {embedding.weight.dtype}; "
            f"convert them with .to({embedding.weight.dtype})"
        )
