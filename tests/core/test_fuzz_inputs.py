"""Property tests over bad input where it enters: policy JSON (every field of a `PolicyConfig`,
nested ones and component configs included) and ``kvpolicy run`` arguments.

Every input ends in a working policy or a `KVPolicyError` (argparse's `SystemExit` for command
lines it cannot parse) — never another exception type; inputs built to be invalid never succeed.
``KVPOLICY_FUZZ_EXAMPLES`` raises the number of examples (the figure in docs/testing.md was
measured with 2000; ``--hypothesis-show-statistics`` prints how the inputs ended, from `event`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Any

import attrs
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy.cli import _build_parser, main
from kvpolicy.cli.run import prepare
from kvpolicy.errors import KVPolicyError
from kvpolicy.registry import default_registry
from kvpolicy.testing import examples
from kvpolicy.testing import strategies as kst
from kvpolicy.testing.strategies import CacheShape, make_view

EXAMPLES = int(os.environ.get("KVPOLICY_FUZZ_EXAMPLES") or examples(150))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

PRESETS = ["streaming_llm", "h2o", "snapkv", "l2", "tova", "fastgen", "namm-bam", "namm-mlp", "random", "full"]


def _bases() -> dict[str, dict[str, Any]]:
    return {name: default_registry().preset(name).config.to_dict() for name in PRESETS}


# --------------------------------------------------------------------------- inputs built to be invalid


def _bad_refs(kind: str) -> list[Any]:
    valid = {"extractor": "position", "scorer": "feature", "selector": "top_k"}[kind]
    return [5, 1.5, True, None, [], [valid], f"no_such_{kind}", "", {"config": {}}, {"name": 3},
            {"name": valid, "config": [1]}, {"name": valid, "config": "x"}, {"name": valid, "config": {"bogus": 1}},
            {"name": valid, "extra": 1}, {"name": ["x"]}]  # fmt: skip


BAD_VALUES: dict[str, list[Any]] = {
    "extractor": _bad_refs("extractor"),
    "scorer": _bad_refs("scorer"),
    "selector": _bad_refs("selector"),
    "schedule": ["every_step", [], 5, None, True, {"kind": "sometimes"}, {"kind": 5}, {"kind": None},
                 {"every": "abc"}, {"every": 2.5}, {"every": 0}, {"every": -3}, {"every": True}, {"every": None},
                 {"slack": -1}, {"slack": 1.5}, {"slack": "1"}, {"bogus": 1}],
    "protect": [[4, 4], "4", 4, None, {"sinks": "4"}, {"sinks": 1.5}, {"sinks": -1}, {"recent": -2},
                {"recent": "x"}, {"sinks": None}, {"sinks": True}, {"recent": 2.0}, {"bogus": 1}],
    "budget": ["150%", "abc", "", "0%", "-5%", "nan", "inf", "nan%", -5, 0, 1.5, -0.5, float("nan"), float("inf"),
               [1], {"ratio": 2}, {"ratio": 0}, {"ratio": True}, {"ratio": "0.5"}, {"tokens": 5, "ratio": 0.5},
               {"tokens": "5"}, {"tokens": 2.5}, {"tokens": -1}, {"tokens": True}, {"bogus": 1}, True],
    "skip_layers": ["abc", "", [1.5], ["a"], [-1], [True], [None], [[0]], 5, 2.5, True, {"a": 1}, {"0": 1}],
    "span": [2, 0, -1, "x", "3", 1.5, True, [3], {"kernel": 4}, {"kernel": 0}, {"kernel": "3"}, {"kernel": 3.0},
             {"mode": "min"}, {"mode": 1}, {"bogus": 1}],
    "pooler": [5, 1.5, True, [], ["span"], "no_such_pooler", "", {"config": {}}, {"name": 3},
               {"name": "span", "config": [1]}, {"name": "span", "config": {"bogus": 1}},
               {"name": "span", "config": {"kernel": 4}}, {"name": "span", "config": {"mode": "min"}},
               {"name": "span", "extra": 1}],
}  # fmt: skip
BAD_SHAPES = ["a list", "a string", "null", "a number", "missing extractor", "unknown field"]


@st.composite
def bad_policy_json(draw: st.DrawFn) -> tuple[str, Any]:
    """``(what was broken, data)``: a preset's config with one field given a value it must refuse."""
    base = copy.deepcopy(_bases()[draw(st.sampled_from(PRESETS))])
    if draw(st.integers(0, 9)) == 0:
        shape = draw(st.sampled_from(BAD_SHAPES))
        if shape == "missing extractor":
            del base["extractor"]
            return shape, base
        if shape == "unknown field":
            return shape, {**base, draw(st.sampled_from(["budgets", "sink", "every", ""])): 1}
        return shape, {"a list": [base], "a string": json.dumps(base), "null": None, "a number": 3}[shape]
    field = draw(st.sampled_from(sorted(BAD_VALUES)))
    base[field] = copy.deepcopy(draw(st.sampled_from(BAD_VALUES[field])))
    return field, base


