"""``kvpolicy eval`` / ``kvpolicy compare`` argument handling (errors come before any model loads)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvpolicy.cli import main
from kvpolicy.cli.compare import _grid, comparison_table, length_comparison_table
from kvpolicy.cli.eval import add_suite_arguments, suite_items
from kvpolicy.eval.report import TaskSummary
from kvpolicy.eval.run import RunSummary


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--policy", "strem_llm", "--budget", "64"], "Did you mean 'streaming_llm'"),
        (["eval", "--policy", "random", "--budget", "lots"], "cannot read budget"),
        (["eval", "--policy", "random", "--budget", "64", "--tasks", "needle,sudoku"], "unknown task(s) sudoku"),
        (["eval", "--policy", "random", "--budget", "64", "--lengths", "1k"], "--lengths takes"),
        (["compare", "--policy", "full", "--policy", "random", "--budget", "64", "--seeds", "0"], "--seeds must be"),
        (["eval", "--policy", "random", "--budget", "64", "--first-seed", "-3"], "--first-seed must be"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(argv, message, tmp_path: Path, capsys) -> None:
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_first_seed_moves_the_items_to_seeds_no_default_run_draws() -> None:
    parser = argparse.ArgumentParser()
    add_suite_arguments(parser)
    base = ["--out", "x", "--profile", "full", "--tasks", "needle", "--lengths", "2048", "--split", "train"]
    default = suite_items(parser.parse_args([*base, "--seeds", "3"]))
    tuning = suite_items(parser.parse_args([*base, "--seeds", "3", "--first-seed", "1000"]))
    assert [i.seed for i in default] == [0, 1, 2]
    assert [i.seed for i in tuning] == [1000, 1001, 1002]
    assert {i.context for i in tuning}.isdisjoint({i.context for i in default})
    profile_sized = suite_items(parser.parse_args([*base, "--first-seed", "1000"]))
    assert profile_sized[0].seed == 1000 and len(profile_sized) == len(suite_items(parser.parse_args(base)))


def test_compare_runs_self_sizing_policies_once() -> None:
    grid = _grid(["full", "streaming_llm"], ["64", "128"])
    assert [(spec, budget) for spec, budget, _ in grid] == [
        ("full", None),
        ("streaming_llm", "64"),
        ("streaming_llm", "128"),
    ]


def test_comparison_table_reports_measured_cache_and_normalised_scores() -> None:
    def row(task: str, normalised: float) -> TaskSummary:
        return TaskSummary(task, 2, 0.5, 0.1, 1.0, 0.0, normalised, 0.1, -0.5, 0.2, 0.25, 1000.0, 3.0)

    summary = RunSummary("random@64", (row("needle", 0.5), row("all", 0.5)), (0.25,), Path("."))
    table = comparison_table([summary], ["needle"])
    assert "| random@64 | 25.0% | 50 | 50.0 ± 10.0 | -50.0 ± 20.0 |" in table
    assert length_comparison_table([summary]) == ""  # one length: nothing to break down
    by_length = ((1024, row("all", 0.75)), (2048, row("all", 0.25)))
    two = RunSummary("random@64", summary.rows, (0.25,), Path("."), by_length)
    assert "| random@64 | 75.0 ± 10.0 (25%) | 25.0 ± 10.0 (25%) |" in length_comparison_table([two])


def test_all_presets_adds_every_registered_preset_once() -> None:
    import kvpolicy
    from kvpolicy.cli.compare import add_arguments, policy_specs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--policy", "snapkv-span", "--all-presets"])
    specs = policy_specs(args)
    assert specs[0] == "snapkv-span" and sorted(specs) == sorted(kvpolicy.default_registry().preset_names())
    assert {"tova-span", "namm-bam-smollm2", "full"} <= set(specs)
    with pytest.raises(Exception, match="--all-presets"):
        policy_specs(parser.parse_args(["--out", "x"]))
