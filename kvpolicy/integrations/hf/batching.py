"""Rows of different lengths as one left-padded batch (what ``tokenizer(..., padding=True,
padding_side='left')`` gives), for callers that hold token ids rather than text."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(rows: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask [batch, longest]`` of 1-D ``rows``, padded on the left."""
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, longest - len(row) :] = torch.as_tensor(row)
        mask[index, longest - len(row) :] = 1
    return ids, mask
