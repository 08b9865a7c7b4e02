"""The score-next-to-speed table: a benchmark variant finds the compare run of the same schedule,
speed ratios come from the benchmark's own summary, and a variant nobody scored says so."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def table(load_benchmark):
    return load_benchmark("score_next_to_speed")


def _speed(variant: str, budget: str, prefill: float, decode: float, peak: int) -> dict:
    return {"model": "m", "tokens": 4096, "decode": 4, "round": 0, "variant": variant, "budget": budget,
            "schedule": "every_step", "prefill_s": prefill, "decode_ms": decode, "kv_bytes": 100,
            "statistics_bytes": 0, "peak_above_model_bytes": peak, "pass_s": 0.0, "generated": [1, 2, 3, 4]}  # fmt: skip


def _summary(folder, label: str, normalised: float, model: str = "m") -> None:
    run = folder / "runs" / label
    run.mkdir(parents=True, exist_ok=True)
    overall = {"task": "all", "n": 48, "kept_fraction": 0.25, "normalised": normalised, "normalised_se": 0.1,
               "delta": normalised - 1.0, "delta_se": 0.05}  # fmt: skip
    summary = {"model": model, "label": label, "protocol": "context-first", "by_length": [overall]}
    (run / "summary.json").write_text(json.dumps(summary))


def test_variants_meet_their_scores(table, tmp_path, capsys):
    speed = tmp_path / "speed.jsonl"
    records = [_speed("full", "-", 10.0, 100.0, 400), _speed("tova", "25%", 5.0, 80.0, 100),
               _speed("snapkv/chunk", "25%", 8.0, 50.0, 200), _speed("tova/slack64", "25%", 5.0, 40.0, 100)]  # fmt: skip
    speed.write_text("".join(json.dumps(r) + "\n" for r in records))
    shipped, variants = tmp_path / "T1", tmp_path / "T5"
    _summary(shipped, "full", 1.0)
    _summary(shipped, "tova@25%", 0.5)
    _summary(variants, "snapkv-chunk@25%", 0.75)
    _summary(variants, "tova@25%", 0.1, model="other")  # another model's run: not read
    table.main(["--model", "m", "--speed", str(speed), "--scores", str(shipped), "--scores", str(variants)])
    out = capsys.readouterr().out
    assert "| tova | 25% | 48 | 25.0% | 50.0 ± 10.0 | -50.0 ± 5.0 | 2.00 | 1.25 | 0.25 |" in out
    assert "| snapkv/chunk | 25% | 48 | 25.0% | 75.0 ± 10.0 | -25.0 ± 5.0 | 1.25 | 2.00 | 0.50 |" in out
    assert "| tova/slack64 | 25% | – | – | – | – | 2.00 | 2.50 | 0.25 |" in out

    _summary(variants, "tova@25%", 0.2)  # the same policy scored twice: which would the table show?
    with pytest.raises(SystemExit, match="scored in two folders"):
        table.main(["--model", "m", "--speed", str(speed), "--scores", str(shipped), "--scores", str(variants)])
