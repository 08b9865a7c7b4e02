"""The strategies draw what they promise: valid configs, causal attention rows, ascending positions."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvpolicy
from kvpolicy.testing import strategies as kst
from kvpolicy.types import Budget, Protection, Requirements, Schedule


@pytest.mark.parametrize("config_cls", [Budget, Schedule, Protection, Requirements])
def test_configs_are_valid_instances(config_cls):
    @given(kst.configs(config_cls))
    def body(config):
        assert isinstance(config, config_cls)
        assert attrs.evolve(config) == config  # validators accept it again

    body()


@given(st.data())
def test_every_registered_config_draws(data):
    registry = kvpolicy.default_registry()
    kind = data.draw(st.sampled_from(["extractor", "scorer", "selector", "optimizer"]))
    name = data.draw(st.sampled_from(registry.names(kind)))
    config = data.draw(kst.component_configs(kind, name, registry))
    assert isinstance(config, registry.spec(kind, name).config_cls)


@given(kst.layer_views())
def test_views_are_consistent(view):
    positions = view.positions
    assert (positions[..., 1:] > positions[..., :-1]).all(), "positions must ascend per head"
    assert int(positions.max()) == view.seen - 1, "the newest token is cached"
    assert view.keys.shape[:3] == positions.shape
    rows = view.attention
    assert rows.shape == (view.batch, view.kv_heads, len(view.query_positions), view.tokens)
    future = positions.unsqueeze(2) > view.query_positions.view(1, 1, -1, 1)
    assert (rows[future] == 0).all(), "a query never attends to a later token"
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:3]))
    assert (view.token_ids >= 0).all() and (view.accumulated_attention >= 0).all()


@given(kst.cache_contents())
def test_cache_contents_layouts(contents):
    shape = contents.shape
    assert contents.keys.shape == (shape.batch, shape.kv_heads, shape.tokens, shape.head_dim)
    assert contents.keys.dtype == shape.dtype == contents.values.dtype
    assert shape.query_heads % shape.kv_heads == 0


@given(kst.selector_inputs())
def test_selector_inputs_respect_policy_guarantees(inputs):
    assert inputs.budget.tokens is None or inputs.budget.tokens >= inputs.protect.minimum
    assert inputs.protected[..., -1].all(), "the newest token is always protected"
    assert not torch.isnan(inputs.scores).any()


@given(kst.policies())
def test_policies_build_from_every_preset(policy):
    assert isinstance(policy, kvpolicy.Policy)
    assert kvpolicy.Policy.from_json(policy.to_json()).config == policy.config
