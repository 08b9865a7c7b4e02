"""The reference attention statistics: the straightforward computation the in-pass path is tested
against (`kvpolicy.testing.recompute` records them in a second pass over the scores).

Both are post-softmax attention averaged over each GQA group, so there is one value per KV head:

- `attention_rows`: rows of the newest queries over the cached tokens, for windowed features
  (NAMM's STFT, Cetin et al. 2024; SnapKV's observation window);
- `attention_columns`: attention each token received, summed over the queries of one forward
  call (H2O's heavy-hitter score, Zhang et al. 2023).

Chunks keep the float32 score tensor under ``max_elements``; the visibility of each query is the
production one (`kvpolicy.integrations.hf.attention.visibility`)."""

from __future__ import annotations

import torch

from kvpolicy.integrations.hf.attention import visibility

DEFAULT_MAX_ELEMENTS = 1 << 22


def _grouped_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """``[batch, kv_heads, group, queries, tokens]`` float32 scaled (and soft-capped) logits."""
    batch, heads, n_queries, head_dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.float().reshape(batch, kv_heads, heads // kv_heads, n_queries, head_dim)
    scores = torch.einsum("bkgqd,bktd->bkgqt", grouped, keys.float()) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def _chunk(batch: int, heads: int, tokens: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, batch * heads * tokens))


def attention_rows(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    scaling: float,
    softcap: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """``[batch, kv_heads, queries, tokens]`` attention rows; 0 where a token did not exist yet.

    ``queries [batch, heads, queries, head_dim]`` at ``query_positions [queries]`` or ``[batch,
    queries]`` (each row's own numbering in a left-padded batch; a padded query at -1 gets a zero
    row); ``keys [batch, kv_heads, tokens, head_dim]`` at ``key_positions [batch, kv_heads, tokens]``.
    """
    batch, heads, n_queries, _ = queries.shape
    kv_heads, tokens = keys.shape[1], keys.shape[2]
    step = _chunk(batch, heads, tokens, max_elements)
    rows = []
    for start in range(0, n_queries, step):
        part = queries[:, :, start : start + step]
        scores = _grouped_scores(part, keys, scaling, softcap)
        qpos = query_positions[..., start : start + step].to(keys.device)
        qpos = qpos[None, None, None, :, None] if qpos.dim() == 1 else qpos[:, None, None, :, None]
        hidden = (key_positions[:, :, None, None, :] > qpos) | (qpos < 0)
        if valid is not None:
            hidden = hidden | ~valid[:, :, None, None, :]
        scores = scores.masked_fill(hidden, float("-inf"))
        rows.append(torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(2))
    if not rows:
        return keys.new_zeros((batch, kv_heads, 0, tokens), dtype=torch.float32)
    return torch.cat(rows, dim=2)


def attention_columns(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    scaling: float,
    softcap: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """``[batch, kv_heads, tokens]`` attention each cached token received from this call's queries.

    ``keys`` hold the cached tokens followed by the ``queries``' own tokens (as transformers'
    `cache.update` appends and returns them); ``valid [batch, kv_heads, past]`` masks padded slots of the cached part.
    """
    batch, heads, n_queries, _ = queries.shape
    tokens = keys.shape[2]
    past = tokens - n_queries
    mask = visibility(past, n_queries, valid, keys.device)
    step = _chunk(batch, heads, tokens, max_elements)
    total = keys.new_zeros((batch, keys.shape[1], tokens), dtype=torch.float32)
    for start in range(0, n_queries, step):
        end = min(start + step, n_queries)
        visible = past + end  # tokens after the chunk's last query are masked anyway: skip them
        scores = _grouped_scores(queries[:, :, start:end], keys[:, :, :visible], scaling, softcap)
        part = mask[:, :, start:end, :visible]
        scores = scores.masked_fill(~part[:, :, None], float("-inf"))
        total[..., :visible] += torch.softmax(scores, dim=-1).mean(2).sum(2)
    return total
