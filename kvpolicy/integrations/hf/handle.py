"""`Handle`: what ``with policy.attach(model) as handle`` gives — the cache in use, feeding a
sequence in chunks with eviction between them, resetting, forking one batch row, reporting."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch

from kvpolicy.errors import AttachError, ShapeError
from kvpolicy.integrations.hf.cache import EvictingCache, EvictingLayer
from kvpolicy.integrations.hf.generate import cache_keyword
from kvpolicy.integrations.hf.inputs import check_chunk_size, check_row, check_rows_have_tokens
from kvpolicy.integrations.hf.report import build_report
from kvpolicy.types import CacheReport


def chunk_sizes(tokens: int, chunk_size: int | None, align_end: bool = False) -> list[int]:
    """Forward-call sizes for ``tokens`` in chunks of ``chunk_size`` (None: one call), from the
    start, or with ``align_end`` from the end (the first chunk takes the remainder)."""
    size = chunk_size or tokens
    whole, remainder = divmod(tokens, size)
    if not remainder:
        return [size] * whole
    return [remainder] + [size] * whole if align_end else [size] * whole + [remainder]


class Handle:
    """What ``with policy.attach(model) as handle`` gives: the cache in use, feeding, resetting, reporting."""

    def __init__(self, attachment: Any) -> None:
        self._attachment = attachment

    @property
    def policy(self) -> Any:
        return self._attachment.policy

    @property
    def cache(self) -> EvictingCache:
        """The cache of the latest ``model.generate`` or `feed` (a fresh one if neither ran yet)."""
        if self._attachment.cache is None:
            self._attachment.cache = self._attachment.new_cache()
        return self._attachment.cache

    def reset(self) -> None:
        """Start over with a fresh, empty cache."""
        self._attachment.cache = self._attachment.new_cache()

    def seal(self) -> None:
        """No eviction pass runs on this cache from now on (until `reset`): what it holds stays, and
        tokens fed next are never seen by a pass — the ``context-first`` protocol seals the
        compressed context before the question (`kvpolicy.integrations.hf.context_first`). A pass
        that was due but deferred (``feed(evict=False)``) is dropped, not run."""
        self.cache.seal()

    @contextlib.contextmanager
    def fork_row(self, row: int) -> Iterator[Handle]:
        """``with handle.fork_row(i):`` feed batch row ``i`` alone on a copy of the cache (e.g. a
        continuation only that row has after a batched prefill); the batch's cache is untouched
        and in use again after the block."""
        attachment = self._attachment
        saved = self.cache
        check_row(saved, row)
        attachment.cache = saved.row_copy(row)
        try:
            yield self
        finally:
            attachment.cache = saved

    def feed(
        self,
        input_ids: torch.Tensor,
        chunk_size: int | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        evict: bool = True,
        last_only: bool = False,
        align_end: bool = False,
    ) -> torch.Tensor:
        """Run ``input_ids [batch, tokens]`` through the model on the handle's cache, in chunks of
        ``chunk_size`` with eviction between them; returns the logits of the last forward
        ``[batch, chunk, vocab]``. Calls continue the same sequence until `reset`.

        ``attention_mask [batch, tokens]`` (0 at left padding, as ``tokenizer(..., padding=True,
        padding_side='left')`` gives it) runs a padded batch: each row is numbered, budgeted and
        scheduled on its own tokens, as if run alone in the same forward calls. ``align_end=True``
        puts the chunk boundaries at whole chunks before the end (the first chunk takes the
        remainder): in a left-padded batch every row then sees the chunking it would see alone.

        ``evict=False`` records the statistics the policy needs but runs no eviction pass: the
        eviction pass that was due is left for later (`kvpolicy.integrations.hf.shared_prefill` forks many
        parameter rows from that point). ``last_only=True`` computes the logits of the last
        token only (``[batch, 1, vocab]``): a 2k-token prompt's full logits cost SmolLM2 a fifth
        of its forward pass."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.int64, torch.int32):
            raise ShapeError(
                f"feed takes integer input_ids [batch, tokens] with tokens >= 1; got {tuple(ids.shape)} {ids.dtype}"
            )
        ids = ids.to(self._attachment.model.device, torch.long)
        mask = None
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask)
            mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
            if mask.shape != ids.shape:
                raise ShapeError(f"attention_mask has shape {tuple(mask.shape)}; input_ids have {tuple(ids.shape)}")
            mask = mask.to(ids.device)
            if not self.cache.seen:  # a prompt: every row needs a token of its own
                check_rows_have_tokens(mask)
        return self._forward_chunks(
            "input_ids", ids, chunk_size, evict=evict, last_only=last_only, what="feed", mask=mask, align_end=align_end
        )

    def feed_embeds(
        self, inputs_embeds: torch.Tensor, chunk_size: int | None = None, *, evict: bool = True
    ) -> torch.Tensor:
        """Like `feed`, for a model driven by its own embeddings: ``inputs_embeds [batch, tokens,
        hidden]`` go through the model on the handle's cache (chunks of ``chunk_size``, eviction
        between them). Returns the last forward's logits ``[batch, chunk, vocab]`` for a causal LM,
        or its last hidden state ``[batch, chunk, hidden]`` for a base model (e.g. the `LlamaModel`
        of a Decision Transformer). Policies that need token ids cannot run on embeddings."""
        embeds = torch.as_tensor(inputs_embeds)
        hidden = self._attachment.config.hidden_size
        if embeds.dim() != 3 or embeds.shape[1] == 0 or embeds.shape[2] != hidden or not embeds.is_floating_point():
            raise ShapeError(
                f"feed_embeds takes floating inputs_embeds [batch, tokens, {hidden}] with tokens >= 1; "
                f"got {tuple(embeds.shape)} {embeds.dtype}"
            )
        embeds = embeds.to(self._attachment.model.device)
        return self._forward_chunks(
            "inputs_embeds", embeds, chunk_size, evict=evict, last_only=False, what="feed_embeds"
        )

    def _forward_chunks(
        self,
        key: str,
        inputs: torch.Tensor,
        chunk_size: int | None,
        *,
        evict: bool,
        last_only: bool,
        what: str,
        mask: torch.Tensor | None = None,
        align_end: bool = False,
    ) -> torch.Tensor:
        attachment = self._attachment
        if not attachment.active:
            raise AttachError(f"handle.{what} works only inside its `with policy.attach(model)` block")
        check_chunk_size(chunk_size)
        cache = self.cache
        if cache.seen and cache.layers and isinstance(cache.layers[0], EvictingLayer):
            batch = cache.layers[0].keys.shape[0] if cache.layers[0].keys is not None else inputs.shape[0]
            if batch != inputs.shape[0]:
                raise ShapeError(
                    f"the cache holds a batch of {batch}; {what} got {inputs.shape[0]} rows (call reset first)"
                )
        cache.prompt_end = cache.seen + inputs.shape[1]
        keyword = cache_keyword(attachment.model)
        result = None
        deferring = attachment.deferring
        attachment.deferring = deferring or not evict
        try:
            with torch.no_grad():
                extra = {"logits_to_keep": 1} if last_only else {}
                sizes = chunk_sizes(inputs.shape[1], chunk_size, align_end)
                masks = mask.split(sizes, dim=1) if mask is not None else itertools.repeat(None)
                for chunk, chunk_mask in zip(inputs.split(sizes, dim=1), masks, strict=False):
                    if chunk_mask is not None:
                        extra["attention_mask"] = chunk_mask
                    output = attachment.model(**{key: chunk}, use_cache=True, **{keyword: cache}, **extra)
                    result = output.logits if hasattr(output, "logits") else output.last_hidden_state
        finally:
            attachment.deferring = deferring
        return result

    def report(self, row: int | None = None) -> CacheReport:
        """Tokens seen, kept per layer and head, KV bytes stored vs a full cache, time in the policy.

        ``row=None``: the whole batch (kept averaged over rows); ``row=i``: batch row *i* alone,
        counting only its valid slots (what member *i* of a population evaluated as one batch kept).
        """
        return build_report(self.cache, self._attachment.notes, row)
