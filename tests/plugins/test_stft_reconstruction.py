"""The ``stft_reconstruction`` extractor: ``stft_votes`` features then KVzip's log reconstruction
attention and its max-pools. Its one-hot start keeps exactly what KVzip keeps (tiny random-weight
models, both protocols); any other read-out of the extra features changes the kept set."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError, KVPolicyError
from kvpolicy.evolve.search_space import parameter_layout
from kvpolicy.integrations.hf.tiny import byte_tokenizer, random_ids, tiny_model
from kvpolicy.types import LayerView
from kvpolicy_plugins.stft import StftVotesConfig, StftVotesExtractor
from kvpolicy_plugins.stft_reconstruction import (
    StftReconstructionConfig,
    StftReconstructionExtractor,
    kvzip_equivalent,
    kvzip_readout,
    self_sized_start,
)

KERNELS = (3, 7)
CONTEXT, QUESTION = 96, 16


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family, seed=0)


def _bound(policy: kvpolicy.Policy) -> kvpolicy.Policy:
    policy.bind_tokenizer(byte_tokenizer())
    return policy


def kvzip(budget) -> kvpolicy.Policy:
    return _bound(kvpolicy.build("kvzip", budget=budget))


def start(budget, readout: dict[int, float] | None = None) -> kvpolicy.Policy:
    """The KVzip-equivalent start; ``readout`` replaces BAM's read-out by these index → weight."""
    policy = _bound(kvzip_equivalent(budget, kernels=KERNELS))
    if readout is not None:
        flat = policy.get_flat()
        w_s = torch.zeros(policy.extractor.num_features)
        for index, weight in readout.items():
            w_s[index] = weight
        flat[parameter_layout(policy)["scorer.w_s"]] = w_s
        policy.set_flat(flat)
    return policy


def kept_after_prompt(policy: kvpolicy.Policy, model, ids: torch.Tensor) -> list[list[list[int]]]:
    """Every managed layer's kept positions per head after the whole prompt (one eviction pass)."""
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.feed(ids)
        cache = handle.cache
        assert handle.report().eviction_passes == 1 and handle.report().kept_fraction < 0.5
    return [
        [sorted(p for p in head.tolist() if p >= 0) for head in cache.layers[i].positions[0]] for i in cache.managed
    ]


def kept_context_first(policy: kvpolicy.Policy, model, ids: torch.Tensor) -> list[list[list[int]]]:
    """The context positions each head keeps when the context is compressed before the question."""
    with torch.inference_mode(), policy.attach(model) as handle:
        model.generate(ids, context_end=CONTEXT, max_new_tokens=2)
        cache = handle.cache
        assert cache.sealed and cache.eviction_passes == 1
    return [
        [sorted(p for p in head.tolist() if 0 <= p < CONTEXT) for head in cache.layers[i].positions[0]]
        for i in cache.managed
    ]


