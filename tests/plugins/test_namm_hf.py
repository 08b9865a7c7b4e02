"""NAMM end to end through the Hugging Face integration: tiny random-weight Llama for the fast
checks, real SmolLM2 (``real_model``) for the ones the mission names."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy import calibrate
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model
from kvpolicy.testing.reference import feed_recorded, masked_recompute

PAPER_SIGMA = 0.065  # CMA-ES initial step size of the paper: a plausible first-generation member


def random_member(policy, seed: int, scale: float = PAPER_SIGMA) -> torch.Tensor:
    return torch.randn(policy.num_params, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


def test_zero_namm_generates_exactly_like_no_policy_tiny(tiny):
    ids = random_ids(1, 300, seed=3)
    plain = tiny.generate(ids, max_new_tokens=12, do_sample=False)
    result = kvpolicy.build("namm-bam", every=64).generate(
        tiny, ids, max_new_tokens=12, do_sample=False, prefill_chunk_size=64
    )
    assert torch.equal(result.sequences, plain)
    assert result.report.eviction_passes >= 4 and result.report.kept_fraction == 1.0


@pytest.mark.parametrize("preset", ["namm-bam", "namm-mlp"])
def test_random_namm_evicts_and_stays_exact_wrt_the_kept_cache_tiny(tiny, preset):
    policy = kvpolicy.build(preset, every=64)
    policy.set_flat(random_member(policy, seed=1, scale=0.3))
    ids = random_ids(1, 460, seed=4)
    with policy.attach(tiny) as handle:
        prompt_logits, records = feed_recorded(handle, ids[:, :400], chunk_size=64)
        # decoding one token at a time; the 7th eviction pass falls due on the way, after token 448
        step_logits, steps = feed_recorded(handle, ids[:, 400:], chunk_size=1)
        report = handle.report()
    assert report.kept_fraction < 1.0 and report.eviction_passes == 7
    logits = torch.cat([prompt_logits, step_logits], dim=1)
    torch.testing.assert_close(logits, masked_recompute(tiny, ids, records + steps), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # eviction changed the outcome: the comparison is not vacuous
        assert (tiny(ids).logits - logits).abs().max() > 1e-3


def test_calibrate_collects_statistics_with_the_zero_policy_and_restores_parameters(tiny):
    policy = kvpolicy.build("namm-bam", every=64)
    member = random_member(policy, seed=2)
    policy.set_flat(member)
    runs = calibrate(policy, tiny, [random_ids(1, 200, seed=s) for s in range(2)], prefill_chunk_size=64)
    stats = policy.extractor.state_dict()
    assert runs == 2 and policy.extractor.calibrated and not policy.extractor.calibrating
    assert stats["count"].item() > 0 and bool((stats["var"] > 0).all())
    assert torch.equal(policy.get_flat(), member)


# --------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from kvpolicy.data import essays
    from kvpolicy.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    ids = tokenizer(essays()[0][1], return_tensors="pt").input_ids[:, :608]
    assert ids.shape[1] == 608
    return model, ids


@pytest.mark.real_model
def test_zero_namm_on_smollm2_gives_the_same_output_as_no_policy(smollm2):
    model, ids = smollm2
    ids = ids[:, :600]
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)
    # the preset's period halved (256) to halve the test's time; the claim holds for any period
    policy = kvpolicy.build("namm-bam", every=256)
    result = policy.generate(model, ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=256)
    assert torch.equal(result.sequences, plain)
    assert result.report.eviction_passes == 2  # after 256 and 512 prompt tokens: the scorer did run
    assert result.report.kept_fraction == 1.0


@pytest.mark.real_model
def test_random_namm_on_smollm2_evicts_exactly_and_reports_each_layer(smollm2):
    model, ids = smollm2
    policy = kvpolicy.build("namm-bam", every=256)
    policy.set_flat(random_member(policy, seed=0))
    with policy.attach(model) as handle:
        prompt_logits, records = feed_recorded(handle, ids[:, :600], chunk_size=256)
        step_logits, steps = feed_recorded(handle, ids[:, 600:], chunk_size=1)  # decoding, teacher-forced
        report = handle.report()
    logits = torch.cat([prompt_logits, step_logits], dim=1)
    fractions = report.per_layer_fraction
    assert len(fractions) == 30 and report.eviction_passes == 2
    assert all(0.0 < f < 1.0 for f in fractions), fractions
    assert len(set(round(f, 3) for f in fractions)) > 1  # retention is emergent, per layer
    # every query saw exactly the tokens its layer and head still held: equal to a masked full forward
    torch.testing.assert_close(logits, masked_recompute(model, ids, records + steps), atol=5e-4, rtol=1e-4)


def test_namm_masks_match_the_cache_after_evictions_past_4k_tokens(tiny):
    """A published reproduction of NAMM's code reports attention collapsing to uniform after
    ~2.3k tokens because a mask was sliced to the wrong length. Here every query of a 4.1k-token
    run (prefill in 512-token chunks, NAMM evicting every 512, then decoding) sees exactly what
    its layer and head kept: logits equal a full recompute with that mask (any mask that does not
    match the cache's length would change them), and the cache really is shorter than the run."""
    policy = kvpolicy.build("namm-bam", every=512)
    policy.set_flat(random_member(policy, seed=5, scale=0.3))
    ids = random_ids(1, 4104, seed=6)
    with policy.attach(tiny) as handle:
        prompt_logits, records = feed_recorded(handle, ids[:, :4096], chunk_size=512)
        step_logits, steps = feed_recorded(handle, ids[:, 4096:], chunk_size=1)
        report = handle.report()
    assert report.eviction_passes >= 8 and report.kept_fraction < 0.9
    assert all(max(heads) < 4104 for heads in (report.kept[i] for i in report.evicting_layers))
    logits = torch.cat([prompt_logits, step_logits], dim=1)
    torch.testing.assert_close(logits, masked_recompute(tiny, ids, records + steps), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # eviction changed the outcome: the comparison is not vacuous
        assert (tiny(ids).logits - logits).abs().max() > 1e-3
