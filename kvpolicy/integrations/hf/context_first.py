"""The ``context-first`` protocol: compress the context, then append the question to the sealed cache.

In real use the question is often not there when the cache is compressed: a document, a
repository or a conversation is cached once and asked many things later, and NAMM evicts every
512 tokens while the prompt streams in. Here tokens ``[0, n)`` of each row are the *context*:
they are prefilled (chunked, with the policy's eviction passes between chunks and its
``after_prefill`` pass at the context's end); the cache is then sealed (`EvictingCache.seal`: no
eviction pass runs again and no statistics are recorded), and the rest of the prompt (the
question and the answer prompt) and the answer are appended to it. So no eviction pass ever sees
a question token before the answer is produced.

A padded batch takes one ``n`` per row, counted on the row's own tokens (left padding excluded).
Contexts and rests are left-padded separately, so a row's rest may follow a gap of padding:
the sealed cache allows it (its attention masks every padded slot, and no pass will look at it).

`generate` decodes on the sealed cache with kvpolicy's own loop, since transformers' ``generate``
cannot continue a cache whose physical length differs from the tokens seen: greedy or sampling
(temperature, top-k, top-p, repetition penalty) and the end-of-sequence and padding tokens of
the model's generation config, as ``model.generate`` reads them. Anything else is refused by name.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from kvpolicy.errors import InvalidConfigError, ShapeError, UnsupportedModelError
from kvpolicy.integrations.hf.batching import left_pad

#: generation options the context-first loop implements (everything else is refused by name)
GENERATION_OPTIONS = frozenset(
    {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
     "eos_token_id", "pad_token_id", "generation_config"}
)  # fmt: skip


@attrs.frozen(eq=False)
class ContextSplit:
    """Each row's context and rest, each block left-padded (masks None when nothing is padded)."""

    context_ids: torch.Tensor
    context_mask: torch.Tensor | None
    rest_ids: torch.Tensor
    rest_mask: torch.Tensor | None


def context_ends(context_end: Any, rows: int) -> list[int]:
    """``context_end`` as one whole number per row: an int for every row, or a sequence/tensor of ``rows``."""
    if isinstance(context_end, torch.Tensor):
        context_end = context_end.flatten().tolist()
    if isinstance(context_end, int) and not isinstance(context_end, bool):
        return [int(context_end)] * rows
    if isinstance(context_end, Sequence) and not isinstance(context_end, (str, bytes)):
        values = list(context_end)
        if len(values) == rows and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return values
    raise InvalidConfigError(
        f"context_end takes a whole number of context tokens, or one per batch row ({rows}); got {context_end!r}"
    )


