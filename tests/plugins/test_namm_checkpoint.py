"""Saving and loading a NAMM: parameters, frozen STFT statistics and config in one file."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy import CheckpointError, Policy
from kvpolicy.checkpoint import write_policy_file
from kvpolicy.types import LayerView
from kvpolicy_plugins.stft import StftConfig, StftExtractor


def layer_view(seed: int) -> LayerView:
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(64).expand(1, 3, 64)
    query_positions = torch.arange(16, 64)
    hidden = positions[:, :, None, :] > query_positions.view(1, 1, -1, 1)
    logits = torch.randn(1, 3, 48, 64, generator=generator).masked_fill(hidden, float("-inf"))
    return LayerView(
        layer=0,
        num_layers=1,
        positions=positions,
        seen=64,
        attention=torch.softmax(logits, -1),
        query_positions=query_positions,
    )


def trained_namm(preset: str = "namm-bam") -> Policy:
    policy = kvpolicy.build(preset)
    policy.extractor.start_calibration()
    for seed in range(2):
        policy.plan(layer_view(seed))
    policy.extractor.freeze()
    policy.set_flat(torch.randn(policy.num_params, generator=torch.Generator().manual_seed(5)) * 0.2)
    return policy


@pytest.mark.parametrize("preset", ["namm-bam", "namm-mlp"])
def test_save_then_load_restores_parameters_statistics_and_scores(tmp_path, preset):
    policy = trained_namm(preset)
    path = tmp_path / "namm.safetensors"
    policy.save(path)
    loaded = Policy.load(path)
    assert loaded.to_json() == policy.to_json()
    assert torch.equal(loaded.get_flat(), policy.get_flat())
    for key, value in policy.extractor.state_dict().items():
        assert torch.equal(loaded.extractor.state_dict()[key], value), key
    assert loaded.extractor.calibrated and not loaded.extractor.calibrating
    original = policy.plan(layer_view(7))
    restored = loaded.plan(layer_view(7))
    assert torch.equal(original.indices, restored.indices)
    assert original.kept < 64  # the random parameters do evict, so the comparison means something


def test_a_corrupt_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Policy.load(path)


def test_a_truncated_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "namm.safetensors"
    trained_namm().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        Policy.load(path)


def test_parameters_that_do_not_match_the_config_are_a_checkpoint_error(tmp_path):
    policy = trained_namm()
    path = tmp_path / "namm.safetensors"
    write_policy_file(path, policy.to_json(), torch.zeros(100), {})
    with pytest.raises(CheckpointError, match="100 parameters"):
        Policy.load(path)


def test_statistics_for_another_stft_are_a_checkpoint_error(tmp_path):
    policy = trained_namm()
    # statistics of an STFT with n_fft 64 (33 bins) under this policy's n_fft 32 (17 bins); the
    # policy itself is consistent, so only the buffers can be what is wrong
    other = StftExtractor(StftConfig(n_fft=64, hop=32))
    other._accumulate(torch.rand(10, other.config.bins, dtype=torch.float64))
    path = tmp_path / "namm.safetensors"
    buffers = {f"extractor.{k}": v for k, v in other.state_dict().items()}
    write_policy_file(path, policy.to_json(), policy.get_flat(), buffers)
    with pytest.raises(CheckpointError, match="buffers of the extractor 'stft' do not match"):
        Policy.load(path)
