"""Pooled votes as features: a scorer can weigh spans of several widths, and a one-hot scorer on
one width ranks tokens exactly as the raw votes pooled by the policy's ``span`` do."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError
from kvpolicy.evolve.search_space import parameter_layout
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model
from kvpolicy.types import LayerView, Schedule


def votes_policy(kernels: tuple[int, ...], one_hot: int, span: int) -> kvpolicy.Policy:
    features = 26 + len(kernels)
    policy = kvpolicy.Policy(
        ("stft_votes", {"period": 64, "votes_kernels": list(kernels)}),
        ("bam", {"features": features}),
        "top_k",
        budget="25%",
        schedule=Schedule("after_prefill"),
        span=span,
        recent=8,
    )
    flat = torch.zeros(policy.num_params)
    w_s = torch.zeros(features)
    w_s[one_hot] = 1.0
    flat[parameter_layout(policy)["scorer.w_s"]] = w_s
    policy.set_flat(flat)
    return policy


def run(policy: kvpolicy.Policy, model, prompt: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.reset()
        logits = handle.feed(prompt, chunk_size=96)
        logits = torch.cat([logits, handle.feed(prompt[:, :4])], 1)
        kept = [layer.positions.clone() for layer in handle.cache.layers]
        assert handle.report().kept_fraction < 0.5  # really evicts
    return logits, kept


@pytest.mark.parametrize("kernel", [5, 15])
def test_one_hot_on_a_pooled_width_equals_the_policy_span(kernel):
    model = tiny_model("llama")
    prompt = random_ids(1, 260, seed=5)
    spanned = votes_policy((), one_hot=25, span=kernel)
    pooled = votes_policy((3, kernel), one_hot=27, span=1)
    want_logits, want_kept = run(spanned, model, prompt)
    got_logits, got_kept = run(pooled, model, prompt)
    for want, got in zip(want_kept, got_kept, strict=True):
        assert torch.equal(want, got)
    torch.testing.assert_close(got_logits, want_logits, atol=0, rtol=0)


def test_each_width_adds_one_feature_that_never_lowers_the_votes():
    extractor = votes_policy((3, 7), one_hot=25, span=1).extractor
    tokens, queries = 40, 40
    attention = torch.rand(1, 2, queries, tokens, generator=torch.Generator().manual_seed(0)).tril()
    positions = torch.arange(tokens).view(1, 1, -1).expand(1, 2, -1)
    view = LayerView(
        layer=0,
        num_layers=1,
        positions=positions,
        seen=tokens,
        attention=attention,
        query_positions=torch.arange(queries),
    )
    features = extractor.extract(view)
    assert features.shape == (1, 2, tokens, 28)
    votes = features[..., 25]
    assert (features[..., 26:] >= votes.unsqueeze(-1)).all()
    torch.testing.assert_close(features[..., 26], torch.nn.functional.max_pool1d(votes, 3, 1, 1))


@pytest.mark.parametrize("bad", [[4], [1], [0], ["7"]])
def test_kernels_must_be_odd_widths(bad):
    with pytest.raises(InvalidConfigError, match="votes_kernels"):
        kvpolicy.Policy(("stft_votes", {"votes_kernels": bad}), ("bam", {"features": 27}), "top_k", budget="25%")
