"""Bad values are refused with named kvpolicy errors where they enter — when a policy is built or
the command line is read — never as AttributeError / TypeError later, and never silently."""

from __future__ import annotations

import argparse
import json

import pytest

import kvpolicy
from kvpolicy.cli import main
from kvpolicy.cli.run import add_arguments, prepare
from kvpolicy.errors import InvalidBudgetError, InvalidConfigError, KVPolicyError
from kvpolicy.types import Budget, ComponentRef, PolicyConfig, Protection, Schedule

BASE = {
    "extractor": "position",
    "scorer": "feature",
    "selector": "top_k",
    "budget": 64,
    "schedule": {"kind": "every_step"},
    "protect": {"sinks": 0, "recent": 0},
}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("schedule", "every_step", r"PolicyConfig.schedule must be a Schedule, in JSON \{\"kind\""),
        ("schedule", {"kind": "sometimes"}, "Schedule.kind must be one of"),
        ("schedule", {"every": "abc"}, "Schedule.every must be a whole number, got 'abc'"),
        ("schedule", {"every": 2.5}, "Schedule.every must be a whole number, got 2.5"),
        ("protect", [4, 4], "PolicyConfig.protect must be a Protection"),
        ("protect", {"sinks": "4"}, "Protection.sinks must be a whole number"),
        ("protect", {"sinks": 1.5}, "Protection.sinks must be a whole number"),
        ("skip_layers", "abc", "skip_layers must be a list of layer indices, got 'abc'"),
        ("skip_layers", [1.5, -1], r"skip_layers must hold layer indices .* \[1.5, -1\]"),
        ("budget", "150%", "out of range"),
        ("budget", {"tokens": 2.5}, "Budget.tokens must be a whole number"),
        ("pooler", 4, "pooler must be a name or"),
        ("pooler", {"name": "span", "config": {"kernel": 4}}, "SpanPoolerConfig.kernel must be an odd whole number"),
        ("pooler", {"name": "span", "config": {"mode": "median"}}, "SpanPoolerConfig.mode must be 'max' or 'avg'"),
        ("extractor", 5, "extractor must be a name or"),
        ("scorer", {"name": "feature", "config": [1]}, "config must be a mapping"),
        ("scorer", {"name": "feature", "config": {"index": "0"}}, "FeatureScorerConfig.index must be a number"),
        ("scorer", {"name": "random", "config": {"seed": "x"}}, "RandomScorerConfig.seed must be int, got 'x'"),
        ("selector", {"name": "top_k", "config": {"shared_across_heads": "no"}}, "shared_across_heads must be bool"),
        ("selector", {"name": 3}, "ComponentRef.name must be a component name, got int 3"),
    ],
)
def test_policy_json_with_a_bad_field_is_a_named_error(field, value, message):
    data = {**BASE, field: value}
    with pytest.raises(InvalidConfigError, match=message):
        kvpolicy.Policy.from_config(PolicyConfig.from_dict(data))
    with pytest.raises(InvalidConfigError):
        kvpolicy.build(data)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Schedule("sometimes"), "Schedule.kind must be one of every_n, after_prefill, every_step, never"),
        (lambda: Schedule(every=2.5), "Schedule.every must be a whole number, got 2.5"),
        (lambda: Schedule(slack=-1), "Schedule.slack must be >= 0"),
        (lambda: Protection(sinks=1.5), "Protection.sinks must be a whole number, got 1.5"),
        (lambda: Protection(sinks="4"), "Protection.sinks must be a whole number, got '4'"),
        (lambda: Budget(tokens=True), "Budget.tokens must be a whole number"),
        (lambda: Budget(ratio="0.5"), "Budget.ratio must be a number"),
        (lambda: kvpolicy.Policy("position", "feature", "top_k", budget=64, every="abc"), "must be a whole number"),
        (lambda: kvpolicy.Policy("position", "feature", "top_k", budget=64, every=2.5), "must be a whole number"),
        (lambda: kvpolicy.Policy("position", "feature", "top_k", budget=64, sinks="4"), "must be a whole number"),
        (lambda: kvpolicy.Policy("position", "feature", "top_k", budget=64, sinks=1.5), "must be a whole number"),
        (lambda: kvpolicy.Policy("position", "feature", "top_k", budget=64, skip_layers="abc"), "skip_layers"),
        (lambda: kvpolicy.Policy("position", "feature", "top_k", budget=64, schedule="every_step"), "Schedule"),
        (lambda: kvpolicy.Policy("position", "feature", "top_k", budget=64, protect=[4]), "Protection"),
        (lambda: kvpolicy.Policy("position", {"name": 5}, "top_k", budget=64), "named by a string"),
        (lambda: kvpolicy.build("h2o", budget=64, every=0), "Schedule.every must be > 0"),
        (lambda: kvpolicy.build("h2o", budget=64, sinks=-2), "Protection.sinks must be >= 0"),
        (lambda: kvpolicy.build("h2o", span="3"), "span must be an odd kernel size"),
        (lambda: kvpolicy.build("h2o", span=3, pooler="span"), "give either pooler .* or span .*, not both"),
        (lambda: kvpolicy.build("h2o", pooler={"kernel": 3}), "the base policy has none"),
        (lambda: kvpolicy.Policy("position", "feature", "top_k", budget=64, pooler=5), "pooler object 5 lacks"),
    ],
)
def test_python_values_are_validated_when_the_policy_is_built(make, message):
    with pytest.raises(InvalidConfigError, match=message):
        make()


