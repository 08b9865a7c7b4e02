"""Policy composition: building from names / objects / JSON, validation, schedule, protection."""

from __future__ import annotations

import json

import pytest
import torch

import kvpolicy
from kvpolicy import Budget, InvalidBudgetError, InvalidConfigError, Policy, PolicyConfig, Schedule, ShapeError
from kvpolicy.types import LayerView, Requirements
from kvpolicy_plugins.basic import FeatureScorer, PositionExtractor
from kvpolicy_plugins.selectors import TopKSelector


def _view(tokens: int, heads: int = 2, batch: int = 1, seen: int | None = None) -> LayerView:
    positions = torch.arange(tokens).expand(batch, heads, tokens).clone()
    return LayerView(layer=0, num_layers=2, positions=positions, seen=seen or tokens)


def test_build_from_names_objects_and_pairs_agree(registry):
    by_name = Policy("position", "feature", "top_k", budget=8, sinks=2, registry=registry)
    by_object = Policy(PositionExtractor(), FeatureScorer(), TopKSelector(), budget=8, sinks=2, registry=registry)
    by_pair = Policy(("position", {}), ("feature", {"sign": 1.0}), "top_k", budget=8, sinks=2, registry=registry)
    assert by_name.config == by_object.config == by_pair.config
    view = _view(20)
    assert torch.equal(by_name.plan(view).indices, by_object.plan(view).indices)


def test_json_round_trip_rebuilds_the_same_policy(registry):
    policy = kvpolicy.build("streaming_llm", budget="25%", recent=16, registry=registry)
    text = policy.to_json()
    again = Policy.from_json(text, registry=registry)
    assert again.config == policy.config
    assert json.loads(again.to_json()) == json.loads(text)
    assert again.budget == Budget(ratio=0.25) and again.protect.recent == 16 and again.protect.sinks == 4


def test_preset_overrides_merge_component_configs(registry):
    policy = kvpolicy.build("random", budget=32, scorer={"seed": 7}, every=128, registry=registry)
    assert policy.scorer.config.seed == 7
    assert policy.schedule == Schedule("every_n", every=128)
    assert policy.budget.tokens == 32


def test_a_json_file_may_name_a_preset_with_overrides(registry, tmp_path):
    variant = tmp_path / "snapkv-chunk.json"
    variant.write_text(json.dumps({"preset": "snapkv", "schedule": {"kind": "every_n", "every": 512}}))
    policy = kvpolicy.build(str(variant), budget="25%", registry=registry)
    assert policy.config == kvpolicy.build("snapkv", budget="25%", every=512, registry=registry).config
    slack = kvpolicy.build('tova:{"schedule": {"kind": "every_step", "slack": 64}}', registry=registry)
    assert slack.schedule == Schedule("every_step", slack=64)
    with pytest.raises(InvalidConfigError, match="Schedule has no field"):
        kvpolicy.build('tova:{"schedule": {"kind": "every_step", "slak": 64}}', registry=registry)
    broken = tmp_path / "broken.json"
    broken.write_text('{"preset": "snapkv",')
    with pytest.raises(InvalidConfigError, match="not valid JSON"):
        kvpolicy.build(str(broken), registry=registry)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (512, Budget(tokens=512)),
        (0.25, Budget(ratio=0.25)),
        ("25%", Budget(ratio=0.25)),
        ("128", Budget(tokens=128)),
        (None, Budget()),
        (300.0, Budget(tokens=300)),
    ],
)
def test_budget_parsing(value, expected):
    assert Budget.parse(value) == expected


@pytest.mark.parametrize("value", ["lots", 0, -5, 1.5, "0%", True])
def test_bad_budgets_are_rejected_with_a_reason(value):
    with pytest.raises(InvalidConfigError):
        Budget.parse(value)


def test_budget_capacity():
    assert Budget(tokens=100).capacity(50) == 50
    assert Budget(tokens=100).capacity(500) == 100
    assert Budget(ratio=0.25).capacity(400) == 100
    assert Budget().capacity(400) is None


