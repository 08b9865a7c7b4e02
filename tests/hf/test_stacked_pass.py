"""The layers due at one step planned as one stacked pass leave every layer exactly as its own
pass would: the same tokens, keys, values, counters and outputs; what cannot stack runs alone."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
import kvpolicy.integrations.hf.stacked_pass as stacked
from kvpolicy import Budget, ComponentRef, PolicyConfig, Schedule
from kvpolicy.errors import InvalidSelectionError
from kvpolicy.integrations.hf.layer import EvictingLayer
from kvpolicy.integrations.hf.tiny import random_ids
from kvpolicy.registry import Registry
from kvpolicy.types import Selection
from kvpolicy_plugins.selectors import TopKSelector


def _decode(model, policy, ids, together: bool, steps: int = 12, mask=None):
    """Prefill ``ids`` in chunks of 16, then ``steps`` greedy tokens; the managed layers' state after."""
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.reset()
        handle.cache.plan_layers_together = together
        logits = handle.feed(ids, chunk_size=16, attention_mask=mask, last_only=True)
        tokens = []
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            logits = handle.feed(token, last_only=True)
        layers = [layer for layer in handle.cache.layers if isinstance(layer, EvictingLayer)]
        kept = [
            (layer.positions.clone(), layer.keys.clone(), layer.values.clone(), layer.row_passes.clone())
            for layer in layers
        ]
        return torch.cat(tokens, 1), logits.clone(), kept


def _count_stacks(monkeypatch) -> dict[str, int]:
    counts = {"stacks": 0}
    run = stacked._run_stack

    def counted(*args):
        done = run(*args)
        counts["stacks"] += int(done)
        return done

    monkeypatch.setattr(stacked, "_run_stack", counted)
    return counts


@pytest.mark.parametrize("preset", ["tova", "tova-span", "streaming_llm", "h2o", "h2o-span"])
@pytest.mark.parametrize("rows", [1, 2])
def test_stacked_passes_leave_every_layer_as_its_own_pass_would(llama, monkeypatch, preset, rows):
    counts = _count_stacks(monkeypatch)
    ids = random_ids(rows, 120, seed=3)  # past streaming_llm's 64 tokens of slack
    policy = kvpolicy.build(preset, budget=24)
    assert policy.plans_layers_together
    alone = _decode(llama, policy, ids, together=False)
    assert counts["stacks"] == 0
    together = _decode(llama, policy, ids, together=True)
    assert counts["stacks"] > 0  # the stacked path really ran
    assert torch.equal(alone[0], together[0]) and torch.equal(alone[1], together[1])
    for (positions, keys, values, passes), (positions2, keys2, values2, passes2) in zip(
        alone[2], together[2], strict=True
    ):
        assert torch.equal(positions, positions2)
        assert torch.equal(keys, keys2) and torch.equal(values, values2)
        assert torch.equal(passes, passes2)


def test_a_padded_batch_runs_layer_by_layer_with_the_same_result(llama, monkeypatch):
    counts = _count_stacks(monkeypatch)
    ids = random_ids(2, 60, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # row 1 is 9 tokens shorter, left-padded
    policy = kvpolicy.build("tova", budget=24)
    alone = _decode(llama, policy, ids, together=False, mask=mask)
    together = _decode(llama, policy, ids, together=True, mask=mask)
    assert torch.equal(alone[0], together[0])
    for first, second in zip(alone[2], together[2], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert counts["stacks"] == 0  # the rows have seen different counts: each layer plans them apart


def test_only_policies_whose_every_component_declares_it_stack():
    assert kvpolicy.build("tova").plans_layers_together
    assert not kvpolicy.build("random", budget=16).plans_layers_together  # reads view.layer (its seed)
    assert not kvpolicy.build("snapkv").plans_layers_together  # declares nothing: the default is False
    assert not kvpolicy.build("namm-bam-smollm2").plans_layers_together


class _ShuffledTopK(TopKSelector):
    """A third party's selector that wrongly declares the capability and returns unsorted indices."""

    name = "shuffled_top_k"
    plans_layers_together = True

    def select(self, scores, protected, budget, view):
        return Selection(super().select(scores, protected, budget, view).indices.flip(-1))


def test_a_stacked_plan_that_fails_is_rerun_layer_by_layer_so_the_error_names_its_layer(llama):
    class Plugin:
        @kvpolicy.hookimpl
        def kvpolicy_register_selectors(self, register):
            register("shuffled_top_k", _ShuffledTopK)

    registry = Registry()
    registry.register_plugin(Plugin(), name="shuffled")
    config = PolicyConfig(
        ComponentRef("last_query_attention"), ComponentRef("tova"), ComponentRef("shuffled_top_k"),
        schedule=Schedule("every_step"), budget=Budget(tokens=24),
    )  # fmt: skip
    policy = kvpolicy.Policy.from_config(config, registry)
    assert policy.plans_layers_together
    with pytest.raises(InvalidSelectionError, match="on layer 0"):
        _decode(llama, policy, random_ids(1, 40), together=True)
