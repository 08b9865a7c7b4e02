"""The keep rule (`kvpolicy.eval.keep_rule`), recomputed from run folders: kept only where the
full cache is 25 points above chance and a closed-book run at most 10 above it."""

from __future__ import annotations

import json

from test_paired import result

from kvpolicy.eval.keep_rule import cells, main
from kvpolicy.eval.results import ResultStore


def _run(folder, closed: bool, scores: list[float], task: str = "needle") -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"model": "m", "closed_book": closed}))
    store = ResultStore(folder / "results.jsonl")
    for seed, score in enumerate(scores):
        store.add(result(task, seed, score, "full"))


def test_the_rule_needs_both_runs_and_both_margins(tmp_path, capsys) -> None:
    _run(tmp_path / "a", False, [1.0, 1.0, 0.0, 1.0])
    _run(tmp_path / "a-closed", True, [0.0, 0.0, 0.0, 0.0])
    _run(tmp_path / "b", False, [1.0, 1.0], task="multikey")  # chance 25: 100 is kept
    _run(tmp_path / "b-closed", True, [0.5, 0.5], task="multikey")  # but closed-book is 25 above chance
    _run(tmp_path / "c", False, [0.25, 0.5], task="quote")  # no closed-book run
    by_task = {c.task: c for c in cells(sorted(p for p in tmp_path.iterdir()))}
    assert by_task["needle"].verdict == "kept" and by_task["needle"].full == 0.75
    assert by_task["needle"].closed_items == 4
    assert by_task["multikey"].verdict.startswith("no: closed-book +25.0")
    assert by_task["quote"].verdict.startswith("undecided")
    assert main([str(tmp_path)]) == 0
    assert "| needle | m | 2048 | 75.0 (4) | 0.0 (4) | 0.0 | kept |" in capsys.readouterr().out


def test_the_memory_profiles_hold_only_what_the_committed_validation_kept() -> None:
    from pathlib import Path

    from kvpolicy.eval.profiles import PROFILES

    root = Path(__file__).parents[2] / "docs" / "task-validation"
    verdicts = {
        (c.task, c.model, c.length): c.verdict for c in cells(sorted(p.parent for p in root.glob("*/summary.json")))
    }
    for profile, model, length in (("memory-smollm2", "smollm2-135m-instruct", 4096),
                                   ("hard-qwen", "qwen2.5-coder-0.5b-instruct", 8192)):  # fmt: skip
        for task in PROFILES[profile].tasks:
            assert verdicts[(task, model, length)] == "kept", (profile, task)
