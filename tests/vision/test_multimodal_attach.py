"""Attaching through transformers' vision-language classes as a user would: ``policy.attach(vlm)``
and ``policy.generate(vlm, inputs)`` with pixels. Keep-all is bit-identical to the bare model's
generate; an evicting policy scores and evicts image tokens like any others; a class kvpolicy
cannot drive is refused with a named error that says why."""

from __future__ import annotations

import pytest
import torch
from tiny_vlms import BUILDERS

import kvpolicy
from kvpolicy.errors import UnsupportedModelError

SUPPORTED = ("llava", "llava_next_video", "gemma3")


def _bare(model: torch.nn.Module, inputs: dict, **options) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, **options)


@pytest.mark.parametrize("family", SUPPORTED)
def test_keep_all_is_bit_identical_to_the_bare_model(family):
    model, inputs = BUILDERS[family]()
    bare = _bare(model, inputs, output_logits=True, return_dict_in_generate=True)
    result = kvpolicy.build("full").generate(
        model, inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(result.sequences, bare.sequences)
    with kvpolicy.build("full").attach(model):
        attached = _bare(model, inputs, output_logits=True, return_dict_in_generate=True)
    assert all(torch.equal(a, b) for a, b in zip(attached.logits, bare.logits, strict=True))
    assert result.report.seen == inputs["input_ids"].shape[1] + 5  # the last new token is never fed


@pytest.mark.parametrize("family", SUPPORTED)
def test_the_vision_tower_keeps_its_attention_and_everything_is_restored(family):
    model, inputs = BUILDERS[family]()
    before = {id(c): c._attn_implementation for c in (model.config, model.config.vision_config)}
    with kvpolicy.build("full").attach(model):
        assert model.config.vision_config._attn_implementation == "sdpa"
        assert model.config.get_text_config(decoder=True)._attn_implementation.startswith("kvpolicy_")
    after = {id(c): c._attn_implementation for c in (model.config, model.config.vision_config)}
    assert after == before
    assert model.config.get_text_config(decoder=True)._attn_implementation == "sdpa"


def test_image_tokens_are_scored_and_evicted_like_any_others():
    model, inputs = BUILDERS["llava"]()
    prompt = inputs["input_ids"].shape[1]
    policy = kvpolicy.build("h2o", budget=16, sinks=1, recent=2)
    with policy.attach(model) as handle:
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        report = handle.report()
        layer = handle.cache.layers[report.evicting_layers[-1]]
        kept = set(layer.positions[0].flatten().tolist())
    assert report.eviction_passes >= 1
    images = set((inputs["input_ids"][0] == 299).nonzero().flatten().tolist())
    assert images - kept, "some image tokens were evicted"
    assert images & kept, "and some kept: they compete on their scores"
    assert max(kept) >= prompt  # the generated tokens are in the cache too


def test_a_padded_batch_with_images_matches_the_bare_model():
    model, inputs = BUILDERS["llava"]()
    ids = inputs["input_ids"]
    short = ids[:, 3:]  # the same images, fewer text tokens: left-padded to the longer row
    batch = torch.cat([ids, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    pixels = torch.cat([inputs["pixel_values"], inputs["pixel_values"].flip(0)])
    padded = {"input_ids": batch, "attention_mask": mask, "pixel_values": pixels}
    bare = _bare(model, padded)
    result = kvpolicy.build("full").generate(model, padded, max_new_tokens=6, do_sample=False)
    assert torch.equal(result.sequences, bare)


def test_qwen2_vl_is_refused_with_the_reason():
    model, _ = BUILDERS["qwen2_vl"]()
    with pytest.raises(UnsupportedModelError, match="M-RoPE"):
        kvpolicy.build("full").attach(model)