def split_at_context(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, context_end: Any) -> ContextSplit:
    """Split each row of ``input_ids [batch, tokens]`` (left-padded where ``attention_mask`` is 0)
    after its first ``context_end`` real tokens."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ShapeError(f"input_ids must be [batch, tokens]; got {tuple(ids.shape)}")
    mask = None if attention_mask is None else torch.as_tensor(attention_mask).to(ids.device).bool()
    if mask is not None and mask.shape != ids.shape:
        raise ShapeError(f"attention_mask has shape {tuple(mask.shape)}; input_ids have {tuple(ids.shape)}")
    ends = context_ends(context_end, ids.shape[0])
    rows = [ids[r] if mask is None else ids[r][mask[r]] for r in range(ids.shape[0])]
    for r, (row, end) in enumerate(zip(rows, ends, strict=True)):
        if not 1 <= end < row.shape[0]:
            raise InvalidConfigError(
                f"context_end {end} for row {r}: the context must hold at least one token and leave at least one "
                f"for the question (the row has {row.shape[0]} tokens)"
            )
    contexts = [row[:end] for row, end in zip(rows, ends, strict=True)]
    rests = [row[end:] for row, end in zip(rows, ends, strict=True)]
    context_ids, context_mask = _padded(contexts)
    rest_ids, rest_mask = _padded(rests)
    return ContextSplit(context_ids, context_mask, rest_ids, rest_mask)


def _padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if len({row.shape[0] for row in rows}) == 1:
        return torch.stack(rows), None
    ids, mask = left_pad(rows, pad_id=0)
    return ids.to(rows[0].device), mask.to(rows[0].device)


def prefill_context_first(
    handle: Any,
    input_ids: torch.Tensor,
    context_end: Any,
    chunk_size: int | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    align_end: bool = False,
) -> torch.Tensor:
    """Feed the contexts (chunked, evicting), seal the cache, feed the rests: the logits of each
    row's last prompt token ``[batch, vocab]``. A padded batch chunks its contexts from their end
    (``align_end``), so every row meets the chunk boundaries it would meet alone."""
    split = split_at_context(input_ids, attention_mask, context_end)
    padded = split.context_mask is not None
    handle.feed(
        split.context_ids, chunk_size, attention_mask=split.context_mask, last_only=True, align_end=align_end or padded
    )
    handle.seal()
    return handle.feed(split.rest_ids, chunk_size, attention_mask=split.rest_mask, last_only=True)[:, -1]


def _option(config: Any, kwargs: dict[str, Any], name: str) -> Any:
    return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, None)


def _processors(config: Any, kwargs: dict[str, Any]) -> tuple[bool, list[Any]]:
    """Whether to sample, and the logits processors of the options given (as ``generate`` applies them)."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors: list[Any] = []
    penalty = _option(config, kwargs, "repetition_penalty")
    if penalty is not None and penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    sample = bool(_option(config, kwargs, "do_sample"))
    if sample:
        temperature, top_k, top_p = (_option(config, kwargs, n) for n in ("temperature", "top_k", "top_p"))
        if temperature is not None and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return sample, processors


def _token_set(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def generate(
    handle: Any,
    input_ids: torch.Tensor,
    context_end: Any,
    *,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``context-first`` generation on ``handle``'s model: ``sequences [batch, tokens + new]`` as
    ``model.generate`` returns them (a row that ended is filled with the pad token)."""
    unknown = sorted(k for k in kwargs if k not in GENERATION_OPTIONS)
    if unknown:
        raise UnsupportedModelError(
            f"context_end generation supports {', '.join(sorted(GENERATION_OPTIONS))}; got {', '.join(unknown)}"
        )
    model = handle._attachment.model
    config = copy.deepcopy(kwargs.pop("generation_config", None) or getattr(model, "generation_config", None))
    ids = torch.as_tensor(input_ids)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    new_tokens = _option(config, kwargs, "max_new_tokens")
    if new_tokens is None:
        max_length = _option(config, kwargs, "max_length") or 20
        new_tokens = max_length - ids.shape[1]
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise InvalidConfigError(f"max_new_tokens must be a whole number >= 1, got {new_tokens!r}")
    eos = _token_set(_option(config, kwargs, "eos_token_id"))
    pad = _option(config, kwargs, "pad_token_id")
    pad = pad if pad is not None else (min(eos) if eos else 0)
    sample, processors = _processors(config, kwargs)
    with torch.no_grad():
        handle.reset()
        last = prefill_context_first(handle, ids, context_end, chunk_size, attention_mask=attention_mask)
        history = ids.to(last.device)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=last.device)
        produced: list[torch.Tensor] = []
        for step in range(new_tokens):
            scores = last.float()
            for processor in processors:
                scores = processor(history, scores)
            chosen = torch.multinomial(scores.softmax(-1), 1)[:, 0] if sample else scores.argmax(-1)
            chosen = torch.where(finished, torch.full_like(chosen, pad), chosen)
            produced.append(chosen)
            history = torch.cat([history, chosen[:, None]], 1)
            finished |= torch.isin(chosen, torch.tensor(sorted(eos), device=chosen.device, dtype=chosen.dtype))
            if bool(finished.all()) or step == new_tokens - 1:
                break
            last = handle.feed(chosen[:, None])[:, -1]
    return torch.cat([ids.to(last.device), torch.stack(produced, 1)], 1)
