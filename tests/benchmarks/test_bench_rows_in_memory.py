"""The rows-in-memory benchmark at a tiny size: one fresh process per (side, rows), a ladder that
stops at the cap, results that resume. Timings and peaks are never asserted beyond their kind."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_rows_in_memory")


def _argv(results, cap_mib: float) -> list[str]:
    return ["--model", "tiny:llama", "--tokens", "160", "--rows", "1,2", "--decode", "2", "--chunk", "64",
            "--threads", "1", "--cap-mib", str(cap_mib), "--results", str(results)]  # fmt: skip


def test_ladder_records_resume_and_budget_holds_less(bench, tmp_path, capsys):
    results = tmp_path / "rows.jsonl"
    bench.main(_argv(results, 1e6))  # a cap nothing reaches: every rung runs on both sides
    records = bench.load_results(results)
    assert [(r["side"], r["rows"]) for r in records] == [("full", 1), ("full", 2), ("budget", 1), ("budget", 2)]
    full = {r["rows"]: r for r in records if r["side"] == "full"}
    budget = {r["rows"]: r for r in records if r["side"] == "budget"}
    assert full[1]["policy"] == "-" and budget[1]["policy"] == "tova"
    for rows in (1, 2):
        assert budget[rows]["kv_bytes"] < full[rows]["kv_bytes"]
        assert full[rows]["tokens_per_s"] > 0 and full[rows]["peak_above_model_bytes"] >= 0
    assert full[2]["kv_bytes"] > full[1]["kv_bytes"]
    capsys.readouterr()

    before = results.read_text()
    bench.main(_argv(results, 1e6))  # everything is there: nothing runs, nothing is rewritten
    assert results.read_text() == before
    assert "| full cache | 2 |" in capsys.readouterr().out

    bench.main(_argv(results, -1.0))  # every peak passes a negative cap: no rung fits
    assert "| full cache | 0 | – |" in capsys.readouterr().out

    bench.main(_argv(results, 1e6) + ["--sides", "budget"])  # one side alone: the other is not in the table
    out = capsys.readouterr().out
    assert "| tova at 25% | 2 |" in out and "full cache" not in out
    with pytest.raises(SystemExit, match="--sides takes full, budget or both"):
        bench.main(_argv(results, 1e6) + ["--sides", "budget,bogus"])
