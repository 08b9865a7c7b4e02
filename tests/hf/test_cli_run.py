"""``kvpolicy run``: policy resolution from presets, JSON files and saved policies; one real run."""

from __future__ import annotations

import argparse

import pytest

import kvpolicy
from kvpolicy.cli import main
from kvpolicy.cli.run import add_arguments, resolve_policy


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_policy_from_preset_json_and_safetensors(tmp_path):
    assert resolve_policy(_args("--budget", "25%", "--sinks", "2")).budget.ratio == 0.25
    assert resolve_policy(_args("--budget", "128")).budget.tokens == 128
    path = tmp_path / "policy.json"
    path.write_text(kvpolicy.build("streaming_llm", budget=300).to_json())
    assert resolve_policy(_args("--policy", str(path))).budget.tokens == 300
    saved = tmp_path / "policy.safetensors"
    kvpolicy.build("streaming_llm", budget=200, recent=8).save(str(saved))
    loaded = resolve_policy(_args("--policy", str(saved), "--budget", "100"))
    assert loaded.budget.tokens == 100 and loaded.protect.recent == 8


def test_bad_policy_is_a_clear_error(capsys):
    assert main(["run", "--policy", "no_such_policy"]) == 2
    assert "unknown policy preset" in capsys.readouterr().err
    assert main(["run", "--policy", "missing.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.real_model
def test_run_prints_answer_needle_and_cache(capsys):
    code = main(["run", "--context-tokens", "200", "--max-new-tokens", "20", "--budget", "64", "--compare-full"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("needle found:") == 2 and out.count("cache: tokens seen") == 2
    full = out.split("[full cache]")[1]
    assert "needle found: yes" in full and "cache kept 100.0%" in full
