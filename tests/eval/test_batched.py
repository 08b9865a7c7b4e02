"""Runs of left-padded batches on disk: a stored result chunked otherwise is recomputed, and the CLI
refuses a batch where it makes no sense (equality with items run alone: test_row_plans.py)."""

from __future__ import annotations

from pathlib import Path

import kvpolicy
from kvpolicy.eval.results import ResultStore
from kvpolicy.eval.run import run_suite
from kvpolicy.eval.tasks import build_suite


def test_a_resumed_run_recomputes_results_chunked_otherwise(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    items = build_suite(["needle"], "test", [256], [0, 1])
    policy = kvpolicy.build("streaming_llm", budget=48)
    settings = {"label": "s", "model_name": "tiny", "chunk_size": 96, "reference_dir": tmp_path / "refs"}
    settings["progress"] = False
    run_suite(policy, items, tiny_model, tiny_tokenizer, out=tmp_path / "run", **settings)
    store = ResultStore(tmp_path / "run" / "results.jsonl")
    assert {r.chunks for r in store} == {"start"}
    run_suite(policy, items, tiny_model, tiny_tokenizer, out=tmp_path / "run", batch_size=2, **settings)
    assert {r.chunks for r in ResultStore(tmp_path / "run" / "results.jsonl")} == {"end"}


def test_cli_refuses_batching_a_shared_prefill(capsys) -> None:
    from kvpolicy.cli import main

    args = ["compare", "--policy", "h2o", "--shared-prefill", "--batch-size", "4", "--out", "unused"]
    assert main(args) != 0
    assert "--shared-prefill" in capsys.readouterr().err
