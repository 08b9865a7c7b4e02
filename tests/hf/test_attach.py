"""Attaching and detaching: the model is restored exactly; misuse gets clear kvpolicy errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_helpers import streaming
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

import kvpolicy
from kvpolicy.errors import AttachError, ShapeError, UnsupportedModelError, UnsupportedPaddingError
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model


def _snapshot(model):
    return (
        model.config.to_dict(),
        model.config._attn_implementation,
        sorted(model.__dict__),
        len(model._forward_pre_hooks),
        len(model._forward_hooks),
        sorted(AttentionInterface._global_mapping),
        sorted(AttentionMaskInterface._global_mapping),
    )


def test_detach_restores_the_model_exactly(gemma3):
    before = _snapshot(gemma3)
    ids = random_ids(1, 20, seed=13)
    with torch.no_grad():
        plain = gemma3(ids).logits
    with streaming(budget=6).attach(gemma3) as handle:
        assert gemma3.config._attn_implementation.startswith("kvpolicy_")
        gemma3.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        handle.feed(ids)
    assert _snapshot(gemma3) == before
    with torch.no_grad():
        assert torch.equal(gemma3(ids).logits, plain)


def test_detach_after_an_error_inside_the_block(llama):
    before = _snapshot(llama)
    with pytest.raises(RuntimeError, match="boom"), kvpolicy.build("full").attach(llama):
        raise RuntimeError("boom")
    assert _snapshot(llama) == before


def test_second_policy_on_the_same_model_is_refused(llama):
    with kvpolicy.build("full").attach(llama):
        with pytest.raises(AttachError, match="already attached"), streaming(8).attach(llama):
            pass
        assert llama.config._attn_implementation.startswith("kvpolicy_")  # the first one is untouched
    with streaming(8).attach(llama):  # and free again afterwards
        pass


def test_two_models_can_carry_policies_at_once():
    first, second = tiny_model("llama", seed=1), tiny_model("qwen2", seed=2)
    ids = random_ids(1, 16)
    with streaming(6).attach(first) as a, kvpolicy.build("full").attach(second) as b:
        a.feed(ids)
        b.feed(ids)
        assert a.report().kept[0][0] == 6 and b.report().kept[0][0] == 16


def test_unsupported_family_lists_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="supported families: Llama"):
        kvpolicy.build("full").attach(model)


def test_unsupported_attention_implementation(llama):
    model = copy.deepcopy(llama)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="sdpa"), kvpolicy.build("full").attach(model):
        pass
    assert model.config._attn_implementation == "flex_attention"


def test_eager_models_are_supported_and_exact():
    model = tiny_model("llama", attn_implementation="eager")
    ids = random_ids(1, 18)
    with torch.no_grad():
        plain = model(ids).logits
    with kvpolicy.build("full").attach(model) as handle:
        assert torch.equal(handle.feed(ids), plain)


@pytest.mark.parametrize("hole", [slice(7, 10), slice(4, 6)], ids=["right padding", "hole"])
def test_padding_after_a_rows_first_token_is_refused_by_name(llama, hole):
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, hole] = 0
    with streaming(8).attach(llama), pytest.raises(UnsupportedPaddingError, match="batch row 1 .*padding_side='left'"):
        llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_padding_in_a_later_call_of_a_started_row_is_refused(llama):
    """A row that already holds tokens cannot be padded again (that would be a hole)."""
    ids = random_ids(2, 6)
    with streaming(8).attach(llama) as handle:
        handle.feed(ids)
        with pytest.raises(UnsupportedPaddingError, match="batch row 0"):
            handle.feed(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))


def test_unpadded_mask_and_batches_work(llama):
    ids = random_ids(3, 12)
    result = streaming(8).generate(llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens=3)
    assert result.new_tokens.shape == (3, 3)


def test_misuse_errors(llama):
    policy = streaming(8)
    with policy.attach(llama) as handle:
        with pytest.raises(ShapeError, match="integer input_ids"):
            handle.feed(torch.zeros(1, 3))
        with pytest.raises(UnsupportedModelError, match="beam search"):
            llama.generate(input_ids=random_ids(1, 5), num_beams=2, max_new_tokens=2)
        handle.feed(random_ids(1, 5))
        with pytest.raises(AttachError, match="already holds tokens"):
            llama.generate(input_ids=random_ids(1, 5), cache=handle.cache, max_new_tokens=2)
    with pytest.raises(AttachError, match="inside its"):
        handle.feed(random_ids(1, 5))
