"""Checks of presets: the config JSON round trip, `Policy.plan` honouring the invariants, the cache state machine."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from kvpolicy.policy import Policy, build
from kvpolicy.testing import strategies as kst
from kvpolicy.testing.conformance.base import Target, _fail, _for_all
from kvpolicy.testing.conformance.components import _aligned
from kvpolicy.testing.invariants import keeps_highest_scores, selection_violations
from kvpolicy.testing.views import copy_view
from kvpolicy.types import (
    LayerView,
    PolicyConfig,
)

# --------------------------------------------------------------------------- presets


def check_preset_roundtrip(target: Target) -> None:
    policy: Policy = target.make()
    text = policy.to_json()
    if PolicyConfig.from_json(text) != policy.config:
        _fail(target, "preset_roundtrip", f"PolicyConfig changed through JSON: {text}")
    rebuilt = Policy.from_json(text, registry=target.registry)
    if rebuilt.config != policy.config:
        _fail(target, "preset_roundtrip", "Policy.from_json(policy.to_json()) built a different policy")


def _planned_policies(target: Target) -> st.SearchStrategy[tuple[Policy, LayerView]]:
    base: Policy = target.make()

    def with_view(policy: Policy) -> st.SearchStrategy[tuple[Policy, LayerView]]:
        aligned = _aligned(target, policy.extractor, policy.scorer, policy.selector)
        return kst.layer_views(policy.requirements, aligned=aligned).map(lambda view: (policy, view))

    overrides = kst.policy_overrides(base)
    return overrides.map(lambda o: build(base.config, registry=target.registry, **o)).flatmap(with_view)


def check_preset_plan(target: Target) -> None:
    def body(args: tuple[Policy, LayerView]) -> None:
        policy, view = args
        recorded: dict[str, torch.Tensor] = {}
        selector = policy.selector
        original = selector.select

        def record(scores, protected, budget, v):
            recorded["scores"], recorded["protected"] = scores, protected
            return original(scores, protected, budget, v)

        selector.select = record  # instance attribute: only this policy object is affected
        try:
            selection = policy.plan(copy_view(view))
        finally:
            del selector.select
        if selection is None:
            if policy.schedule.kind != "never" and view.layer not in policy.skip_layers:
                _fail(target, "plan", f"{policy} planned nothing on an evicting layer")
            return
        expected = policy.protected_mask(view)
        if not torch.equal(recorded["protected"], expected):
            _fail(target, "plan", "the selector was not given the policy's protected mask")
        capacity = policy.budget.capacity(view.seen) if policy.budget.is_set else None
        order = bool(target.options.get("score_order", keeps_highest_scores(selector)))
        problems = selection_violations(selection, recorded["scores"], expected, capacity, score_order=order)
        if problems:
            _fail(target, "plan", f"{policy}: " + "; ".join(problems))
        again = policy.plan(copy_view(view))
        if not torch.equal(again.indices, selection.indices):
            _fail(target, "plan", f"{policy} planned differently twice on the same view")

    _for_all(_planned_policies(target), body)


def check_preset_cache_machine(target: Target) -> None:
    from kvpolicy.testing.machine import run_cache_machine

    run_cache_machine(target.make(), registry=target.registry, options=target.options)