def test_valid_shorthands_still_work():
    config = PolicyConfig.from_dict(
        {
            **BASE,
            "budget": "25%",
            "pooler": {"name": "span", "config": {"kernel": 3, "mode": "max"}},
            "skip_layers": [0, 1],
        }
    )
    span = ComponentRef("span", {"kernel": 3, "mode": "max"})
    assert config.budget == Budget(ratio=0.25) and config.pooler == span and config.skip_layers == (0, 1)
    policy = kvpolicy.Policy.from_json(config.to_json())
    assert (policy.budget, policy.config.pooler, policy.skip_layers) == (config.budget, config.pooler, config.skip_layers)  # fmt: skip
    assert kvpolicy.build("h2o", budget=64, every=8, sinks=2).schedule == Schedule("every_n", every=8)


@pytest.mark.parametrize(
    ("text", "kind"),
    [("150%", "out of range"), ("0%", "out of range"), ("-5%", "out of range"), ("1.5", "out of range"),
     ("abc", "cannot read"), ("", "cannot read"), ("nan", "out of range"), ("-3", "must be > 0")],
)  # fmt: skip
def test_budget_text_says_unreadable_or_out_of_range(text, kind):
    with pytest.raises(InvalidBudgetError, match=kind):
        Budget.parse(text)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--prefill-chunk-size", "-4"], "--prefill-chunk-size must be at least 1 token"),
        (["--prefill-chunk-size", "0"], "--prefill-chunk-size must be at least 1 token"),
        (["--context-tokens", "0"], "--context-tokens must be at least 1"),
        (["--depth", "1.5"], "--depth must be between 0 and 1"),
        (["--depth", "nan"], "--depth must be between 0 and 1"),
        (["--sinks", "-1"], "--sinks must be >= 0"),
        (["--budget", "150%"], "budget '150%' is out of range"),
        (["--model", "gpt-17"], "unknown shipped model 'gpt-17'"),
        (["--prompt-file", "/no/such/prompt.txt"], "prompt file /no/such/prompt.txt does not exist"),
    ],
)
def test_run_arguments_are_checked_before_a_model_loads(argv, message, capsys):
    with pytest.raises(KVPolicyError, match=message):
        prepare(_args(*argv))
    assert main(["run", *argv]) == 2  # a one-line error, no traceback and no model load
    assert f"kvpolicy: error: {message}"[:40] in capsys.readouterr().err


def test_policy_json_file_that_is_not_text_is_a_named_error(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["run", "--policy", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    path.write_text(json.dumps({**BASE, "schedule": "every_step"}))
    assert main(["run", "--policy", str(path)]) == 2
    assert "PolicyConfig.schedule must be a Schedule" in capsys.readouterr().err
