"""The ``ci`` profile on the real SmolLM2: the harness ranks random eviction at a small budget
below the full cache by more than the paired standard error. Slow on a loaded CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvpolicy
from kvpolicy.eval.profiles import get_profile
from kvpolicy.eval.run import run_suite

pytestmark = pytest.mark.real_model


def test_random_eviction_ranks_below_full_cache(tmp_path: Path) -> None:
    from kvpolicy.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    items = get_profile("ci").items("test", tasks=("needle", "multikey"))
    common = dict(model_name="smollm2-135m-instruct", reference_dir=tmp_path / "refs", progress=False)
    bad = run_suite(
        kvpolicy.build("random", budget=64), items, model, tokenizer, out=tmp_path / "random", label="random", **common
    )
    overall = bad.overall
    assert overall.reference > 0.5  # the full cache solves most retrieval items at 1k tokens
    assert overall.kept_fraction < 0.15  # measured: 64 of ~1000 tokens per head
    assert -overall.delta > max(overall.delta_se, 0.05)  # random eviction loses more than its standard error


def test_the_cli_runs_context_first_and_records_it(tmp_path: Path, capsys) -> None:
    """``kvpolicy eval --protocol context-first`` on the real SmolLM2: the needle item's context is
    compressed by SnapKV before the question exists, and every record and the summary say so."""
    import json

    from kvpolicy.cli import main
    from kvpolicy.eval.results import ResultStore

    argv = ["eval", "--policy", "snapkv", "--budget", "25%", "--protocol", "context-first", "--profile", "ci",
            "--tasks", "needle", "--seeds", "1", "--reference-dir", str(tmp_path / "refs"), "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["protocol"] == "context-first"
    (result,) = ResultStore(tmp_path / "run" / "results.jsonl", "context-first")
    assert 0.2 < result.kept_fraction < 0.35  # 25% of the context, plus the question kept whole
    assert [p.name for p in (tmp_path / "refs").iterdir()] == [
        "reference-smollm2-135m-instruct-task-chunk512-context-first.jsonl"
    ]
    # the same folder refuses the other protocol
    assert main([*argv[:6], "question-aware", *argv[7:], "--out", str(tmp_path / "run")]) == 2
    assert "never share a file" in capsys.readouterr().err


def test_one_folder_holds_several_compare_reports(tmp_path: Path) -> None:
    """``--report NAME`` writes NAME.md/.png/.json over the folder's records: a second report of the
    same runs reads them back (the shared records are not run again) and leaves the first in place."""
    from kvpolicy.cli import main

    argv = ["compare", "--policy", "snapkv", "--budget", "25%", "--profile", "ci", "--tasks", "needle",
            "--seeds", "1", "--reference-dir", str(tmp_path / "refs"), "--no-progress", "--out", str(tmp_path / "c")]  # fmt: skip
    assert main(argv) == 0
    records = (tmp_path / "c" / "runs" / "snapkv@25%" / "results.jsonl").read_text()
    assert main([*argv, "--report", "again"]) == 0
    assert (tmp_path / "c" / "runs" / "snapkv@25%" / "results.jsonl").read_text() == records
    first, again = ((tmp_path / "c" / f"{name}.md").read_text() for name in ("compare", "again"))
    assert first == again and "snapkv@25%" in first
    assert {p.name for p in (tmp_path / "c").iterdir()} >= {"compare.png", "again.png", "again.json"}
