"""Left-padded batches and the runs they must equal: each row alone, fed in the same forward calls.

A padded batch is exact when every row gives the tokens and logits it gives run on its own, fed
the real tokens of each forward call the batch made (a call that holds only a row's padding is
no call for it). `left_pad` builds such a batch from rows of different lengths; `feed_batch` and
`feed_row_alone` run it both ways, with greedy decoding after the prompt, so a test compares
their `GreedyRun`s.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from kvpolicy.integrations.hf.attach import cache_keyword
from kvpolicy.integrations.hf.batching import left_pad
from kvpolicy.types import CacheReport


@attrs.frozen(eq=False)
class GreedyRun:
    """``logits [batch, 1 + steps, vocab]``: of each row's last prompt token, then of each decoded
    token; ``tokens [batch, steps]`` decoded greedily; one `CacheReport` per row."""

    logits: torch.Tensor
    tokens: torch.Tensor
    reports: tuple[CacheReport, ...]


def _decode(handle: Any, logits: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    outs, tokens = [logits], []
    for _ in range(steps):
        token = outs[-1].argmax(-1, keepdim=True)
        tokens.append(token)
        outs.append(handle.feed(token)[:, -1])
    return outs, tokens


def feed_batch(
    policy: Any, model: Any, ids: torch.Tensor, mask: torch.Tensor, chunk_size: int, steps: int
) -> GreedyRun:
    """The padded batch through ``policy`` attached to ``model``: the prompt in chunks of
    ``chunk_size`` columns, then ``steps`` greedy tokens per row."""
    with policy.attach(model) as handle:
        last = handle.feed(ids, chunk_size, attention_mask=mask)[:, -1]
        outs, tokens = _decode(handle, last, steps)
        reports = tuple(handle.report(row=row) for row in range(ids.shape[0]))
    return GreedyRun(torch.stack(outs, 1), torch.cat(tokens, 1) if tokens else ids[:, :0], reports)


def feed_row_alone(
    policy: Any, model: Any, ids: torch.Tensor, mask: torch.Tensor, row: int, chunk_size: int, steps: int
) -> GreedyRun:
    """Batch row ``row`` on its own: its real tokens of each ``chunk_size``-column call of the
    batch, as one prompt, then ``steps`` greedy tokens."""
    columns = ids.shape[1]
    padding = columns - int(mask[row].sum())
    tokens = ids[row : row + 1, padding:].to(model.device)
    with policy.attach(model) as handle, torch.no_grad():
        cache = handle.cache
        cache.prompt_end = tokens.shape[1]  # the prompt ends with the batch's last call, as there
        keyword = cache_keyword(model)
        for start in range(0, columns, chunk_size):
            stop = start + chunk_size - padding
            if stop <= 0:
                continue
            part = tokens[:, max(start - padding, 0) : stop]
            last = model(input_ids=part, use_cache=True, **{keyword: cache}).logits[:, -1]
        outs, decoded = _decode(handle, last, steps)
        report = handle.report()
    return GreedyRun(torch.stack(outs, 1), torch.cat(decoded, 1) if decoded else tokens[:, :0], (report,))


__all__ = ["GreedyRun", "feed_batch", "feed_row_alone", "left_pad"]