def test_impossible_budget_names_the_protected_tokens(registry):
    with pytest.raises(InvalidBudgetError, match="smaller than the 21 tokens.*4 sinks \\+ 17 recent"):
        kvpolicy.build("streaming_llm", budget=16, recent=17, registry=registry)


def test_budget_and_selector_must_agree(registry):
    with pytest.raises(InvalidBudgetError, match="needs a budget"):
        Policy("position", "feature", "top_k", registry=registry)
    with pytest.raises(InvalidBudgetError, match="takes no budget"):
        Policy("position", "feature", "threshold", budget=64, registry=registry)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"extractor": "position", "scorer": "feature"}, "lacks selector"),
        (
            {"extractor": "position", "scorer": "feature", "selector": "top_k", "budget": 8, "protect": {}},
            "lacks schedule",
        ),
        (
            {
                "extractor": "position",
                "scorer": "feature",
                "selector": "top_k",
                "schedule": {"kind": "never"},
                "budget": 8,
            },
            "lacks protect",
        ),
        (
            {
                "extractor": "position",
                "scorer": "feature",
                "selector": "top_k",
                "schedule": {"kind": "never"},
                "protect": {},
            },
            "lacks budget",
        ),
        (
            {
                "extractor": "position",
                "scorer": "feature",
                "selector": "top_k",
                "schedule": {"kind": "every_step"},
                "protect": {"sinks": 0, "recent": 0},
                "budget": {"tokns": 3},
            },
            "no field.*tokns",
        ),
        (
            {
                "extractor": "position",
                "scorer": "feature",
                "selector": "top_k",
                "budget": 8,
                "protect": {},
                "schedule": {"kind": "often"},
            },
            "often",
        ),
        (
            {
                "extractor": "position",
                "scorer": {"name": "feature", "config": {"sign": 3}},
                "selector": "top_k",
                "budget": {"tokens": 9},
                "schedule": {"kind": "every_step"},
                "protect": {},
            },
            "sign",
        ),
        ([1, 2], "JSON object"),
    ],
)
def test_invalid_configs_name_the_problem(registry, data, message):
    with pytest.raises(InvalidConfigError, match=message):
        Policy.from_config(PolicyConfig.from_dict(data), registry=registry)


def test_invalid_json_is_reported():
    with pytest.raises(InvalidConfigError, match="not valid JSON"):
        PolicyConfig.from_json("{nope")


def test_requirements_are_the_union_of_the_components(registry):
    policy = kvpolicy.build("key-diversity", budget=64, registry=registry)
    assert policy.requirements == Requirements(keys=True)
    assert kvpolicy.build("full", registry=registry).requirements == Requirements()
    assert Requirements(attention_window=4) | Requirements(attention_window=16, token_ids=True) == Requirements(
        attention_window=16, token_ids=True
    )


def test_a_missing_view_field_names_the_field_and_the_requirement_that_fills_it():
    view = LayerView(0, 1, torch.arange(4).view(1, 1, 4), 4, keys=torch.zeros(1, 1, 4, 2))
    view.require("keys", by="extractor 'x'")  # present: no error
    with pytest.raises(ShapeError) as caught:
        view.require("keys", "token_ids", "attention", by="extractor 'x'")
    message = str(caught.value)
    assert message.startswith("extractor 'x' needs view.token_ids [batch, kv_heads, tokens] and view.attention")
    assert "view.keys" not in message
    assert "token_ids=True, attention_window > 0" in message


def test_protected_mask_covers_sinks_recent_and_newest(registry):
    policy = kvpolicy.build("streaming_llm", budget=10, recent=3, registry=registry)
    mask = policy.protected_mask(_view(12))[0, 0].tolist()
    assert mask == [True] * 4 + [False] * 5 + [True] * 3
    newest_only = kvpolicy.build("random", budget=4, registry=registry).protected_mask(_view(5))[0, 0].tolist()
    assert newest_only == [False, False, False, False, True]


