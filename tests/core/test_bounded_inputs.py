"""Sizes are bounded by what can fit, and a policy given as data states every field that matters:
a huge pooling kernel or DFT size is a named error (not a multi-gigabyte allocation), a kernel
wider than the cache pools exactly as one covering it, and a JSON spec without its schedule
names the missing field instead of silently evicting every 512 tokens."""

from __future__ import annotations

import json

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError
from kvpolicy.selection import MAX_KERNEL, pool_neighbours


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pooler": ("span", {"kernel": 10**8 + 1})}, "SpanPoolerConfig.kernel 100000001 is wider"),
        ({"pooler": ("span", {"kernel": MAX_KERNEL + 2})}, "wider than any cache"),
        ({"extractor": ("stft", {"n_fft": 2**16, "hop": 2**15})}, "n_fft must be at most 4096"),
        ({"extractor": ("stft", {"period": 2**30})}, "period must be at most"),
    ],
)
def test_sizes_past_what_can_fit_are_named_errors(overrides, message):
    base = "namm-bam" if "extractor" in overrides else "h2o"
    with pytest.raises(InvalidConfigError, match=message):
        kvpolicy.build(base, **({"budget": 16} if base == "h2o" else {}), **overrides)


def test_snapkv_and_vote_kernels_are_bounded_too():
    with pytest.raises(InvalidConfigError, match="kernel_size must be at most"):
        kvpolicy.build("snapkv", budget=16, scorer=("snapkv", {"kernel_size": 10**8 + 1}))
    with pytest.raises(InvalidConfigError, match="votes_kernels must be at most"):
        kvpolicy.Policy(("stft_votes", {"votes_kernels": [10**8 + 1]}), ("bam", {"features": 27}), "threshold")


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("tokens", [1, 2, 7, 40])
def test_a_kernel_wider_than_the_cache_pools_as_one_covering_it(mode, tokens):
    scores = torch.randn(2, 3, tokens, generator=torch.Generator().manual_seed(tokens))
    scores[0, 1, 0] = float("inf")
    padded = torch.zeros(2, 3, tokens, dtype=torch.bool)
    padded[1, 2, : tokens // 2] = True
    scores[padded] = float("-inf")
    covering = pool_neighbours(scores, 2 * tokens + 1, mode, padded)
    huge = pool_neighbours(scores, MAX_KERNEL, mode, padded)
    assert torch.equal(covering, huge)
    if mode == "max":  # every real token gets its head's maximum
        real_max = scores.masked_fill(padded, float("-inf")).clamp(max=torch.finfo(torch.float32).max).amax(-1)
        assert torch.equal(huge.masked_fill(padded, 0), real_max.unsqueeze(-1).expand_as(huge).masked_fill(padded, 0))


@pytest.mark.parametrize("field", ["schedule", "protect", "budget"])
def test_a_json_spec_without_a_field_that_matters_names_it(tmp_path, field):
    data = json.loads(kvpolicy.build("h2o", budget=64).to_json())
    del data[field]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidConfigError, match=f"policy config lacks {field}"):
        kvpolicy.build(str(path))
    with pytest.raises(InvalidConfigError, match=f"policy config lacks {field}"):
        kvpolicy.Policy.from_json(json.dumps(data))
