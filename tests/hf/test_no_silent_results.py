"""Nothing silently wrong at generate time: ``use_cache=False`` runs exactly as the bare model and
the report says the policy did nothing; a ratio budget that protection overrides is noted in the
report and warned about."""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_helpers import streaming
from transformers import GenerationConfig

import kvpolicy
from kvpolicy.errors import AttachError, BudgetOverriddenWarning, KVPolicyWarning
from kvpolicy.integrations.hf.tiny import random_ids

NEW = 5


def _bare_logits(model, prompt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = model.generate(
        input_ids=prompt, max_new_tokens=NEW, do_sample=False, use_cache=False, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    return out.logits


@pytest.mark.parametrize("policy_name", ["full", "evicting"])
@pytest.mark.parametrize("how", ["keyword", "generation_config"])
def test_use_cache_false_inside_attach_is_exact_and_reported(llama, policy_name, how):
    prompt = random_ids(1, 24, seed=3)
    bare = _bare_logits(llama, prompt)
    policy = kvpolicy.build("full") if policy_name == "full" else streaming(budget=8)
    options = (
        {"use_cache": False}
        if how == "keyword"
        else {"generation_config": GenerationConfig(use_cache=False, max_new_tokens=NEW, do_sample=False)}
    )
    with policy.attach(llama) as handle:
        out = llama.generate(
            input_ids=prompt, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True,
            **options,
        )  # fmt: skip
        report = handle.report()
    assert all(torch.equal(a, b) for a, b in zip(out.logits, bare, strict=True))
    assert report.eviction_passes == 0 and report.seen == 0
    assert any("use_cache=False" in note and "evicted nothing" in note for note in report.notes)


def test_policy_generate_with_use_cache_false_is_exact(llama):
    prompt = random_ids(1, 24, seed=4)
    bare = llama.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False, use_cache=False)
    result = streaming(budget=8).generate(
        llama, {"input_ids": prompt}, max_new_tokens=NEW, do_sample=False, use_cache=False
    )
    assert torch.equal(result.sequences, bare)
    assert any("use_cache=False" in note for note in result.report.notes)


def test_cached_generate_after_an_uncached_one_drops_the_note(llama):
    prompt = random_ids(1, 24, seed=5)
    with streaming(budget=8).attach(llama) as handle:
        llama.generate(input_ids=prompt, max_new_tokens=2, do_sample=False, use_cache=False)
        llama.generate(input_ids=prompt, max_new_tokens=2, do_sample=False)
        report = handle.report()
    assert report.eviction_passes > 0
    assert not any("use_cache=False" in note for note in report.notes)


def test_forward_with_the_policy_cache_and_use_cache_false_is_refused(llama):
    prompt = random_ids(1, 12, seed=6)
    with kvpolicy.build("full").attach(llama) as handle:
        with pytest.raises(AttachError, match="use_cache=False"):
            llama(input_ids=prompt, use_cache=False, past_key_values=handle.cache)
        with pytest.raises(AttachError, match="use_cache=False and a cache"):
            llama.generate(input_ids=prompt, max_new_tokens=2, use_cache=False, past_key_values=handle.cache)


def test_ratio_budget_overridden_by_protection_is_noted_and_warned(llama):
    prompt = random_ids(1, 128, seed=7)
    policy = kvpolicy.build("streaming_llm", budget="25%", sinks=1000)
    with pytest.warns(
        BudgetOverriddenWarning, match=r"budget 25% of 130 tokens is 32 per head.*protects 130"
    ) as caught:
        result = policy.generate(llama, {"input_ids": prompt}, max_new_tokens=3, do_sample=False)
    assert issubclass(caught[0].category, KVPolicyWarning)
    assert result.report.kept_fraction == 1.0
    assert any("protection wins, so the cache keeps 100% instead of 25%" in note for note in result.report.notes)


def test_ratio_budget_that_holds_says_nothing(llama):
    prompt = random_ids(1, 128, seed=7)
    policy = kvpolicy.build("streaming_llm", budget="25%", sinks=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KVPolicyWarning)
        result = policy.generate(llama, {"input_ids": prompt}, max_new_tokens=3, do_sample=False)
    assert result.report.kept_fraction < 0.3
    assert not any("protection wins" in note for note in result.report.notes)
