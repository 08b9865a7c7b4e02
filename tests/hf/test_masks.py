"""The mask trap: chunked prefill over an evicted cache must be causally masked. transformers
builds no mask for an attention name missing from `AttentionMaskInterface`; kvpolicy registers
one on attach, and its attention function refuses to run a chunk without a mask."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import streaming
from transformers.masking_utils import AttentionMaskInterface

from kvpolicy.errors import AttachError
from kvpolicy.integrations.hf.tiny import random_ids
from kvpolicy.testing.reference import feed_recorded, masked_recompute


def test_chunked_prefill_with_eviction_is_causally_masked(family_model):
    prompt = random_ids(1, 45, seed=10)
    with streaming(budget=9).attach(family_model) as handle:
        logits, records = feed_recorded(handle, prompt, chunk_size=8)
    assert (masked_recompute(family_model, prompt, records) - logits).abs().max() < 1e-4


def test_without_the_mask_function_chunks_are_refused(llama):
    prompt = random_ids(1, 30, seed=11)
    with streaming(budget=9).attach(llama) as handle:
        name = llama.config._attn_implementation
        assert name in AttentionMaskInterface._global_mapping
        handle.feed(prompt[:, :10])
        mask_function = AttentionMaskInterface._global_mapping.pop(name)
        try:
            with pytest.raises(AttachError, match="mask function"):
                handle.feed(prompt[:, 10:20])
        finally:
            AttentionMaskInterface.register(name, mask_function)


def test_single_token_steps_need_no_mask(llama):
    with streaming(budget=9).attach(llama) as handle:
        handle.feed(random_ids(1, 12, seed=12))
        logits = handle.feed(torch.tensor([[5]]))
    assert logits.shape == (1, 1, 256)
