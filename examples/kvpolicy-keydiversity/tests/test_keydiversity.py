"""kvpolicy-keydiversity under kvpolicy's testing kit: the conformance matrix for what this
plugin registers, the cache state machine on its preset, and what the extractor computes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis.stateful import run_state_machine_as_test

import kvpolicy
from kvpolicy.testing import load_profile, parametrize_with_checks
from kvpolicy.testing import strategies as kst
from kvpolicy.testing.machine import cache_machine, machine_settings
from kvpolicy_keydiversity.plugin import KeyDiversityExtractor

load_profile()

OURS = {"extractor:key_diversity", "preset:key-diversity"}


def test_plugin_is_found_through_its_entry_point():
    registry = kvpolicy.Registry()
    assert "key_diversity" in registry.names("extractor")
    assert registry.preset("key-diversity").plugin == "keydiversity"


@parametrize_with_checks(select=lambda target: target.id in OURS)
def test_conformance(target, check):
    check(target)


def test_preset_under_the_cache_machine_on_two_families():
    drawn = kst.policies(presets=["key-diversity"])
    machine = cache_machine(drawn, families=("llama", "qwen2"))
    run_state_machine_as_test(machine, settings=machine_settings())


@given(kst.layer_views(kvpolicy.Requirements(keys=True), dtypes=(torch.float32,)))
def test_feature_is_one_minus_cosine_to_the_head_mean(view):
    features = KeyDiversityExtractor().extract(view)
    assert ((features >= -1e-5) & (features <= 2 + 1e-5)).all()
    mean = view.keys.float().mean(dim=2, keepdim=True)
    expected = 1 - torch.nn.functional.cosine_similarity(view.keys.float(), mean, dim=-1)
    torch.testing.assert_close(features[..., 0], expected)


def test_a_repeated_key_is_the_least_diverse():
    keys = torch.randn(1, 1, 6, 8)
    keys[0, 0, 1:] = keys[0, 0, 0] + 0.01 * torch.randn(5, 8)  # five near-copies of the first key...
    keys[0, 0, 3] = -keys[0, 0, 0]  # ...and one pointing the other way
    view = kvpolicy.LayerView(layer=0, num_layers=1, positions=torch.arange(6).view(1, 1, 6), seen=6, keys=keys)
    features = KeyDiversityExtractor().extract(view)[0, 0, :, 0]
    assert int(features.argmax()) == 3
