"""KVzip on the real SmolLM2-135M-Instruct: at a quarter of the cache it keeps a needle that
SnapKV, at the same budget, loses (a 457-token needle item, answer greedy)."""

from __future__ import annotations

import functools

import pytest
import torch

import kvpolicy
from kvpolicy.prompts import needle_prompt

pytestmark = pytest.mark.real_model


@functools.cache
def _smollm2():
    from kvpolicy.models import load_model

    return load_model("smollm2-135m-instruct")


def test_kvzip_keeps_the_needle_at_a_quarter_of_the_cache():
    model, tokenizer = _smollm2()
    needle = needle_prompt(tokenizer, context_tokens=400, depth=0.5)
    inputs = dict(
        tokenizer.apply_chat_template(
            needle.messages(), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    )
    policy = kvpolicy.build("kvzip", budget="25%")
    policy.bind_tokenizer(tokenizer)
    with torch.inference_mode():
        result = policy.generate(model, inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(result.new_tokens[0], skip_special_tokens=True)
    assert result.report.eviction_passes == 1
    assert 0.2 < result.report.kept_fraction < 0.3
    assert needle.found(answer), answer