def _prompt(seed: int) -> torch.Tensor:
    return torch.cat([random_ids(1, CONTEXT, seed=seed), random_ids(1, QUESTION, seed=seed + 100)], 1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("budget", [12, "25%"])
def test_the_one_hot_start_keeps_what_kvzip_keeps(family, budget):
    model, ids = _model(family), _prompt(seed=1)
    want = kept_after_prompt(kvzip(budget), model, ids)
    assert kept_after_prompt(start(budget), model, ids) == want
    assert kept_context_first(start(budget), model, ids) == kept_context_first(kvzip(budget), model, ids)


def test_the_start_keeps_what_kvzip_keeps_through_a_shared_prefill():
    from kvpolicy.integrations.hf.shared_prefill import fork, prefill

    model, ids = _model("llama"), random_ids(1, 80, seed=2)
    want = kept_after_prompt(kvzip(16), model, ids)
    policy = start(16)
    with fork(prefill(policy, model, ids), policy, model, rows=1) as handle:
        cache = handle.cache
        got = [[sorted(p for p in h.tolist() if p >= 0) for h in cache.layers[i].positions[0]] for i in cache.managed]
    assert got == want


@pytest.mark.parametrize(
    "readout",
    [
        {28: 1.0, 25: 1.0},  # log reconstruction + log votes: the votes are live
        {29: 1.0},  # the log reconstruction max-pooled over 3 tokens
        {28: 1.0, 0: 20.0},  # + a recency feature
    ],
)
def test_other_read_outs_change_the_kept_set(readout):
    model, ids = _model("llama"), _prompt(seed=3)
    assert start(12).extractor.config.reconstruction_index == 28  # 25 spectrogram + recency, votes, 2 pools
    assert kept_after_prompt(start(12, readout), model, ids) != kept_after_prompt(start(12), model, ids)


def _view(tokens: int = 40, padded: bool = False) -> LayerView:
    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(2, 2, tokens, tokens, generator=generator).tril()
    positions = torch.arange(tokens).view(1, 1, -1).expand(2, 2, -1).clone()
    received = torch.rand(2, 2, tokens, generator=generator)
    if padded:  # row 1, head 0 holds fewer tokens: its last slots are padding
        positions[1, 0, -5:] = -1
        received[1, 0, -5:] = 0.0
    return LayerView(
        layer=0,
        num_layers=1,
        positions=positions,
        seen=tokens,
        attention=attention,
        query_positions=torch.arange(tokens),
        reconstruction_attention=received,
    )


@pytest.mark.parametrize("padded", [False, True])
def test_feature_layout(padded):
    config = StftReconstructionConfig(period=64, votes_kernels=(3,), reconstruction_kernels=KERNELS)
    votes_config = StftVotesConfig(period=64, votes_kernels=(3,))
    assert config.num_features == votes_config.num_features + 1 + len(KERNELS) == 30
    extractor = StftReconstructionExtractor(config)
    assert extractor.num_features == config.num_features
    features = extractor.extract(_view(padded=padded))
    assert features.shape == (2, 2, 40, config.num_features)
    torch.testing.assert_close(features[..., :27], StftVotesExtractor(votes_config).extract(_view(padded=padded)))
    logs = torch.log(_view(padded=padded).reconstruction_attention + config.reconstruction_eps)
    torch.testing.assert_close(features[..., 27], logs)
    real = _view(padded=padded).positions >= 0
    for column, kernel in zip((28, 29), KERNELS, strict=True):
        pooled = torch.nn.functional.max_pool1d(logs.masked_fill(~real, float("-inf")), kernel, 1, kernel // 2)
        torch.testing.assert_close(features[..., column][real], pooled[real])
        assert bool((features[..., column][~real] == 0).all())
        assert bool((features[..., column] >= features[..., 27] - 1e-6)[real].all())


def test_requirements_are_the_union_and_the_repeat_prompt_is_bound():
    extractor = StftReconstructionExtractor(StftReconstructionConfig(period=64))
    requirements = extractor.requirements
    assert requirements.reconstruction and requirements.token_ids and requirements.attention_window == 64
    with pytest.raises(KVPolicyError, match="bind_tokenizer"):
        extractor.repeat_prompt()
    extractor.bind_tokenizer(byte_tokenizer())
    kvzip_prompt = kvzip(8).repeat_prompt()
    assert extractor.repeat_prompt() == kvzip_prompt
    view = _view()
    view.reconstruction_attention = None
    with pytest.raises(KVPolicyError, match="reconstruction_attention"):
        extractor.extract(view)


def test_readout_is_one_hot_on_the_unpooled_reconstruction():
    config = StftReconstructionConfig(votes_kernels=(7, 15, 31, 63), reconstruction_kernels=(7, 15, 31, 63))
    readout = kvzip_readout(config)
    assert len(readout) == config.num_features == 35
    assert readout.index(1.0) == 30 and sum(readout) == 1.0


@pytest.mark.parametrize("bad", [[4], [1], [0], ["7"], [True], [10**8 + 1]])
def test_a_bad_kernel_is_a_named_config_error(bad):
    with pytest.raises(InvalidConfigError, match="reconstruction_kernels"):
        StftReconstructionConfig(reconstruction_kernels=bad)
    with pytest.raises(InvalidConfigError, match="reconstruction_kernels"):
        kvpolicy.Policy(("stft_reconstruction", {"reconstruction_kernels": bad}), ("bam", {"features": 28}), "top_k",
                        budget="25%", schedule=kvpolicy.Schedule("after_prefill"))  # fmt: skip


def test_registered_and_refuses_a_schedule_evicting_mid_prompt():
    assert "stft_reconstruction" in kvpolicy.registry.default_registry().names("extractor")
    with pytest.raises(InvalidConfigError, match="after_prefill"):
        kvpolicy.Policy("stft_reconstruction", ("bam", {"features": 27}), "top_k", budget="25%")


def _self_sized_start(bias: float) -> kvpolicy.Policy:
    return _bound(self_sized_start(bias, kernels=KERNELS))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_global_threshold_preset_keeps_what_the_self_sized_start_keeps_at_its_bias(family):
    """``kvzip-threshold`` (a hand-made rule) is the untrained self-sized NAMM at b_s = 3.85."""
    model = _model(family)
    ids = _prompt(7)
    rule = kept_context_first(_bound(kvpolicy.build("kvzip-threshold")), model, ids)
    assert rule == kept_context_first(_self_sized_start(3.85), model, ids)
    counts = [len(head) for layer in rule for head in layer]
    assert 0 < min(counts) and max(counts) < CONTEXT and len(set(counts)) > 1  # evicts, sized per head
    assert rule != kept_context_first(_self_sized_start(2.0), model, ids)  # the bias matters


def test_the_shipped_self_sized_namm_is_its_evolution_runs_best_mean():
    shipped = kvpolicy.build("namm-threshold-smollm2")
    result = Path(__file__).parents[2] / "docs" / "namm-context-first" / "threshold" / "result.safetensors"
    evolved = kvpolicy.Policy.load(result)
    assert torch.equal(shipped.get_flat(), evolved.get_flat())
    assert _without_repeat_ids(shipped) == _without_repeat_ids(evolved)
    assert shipped.selector.config.per_head and not shipped.needs_budget


def _without_repeat_ids(policy: kvpolicy.Policy) -> dict:
    """The config without the repeat prompt's token ids, which `bind_tokenizer` fills in."""
    config = policy.config.to_dict()
    for key in ("first_ids", "later_ids", "suffix_ids"):
        config["extractor"]["config"].pop(key)
    return config