# --------------------------------------------------------------------------- any value anywhere

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-1000, 1000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.sampled_from([0, 1, 2, 3, 5, 0.25, 0.5, 1.0, 1.5, 512, "", "25%", "every_step", "never", "max", "avg",
                       "mean", "rows", "relu", "position", "feature", "top_k", "threshold"])
)  # fmt: skip
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)  # fmt: skip
NESTED = {"schedule": ("kind", "every", "slack"), "protect": ("sinks", "recent"), "budget": ("tokens", "ratio"),
          "span": ("kernel", "mode")}  # fmt: skip
NUMBER = st.integers(0, 40)
#: values a user might plausibly write for each field, so that many drawn policies build and run
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "kind": st.sampled_from(["every_n", "after_prefill", "every_step", "never"]),
    "mode": st.sampled_from(["max", "avg"]),
    "ratio": st.floats(0.01, 1.0),
    "budget": st.sampled_from([None, 16, 64, 0.25, "25%", "50%", {"tokens": 32}, {"ratio": 0.5}]),
    "skip_layers": st.lists(st.integers(0, 3), max_size=3),
    "span": st.sampled_from([None, 1, 3, 5, {"kernel": 3, "mode": "avg"}]),
    "pooler": st.sampled_from([None, "span", {"name": "span", "config": {"kernel": 5, "mode": "avg"}}]),
    "name": st.sampled_from(["position", "feature", "top_k", "threshold", "h2o", "tova", "key_norm", "l2", "random"]),
    "extractor": st.sampled_from(["position", "key_norm", "accumulated_attention", "last_query_attention"]),
    "scorer": st.sampled_from(["feature", "random", "l2", "h2o", "tova"]),
    "selector": st.sampled_from(["top_k", "threshold", "heavy_recent"]),
    "schedule": st.fixed_dictionaries({"kind": st.sampled_from(["every_n", "every_step", "never"]), "every": NUMBER}),
    "protect": st.fixed_dictionaries({"sinks": NUMBER, "recent": NUMBER}),
}


@st.composite
def any_policy_json(draw: st.DrawFn) -> dict[str, Any]:
    """A preset's config with one or two fields (top level, nested or a component's config field)
    replaced by a plausible value, a scalar or arbitrary JSON."""
    data = copy.deepcopy(_bases()[draw(st.sampled_from(PRESETS))])

    def value(field: str, plausible: st.SearchStrategy[Any] | None = None) -> Any:
        return draw(st.one_of(PLAUSIBLE.get(field, NUMBER) if plausible is None else plausible, SCALARS, JSON_VALUES))

    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["top", "nested", "component", "component_field"]))
        if where == "top":
            field = draw(st.sampled_from([*data, "unknown"]))
            data[field] = value(field)
        elif where == "nested":
            field = draw(st.sampled_from(sorted(NESTED)))
            if not isinstance(data.get(field), dict):
                data[field] = {}
            inner = draw(st.sampled_from(NESTED[field]))
            data[field][inner] = value(inner)
        else:
            kind = draw(st.sampled_from(["extractor", "scorer", "selector"]))
            ref = data.get(kind)
            ref = dict(ref) if isinstance(ref, dict) else {"name": ref if isinstance(ref, str) else "position"}
            if where == "component":
                field = draw(st.sampled_from(["name", "config"]))
                ref[field] = value(field, PLAUSIBLE["name"] if field == "name" else st.just({}))
            else:
                fields = _component_fields(kind, ref.get("name"))
                config = dict(ref["config"]) if isinstance(ref.get("config"), dict) else {}
                field = draw(st.sampled_from([*fields, "unknown"]))
                config[field] = value(field, fields.get(field))
                ref["config"] = config
            data[kind] = ref
    return data


def _component_fields(kind: str, name: Any) -> dict[str, st.SearchStrategy[Any]]:
    """The config fields of a registered component, each with the kit's strategy of valid values."""
    try:
        config_cls = default_registry().spec(kind, name).config_cls
    except KVPolicyError:
        return {}
    attrs.resolve_types(config_cls)
    return {f.name: kst.field_strategy(f) for f in attrs.fields(config_cls)}


def _works(policy: kvpolicy.Policy) -> None:
    """A built policy is a working one: it round-trips through JSON and plans a layer (a run-time
    refusal, e.g. a scorer given the wrong number of features, must be a named error too)."""
    assert kvpolicy.Policy.from_json(policy.to_json()).config == policy.config
    shape = CacheShape(batch=1, kv_heads=2, groups=2, tokens=24, head_dim=8, seen=40, fresh=8, dtype=torch.float32)
    view = make_view(shape, seed=1, requirements=policy.requirements, layer=0, num_layers=4)
    with contextlib.suppress(KVPolicyError):
        policy.plan(view)


def _build(data: Any) -> str:
    """``ok`` or ``named error``; any other exception escapes and fails the test."""
    try:
        policy = kvpolicy.build(data)
    except KVPolicyError:
        with pytest.raises(KVPolicyError):  # the JSON route refuses it too
            kvpolicy.Policy.from_json(json.dumps(data))
        return "named error"
    _works(policy)
    return "ok"


