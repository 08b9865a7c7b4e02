"""Attention output and the statistics a policy declared, from one pass over the scores.

The fused sdpa kernel never returns its probabilities, so a policy that reads attention
(`kvpolicy.types.Requirements`) used to pay a second O(T²) pass after the forward. Here the
queries whose probabilities are needed are attended explicitly instead: one matmul for the
scores, one softmax, one matmul with the values for the output — the same work sdpa does — and
the statistics are read off the probabilities while they are in hand:

- ``rows``: the probabilities of the newest queries, averaged over each GQA group (one row per KV
  head), for windowed features (NAMM's spectrogram, SnapKV's votes, TOVA);
- ``columns``: the attention each token received from these queries, averaged over each GQA
  group and summed over the queries (H2O, FastGen).

GQA groups are attended as one matrix per KV head (queries of a group stacked), so keys and
values are never repeated and no full-size mask is built: cached tokens are masked only where
a head holds padded slots (``valid``), and causality only inside the chunk's own block. A padded
new token (the left padding of a batch row) is hidden from every other query and sees only
itself, so its row stays finite and no real token ever attends to it.
Queries are processed in chunks that keep the score tensor near ``max_elements`` values.

For float32 CPU tensors (padded new tokens aside) the same computation runs in kvpolicy's native
kernel (`kvpolicy.native.attend`), one chunk per thread at a time: the chain of small
operations below splits badly over threads. This module's code is its tested reference.
"""

from __future__ import annotations

import torch

from kvpolicy import native

#: Score values per query chunk: about 1 MiB of float32, so a chunk's scores stay in cache.
DEFAULT_MAX_ELEMENTS = 1 << 18
#: Queries per task of the native kernel (`kvpolicy.native`): within these bounds, measured equally
#: fast at 1k-4k tokens; fewer make each matmul too thin, more make too few tasks per thread.
NATIVE_MIN_CHUNK, NATIVE_MAX_CHUNK = 16, 64


def query_chunk(groups: int, tokens: int, max_elements: int) -> int:
    """Queries per chunk so that ``groups × chunk × tokens`` stays near ``max_elements`` (≥ 1)."""
    return max(1, max_elements // max(1, groups * tokens))


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    rows: int = 0,
    columns: bool = False,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention of the newest ``queries`` of a forward call, with their statistics.

    Parameters
    ----------
    query:
        ``[batch, heads, queries, head_dim]``: the last ``queries`` queries of the call.
    key, value:
        ``[batch, kv_heads, tokens, head_dim]``, every token of the layer after this call's
        append; the queries are the newest ``queries`` tokens, so the ``tokens - queries`` before
        them are visible to all (where valid) and the last ``queries`` causally.
    valid:
        ``[batch, kv_heads, tokens]`` bool, False at padded slots (cached or new); None if all valid.
    rows:
        How many of the newest queries' probability rows to return (0: none).
    columns:
        Whether to return the attention each token received from all ``queries``.

    Returns
    -------
    output ``[batch, queries, heads, head_dim]`` (transformers' layout), rows ``[batch, kv_heads,
    rows, tokens]`` float32 (0 for tokens newer than the query) or None, columns ``[batch,
    kv_heads, tokens]`` float32 or None.
    """
    batch, heads, queries, head_dim = query.shape
    kv_heads, tokens = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    before = tokens - queries  # tokens every one of these queries may see (padding aside)
    rows = min(rows, queries)
    padded_new = None if valid is None or bool(valid[:, :, before:].all()) else ~valid[:, :, before:]
    step = query_chunk(groups, tokens, max_elements)
    if padded_new is None and native.usable(query, key, value):
        chunk = min(max(step, NATIVE_MIN_CHUNK), NATIVE_MAX_CHUNK)
        return native.attend(
            query, key, value, valid, scaling=scaling, softcap=softcap, rows=rows, columns=columns, step=chunk
        )
    grouped = query.view(batch, kv_heads, groups, queries, head_dim)
    output = query.new_empty((batch, queries, heads, head_dim))
    out_grouped = output.view(batch, queries, kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4)
    row_out = key.new_empty((batch, kv_heads, rows, tokens), dtype=torch.float32) if rows else None
    col_out = key.new_zeros((batch, kv_heads, tokens), dtype=torch.float32) if columns else None
    hidden = None if valid is None else ~valid[:, :, None, :before]
    pre_scale = softcap is None
    precision = torch.promote_types(query.dtype, torch.float32)  # float32 at least, float64 for a float64 model
    causal_mask = torch.ones(min(step, queries), min(step, queries), dtype=torch.bool, device=query.device).triu_(1)
    for start in range(0, queries, step):
        stop = min(start + step, queries)
        size, visible = stop - start, before + stop  # keys after the chunk's last query: never seen
        part = grouped[:, :, :, start:stop]
        if pre_scale:
            part = part * scaling
        scores = torch.matmul(part.reshape(batch, kv_heads, groups * size, head_dim), key[:, :, :visible].mT)
        if not pre_scale:
            scores = torch.tanh(scores * (scaling / softcap)) * softcap
        if hidden is not None:
            scores[..., :before].masked_fill_(hidden, float("-inf"))
        block = scores.view(batch, kv_heads, groups, size, visible)[..., before + start : visible]
        block.masked_fill_(causal_mask[:size, :size], float("-inf"))
        if padded_new is not None:
            _hide_padded_new(scores.view(batch, kv_heads, groups, size, visible)[..., before:], padded_new, start)
        probabilities = torch.softmax(scores, dim=-1, dtype=precision)
        weights = probabilities if probabilities.dtype == value.dtype else probabilities.to(value.dtype)
        if probabilities.dtype != torch.float32:  # a float64 model: statistics stay float32
            probabilities = probabilities.float()
        attended = torch.matmul(weights, value[:, :, :visible])
        out_grouped[:, :, :, start:stop] = attended.view(batch, kv_heads, groups, size, head_dim)
        per_group = probabilities.view(batch, kv_heads, groups, size, visible)
        if col_out is not None:
            col_out[..., :visible] += per_group.sum(dim=(2, 3)).div_(groups)
        first_row = queries - rows
        if row_out is not None and stop > first_row:
            skip = max(0, first_row - start)
            written = row_out[:, :, start + skip - first_row : stop - first_row]
            torch.mean(per_group[:, :, :, skip:], dim=2, out=written[..., :visible])
            written[..., visible:].zero_()  # keys after the chunk: allocated empty, zeroed only here
    return output, row_out, col_out


def _hide_padded_new(scores: torch.Tensor, padded: torch.Tensor, start: int) -> None:
    """Mask the padded new tokens ``padded [batch, kv_heads, queries]`` in ``scores [batch,
    kv_heads, groups, size, start + size]`` (queries ``start..start+size`` over the new tokens up
    to the last of them), except each query's own token."""
    size = scores.shape[3]
    hidden = padded[:, :, None, None, : start + size].expand(-1, -1, 1, size, -1).clone()
    own = torch.arange(size, device=scores.device)
    hidden[:, :, 0, own, start + own] = False
    scores.masked_fill_(hidden, float("-inf"))
