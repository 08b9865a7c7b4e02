"""The frozen evaluation plan (`kvpolicy.eval.plan`): the test split runs only inside one of its
blocks, a sealed block only when named, and a missing or broken plan is a named error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpolicy.cli import main
from kvpolicy.errors import CheckpointError, InvalidConfigError
from kvpolicy.eval.plan import DEFAULT_PLAN, PLAN_FORMAT, load_plan
from kvpolicy.eval.tasks import build_suite

SMOL = "smollm2-135m-instruct"


def _plan(tmp_path: Path) -> Path:
    block = {"models": {SMOL: {"tasks": ["needle"], "lengths": [1024]}}, "protocols": ["context-first"]}
    data = {
        "format": PLAN_FORMAT,
        "blocks": {
            "A": {**block, "first_seed": 100, "seeds": 4, "sealed": False},
            "B": {**block, "first_seed": 200, "seeds": 4, "sealed": True},
        },
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


def test_a_test_run_must_fit_one_block(tmp_path: Path) -> None:
    plan = load_plan(_plan(tmp_path))
    block_a = build_suite(["needle"], "test", [1024], [100, 103])
    assert plan.block_for(block_a, SMOL, "context-first").name == "A"
    with pytest.raises(InvalidConfigError, match="needle/test/1024/104 on"):
        plan.block_for(build_suite(["needle"], "test", [1024], [103, 104]), SMOL, "context-first")
    with pytest.raises(InvalidConfigError, match="is in none"):
        plan.block_for(build_suite(["needle"], "test", [2048], [100]), SMOL, "context-first")
    with pytest.raises(InvalidConfigError, match="is in none"):
        plan.block_for(block_a, "gemma3-270m", "context-first")
    with pytest.raises(InvalidConfigError, match="not question-aware"):
        plan.block_for(block_a, SMOL, "question-aware")
    block_b = build_suite(["needle"], "test", [1024], [200])
    with pytest.raises(InvalidConfigError, match="--unseal B"):
        plan.block_for(block_b, SMOL, "context-first")
    assert plan.block_for(block_b, SMOL, "context-first", unseal="B").name == "B"


def test_a_missing_or_broken_plan_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="does not exist"):
        load_plan(tmp_path / "nowhere.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable evaluation plan"):
        load_plan(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(CheckpointError, match="not an evaluation plan"):
        load_plan(tmp_path / "other.json")
    (tmp_path / "block.json").write_text(json.dumps({"format": PLAN_FORMAT, "blocks": {"A": {"seeds": 3}}}))
    with pytest.raises(CheckpointError, match="block 'A'"):
        load_plan(tmp_path / "block.json")


def test_the_cli_refuses_a_test_run_outside_the_plan(tmp_path: Path, capsys) -> None:
    base = ["eval", "--policy", "random", "--budget", "64", "--tasks", "needle", "--out", str(tmp_path / "o")]
    assert main([*base, "--split", "test", "--plan", str(tmp_path / "nowhere.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    plan = str(_plan(tmp_path))
    assert main([*base, "--split", "test", "--plan", plan, "--protocol", "context-first", "--first-seed", "7"]) == 2
    assert "is in none" in capsys.readouterr().err


def test_the_committed_plan_loads_and_holds_the_published_easy_tables() -> None:
    plan = load_plan(Path(__file__).parents[2] / DEFAULT_PLAN)
    easy = build_suite(["needle", "multikey", "quote", "perplexity"], "test", [1024, 2048, 4096], range(34))
    assert plan.block_for(easy, SMOL, "question-aware").name == "easy"
    # block A: this evaluation's tables, whole contexts of multikey-shared; block B sealed, context-first only
    block_a = build_suite(["multikey-shared"], "test", [4096], range(100, 148))
    assert plan.block_for(block_a, SMOL, "question-aware").name == "A"
    code = build_suite(["code-default"], "test", [8192], [100])
    assert plan.block_for(code, "qwen2.5-coder-0.5b-instruct", "context-first").name == "A"
    block_b = build_suite(["multikey-shared"], "test", [4096], [200])
    with pytest.raises(InvalidConfigError, match="sealed"):
        plan.block_for(block_b, SMOL, "context-first")
    with pytest.raises(InvalidConfigError, match="not question-aware"):
        plan.block_for(block_b, SMOL, "question-aware", unseal="B")
    # B adds 9.5 %, the self-sized memories' measured cache on validation, to 12.5 and 25 %
    sealed_b = plan.block_for(block_b, SMOL, "context-first", unseal="B")
    sealed_b.check_budgets(["9.5%", "12.5%", "25%", None])
    with pytest.raises(InvalidConfigError, match="plans the budgets 0.095, 0.125, 0.25"):
        sealed_b.check_budgets(["5%"])


def test_a_block_with_budgets_refuses_others(tmp_path: Path) -> None:
    path = _plan(tmp_path)
    data = json.loads(path.read_text())
    data["blocks"]["A"]["budgets"] = [0.125, 0.25]
    path.write_text(json.dumps(data))
    block = load_plan(path).block_for(build_suite(["needle"], "test", [1024], [100]), SMOL, "context-first")
    block.check_budgets(["12.5%", 0.25, None])  # a self-sized policy's run has no budget
    with pytest.raises(InvalidConfigError, match="plans the budgets 0.125, 0.25"):
        block.check_budgets(["50%"])
    with pytest.raises(InvalidConfigError, match="not '256'"):
        block.check_budgets(["256"])
    base = ["eval", "--policy", "random", "--tasks", "needle", "--lengths", "1024", "--seeds", "1"]
    args = [*base, "--split", "test", "--plan", str(path), "--protocol", "context-first", "--first-seed", "100"]
    assert main([*args, "--budget", "5%", "--out", str(tmp_path / "o")]) == 2
