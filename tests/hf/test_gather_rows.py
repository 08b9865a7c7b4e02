"""`gather_tokens` moves whole token rows; it must give what `gather` along the tokens gives."""

from __future__ import annotations

import torch

from kvpolicy.integrations.hf.layer import expand_index, gather_tokens


def _reference(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return tensor.gather(2, expand_index(indices, tensor))


def test_rows_gathered_as_gather_does():
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 3, 11, 4, generator=generator)
    indices = torch.stack([torch.randperm(11, generator=generator)[:6].sort().values for _ in range(6)]).view(2, 3, 6)
    assert torch.equal(gather_tokens(keys, indices), _reference(keys, indices))
    strided = keys.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous: the gather path
    assert not strided.is_contiguous()
    assert torch.equal(gather_tokens(strided, indices), _reference(keys, indices))
    state = torch.randn(2, 3, 11, 2, 5, generator=generator)  # several trailing dimensions
    assert torch.equal(gather_tokens(state, indices), _reference(state, indices))
    flat = torch.randn(2, 3, 11, generator=generator)  # no trailing dimension
    assert torch.equal(gather_tokens(flat, indices), _reference(flat, indices))
    repeated = torch.zeros(2, 3, 4, dtype=torch.long)  # padded slots point at 0, several times
    assert torch.equal(gather_tokens(keys, repeated), _reference(keys, repeated))
