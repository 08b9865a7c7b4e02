"""The long-context benchmark's machinery at a tiny size: one subprocess per run, results that
resume, ratios to the full cache of the same round. Timings are never asserted."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_long_context")


def _argv(results: Path) -> list[str]:
    return ["--models", "tiny:llama:320", "--variants", "full,tova", "--budgets", "25%", "--rounds", "1",
            "--decode", "3", "--chunk", "64", "--threads", "1", "--results", str(results)]  # fmt: skip


def test_runs_resume_and_ratios_pair_rounds(bench, tmp_path, capsys):
    results = tmp_path / "long.jsonl"
    bench.main(_argv(results))
    records = bench.load_results(results)
    assert [(r["variant"], r["budget"]) for r in records] == [("full", "-"), ("tova", "25%")]
    full, tova = records
    assert full["schedule"] == "never" and tova["schedule"] == "every_step"
    assert tova["kv_bytes"] < full["kv_bytes"] == full["full_kv_bytes"]
    assert tova["eviction_passes"] > 0 and tova["statistics_bytes"] > 0 and full["statistics_bytes"] == 0
    assert len(tova["generated"]) == 3 and len(tova["decode_steps_ms"]) == 3

    before = results.read_text()
    bench.main(_argv(results))  # everything is there: nothing runs, nothing is rewritten
    assert results.read_text() == before
    table = capsys.readouterr().out
    assert "| tova | 25% | every_step |" in table

    rows = {r["variant"]: r for r in bench.summarize(records, "tiny:llama", 320, 3)}
    assert rows["tova"]["prefill_speedup"] == pytest.approx(full["prefill_s"] / tova["prefill_s"])
    assert rows["tova"]["decode_speedup"] == pytest.approx(
        statistics.median(full["decode_steps_ms"]) / statistics.median(tova["decode_steps_ms"]), rel=1e-2
    )
    assert rows["tova"]["kv_ratio"] == pytest.approx(tova["kv_bytes"] / full["kv_bytes"])
    assert rows["full"]["prefill_speedup"] == 1.0


def test_variant_schedules(bench):
    assert bench.describe_schedule(bench.build_variant("snapkv", "25%", 512)) == "after_prefill"
    assert bench.describe_schedule(bench.build_variant("snapkv/chunk", "25%", 512)) == "every_n 512"
    assert bench.describe_schedule(bench.build_variant("tova/slack32", "25%", 512)) == "every_step, slack 32"
    with pytest.raises(SystemExit, match="preset/chunk"):
        bench.build_variant("tova/sometimes", "25%", 512)


def test_results_file_is_json_lines(bench, tmp_path):
    path = tmp_path / "r.jsonl"
    records = [{"model": "m", "tokens": 1, "variant": "full", "budget": "-", "round": 0, "decode": 1}]
    bench.save_results(path, records)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert bench.load_results(path) == records