@pytest.mark.parametrize(
    ("schedule", "kwargs", "due"),
    [
        (
            Schedule("every_n", every=4),
            dict(new_tokens=3, cached=10, seen=10, prefill_done=False, passes_done=0),
            False,
        ),
        (Schedule("every_n", every=4), dict(new_tokens=4, cached=10, seen=10, prefill_done=False, passes_done=0), True),
        (Schedule("after_prefill"), dict(new_tokens=9, cached=9, seen=9, prefill_done=False, passes_done=0), False),
        (Schedule("after_prefill"), dict(new_tokens=9, cached=9, seen=9, prefill_done=True, passes_done=0), True),
        (Schedule("after_prefill"), dict(new_tokens=1, cached=9, seen=20, prefill_done=True, passes_done=1), False),
        (
            Schedule("every_step", slack=2),
            dict(new_tokens=1, cached=10, seen=30, prefill_done=True, passes_done=3),
            False,
        ),
        (
            Schedule("every_step", slack=2),
            dict(new_tokens=1, cached=11, seen=30, prefill_done=True, passes_done=3),
            True,
        ),
        (Schedule("never"), dict(new_tokens=99, cached=99, seen=99, prefill_done=True, passes_done=0), False),
    ],
)
def test_schedule(registry, schedule, kwargs, due):
    policy = kvpolicy.build("random", budget=8, schedule=schedule, registry=registry)
    assert policy.is_due(**kwargs) is due


@pytest.mark.parametrize(
    ("schedule", "passes_done", "again"),
    [
        (Schedule("after_prefill"), 0, True),
        (Schedule("after_prefill"), 1, False),
        (Schedule("every_n", every=4), 5, True),
        (Schedule("every_step"), 5, True),
        (Schedule("never"), 0, False),
    ],
)
def test_will_run_again_is_false_only_when_no_pass_can_be_due(registry, schedule, passes_done, again):
    policy = kvpolicy.build("random", budget=8, schedule=schedule, registry=registry)
    assert policy.will_run_again(passes_done=passes_done) is again
    if not again:  # whatever comes next, is_due agrees
        for prefill_done in (False, True):
            kwargs = dict(new_tokens=99, cached=99, seen=999, prefill_done=prefill_done, passes_done=passes_done)
            assert not policy.is_due(**kwargs)


def test_plan_keeps_newest_and_sinks_within_budget(registry):
    policy = kvpolicy.build("streaming_llm", budget=8, registry=registry)
    selection = policy.plan(_view(20, heads=3, batch=2))
    assert selection.indices.shape == (2, 3, 8)
    assert selection.indices[0, 0].tolist() == [0, 1, 2, 3, 16, 17, 18, 19]


def test_skip_layers_keep_everything(registry):
    policy = kvpolicy.build("streaming_llm", budget=8, skip_layers=(0,), registry=registry)
    assert policy.plan(_view(20)) is None


def test_component_returning_wrong_shape_is_named(registry):
    class BadExtractor(PositionExtractor):
        def extract(self, view):
            return view.positions.float()  # forgot the features dim

    policy = Policy(BadExtractor(), "feature", "top_k", budget=4, registry=registry)
    with pytest.raises(ShapeError, match="extractor 'position' features have shape \\(1, 2, 9\\)"):
        policy.plan(_view(9))


def test_policy_without_parameters_has_an_empty_vector(registry):
    policy = kvpolicy.build("streaming_llm", budget=8, registry=registry)
    assert policy.num_params == 0 and policy.get_flat().numel() == 0
    with pytest.raises(ShapeError, match="has 0 parameters"):
        policy.set_flat(torch.zeros(3))


def test_repr_is_readable(registry):
    assert repr(kvpolicy.build("streaming_llm", budget=8, registry=registry)) == (
        "Policy(position → feature → top_k, schedule=every_step, budget=8, sinks=4, recent=0)"
    )