@FUZZ
@given(bad_policy_json())
def test_bad_policy_json_is_always_a_named_error(case):
    field, data = case
    outcome = _build(data)
    event("policy json, built to be invalid", outcome)
    assert outcome == "named error", f"{field}={data.get(field) if isinstance(data, dict) else data!r} was accepted"


@FUZZ
@given(any_policy_json())
def test_any_policy_json_builds_a_working_policy_or_a_named_error(data):
    event("policy json, any value", _build(data))


# --------------------------------------------------------------------------- kvpolicy run arguments


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli-files")
    paths = {name: str(root / name) for name in ("good.json", "bad.json", "broken.safetensors", "binary.json")}
    with open(paths["good.json"], "w") as handle:
        handle.write(kvpolicy.build("streaming_llm", budget=64).to_json())
    with open(paths["bad.json"], "w") as handle:
        handle.write('{"extractor": "position", "scorer": "feature", "selector": "top_k", "schedule": "every_step"}')
    with open(paths["broken.safetensors"], "wb") as handle:
        handle.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}xxx")
    with open(paths["binary.json"], "wb") as handle:
        handle.write(b"\xff\xfe\x00\x01")
    paths["missing.json"] = str(root / "missing.json")
    paths["missing.safetensors"] = str(root / "missing.safetensors")
    return paths


INTS = st.integers(-5, 5).map(str) | st.sampled_from(["64", "4096", "1.5", "abc", "", "1e3", "-0"])
OPTION_VALUES: dict[str, st.SearchStrategy[str]] = {
    "--model": st.sampled_from(["smollm2-135m-instruct", "gemma3-270m", "gpt-17", "", "SMOLLM2"]),
    "--policy": st.sampled_from(["streaming_llm", "h2o", "tova", "no_such", "", "good.json", "bad.json",
                                 "binary.json", "missing.json", "broken.safetensors", "missing.safetensors"]),
    "--budget": st.sampled_from(["64", "25%", "0.25", "150%", "0%", "-4", "0", "1.5", "abc", "nan", "1e3", ""])
    | st.text(max_size=5),
    "--sinks": INTS,
    "--recent": INTS,
    "--context-tokens": INTS,
    "--depth": st.sampled_from(["0", "0.5", "1", "-0.1", "1.5", "nan", "inf", "abc"]),
    "--max-new-tokens": INTS,
    "--prefill-chunk-size": INTS,
    "--prompt-file": st.sampled_from(["/no/such/prompt.txt"]),
}  # fmt: skip
BAD_OPTION_VALUES: dict[str, list[str]] = {
    "--model": ["gpt-17", ""],
    "--policy": ["no_such", "bad.json", "binary.json", "missing.json", "broken.safetensors", "missing.safetensors"],
    "--budget": ["150%", "0%", "-4", "0", "1.5", "abc", "nan", ""],
    "--sinks": ["-1", "abc", "1.5"],
    "--recent": ["-3", "x"],
    "--context-tokens": ["0", "-2", "abc"],
    "--depth": ["-0.1", "1.5", "nan", "inf", "abc"],
    "--max-new-tokens": ["0", "-1", "abc"],
    "--prefill-chunk-size": ["0", "-4", "2.5"],
    "--prompt-file": ["/no/such/prompt.txt"],
}


def _argv(options: dict[str, str], files: dict[str, str]) -> list[str]:
    argv = ["run"]
    for option, value in options.items():
        argv += [option, files.get(value, value) if option == "--policy" else value]
    return argv


def _run_cli(argv: list[str]) -> str:
    """``unparseable``, ``named error`` or ``ok``; a model is never loaded (`prepare` stops first)."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args = _build_parser().parse_args(argv)
        except SystemExit:
            return "unparseable"
        try:
            prepare(args)
        except KVPolicyError:
            assert main(argv) == 2  # the real entry point: a one-line error, before any model is loaded
            return "named error"
    return "ok"


@FUZZ
@given(st.data())
def test_bad_run_arguments_end_in_a_named_error_or_argparse(files, data):
    options = {o: data.draw(v) for o, v in OPTION_VALUES.items() if o != "--prompt-file" and data.draw(st.booleans())}
    options = {o: v for o, v in options.items() if o not in BAD_OPTION_VALUES or v not in BAD_OPTION_VALUES[o]}
    broken = data.draw(st.sampled_from(sorted(BAD_OPTION_VALUES)))
    options[broken] = data.draw(st.sampled_from(BAD_OPTION_VALUES[broken]))
    outcome = _run_cli(_argv(options, files))
    event("run arguments, built to be invalid", outcome)
    assert outcome != "ok", f"{broken} {options[broken]!r} was accepted"


@FUZZ
@given(st.data())
def test_any_run_arguments_give_a_policy_a_named_error_or_argparse(files, data):
    options = {o: data.draw(v) for o, v in OPTION_VALUES.items() if data.draw(st.booleans())}
    argv = _argv(options, files) + (["--compare-full"] if data.draw(st.booleans()) else [])
    event("run arguments, any value", _run_cli(argv))
