"""`evaluate_control` runs in rounds of one cue pair, resumes from ``results.jsonl`` (a torn last
line from a killed run is rerun) and gives every episode the result it has when run alone."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gymnasium", reason="needs the rl extra: pip install 'kvpolicy[rl]'")
pytest.importorskip("mujoco", reason="needs the rl extra: pip install 'kvpolicy[rl]'")

from kvpolicy.rl.cli import SHIPPED_MODEL  # noqa: E402
from kvpolicy.rl.control_eval import ControlVariant, evaluate_control  # noqa: E402
from kvpolicy.rl.model import DecisionTransformer  # noqa: E402

pytestmark = pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="the shipped Decision Transformer is missing")

STEPS = 24  # 71 tokens: enough for a budget of 16 to evict


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rounds_resume_and_order_independence(tmp_path):
    model = DecisionTransformer.load(SHIPPED_MODEL)
    variants = [ControlVariant.parse("h2o@16"), ControlVariant.parse("random@16")]
    logged: list[str] = []
    evaluate_control(model, variants, 3, tmp_path, steps=STEPS, log=logged.append)
    rows = _lines(tmp_path / "results.jsonl")
    order = [(r["policy"], r["seed"]) for r in rows]
    assert order == [("h2o@16", 0), ("h2o@16", 1), ("random@16", 0), ("random@16", 1), ("h2o@16", 2), ("random@16", 2)]
    assert len(logged) == 6

    # a killed run: the last line torn half-way; the rerun drops it, reruns that episode, adds seed 3
    path = tmp_path / "results.jsonl"
    text = path.read_text()
    path.write_text(text[: text.rindex("{") + 20])
    logged.clear()
    summary = evaluate_control(model, variants, 4, tmp_path, steps=STEPS, log=logged.append)
    assert [line.split(" (")[0] for line in logged] == ["h2o@16 seed 3", "random@16 seed 2", "random@16 seed 3"]
    resumed = _lines(path)
    assert [r["episodes"] for r in summary] == [4, 4] and len(resumed) == 8
    assert resumed[:5] == rows[:5] and resumed[6] == rows[5]  # the rerun episode gives the same record

    # every episode as if run alone, in a fresh folder: the same record
    alone = tmp_path / "alone"
    evaluate_control(model, [variants[1]], 4, alone, steps=STEPS, log=lambda s: None)
    by_key = {(r["policy"], r["seed"]): r for r in resumed}
    assert all(by_key[(r["policy"], r["seed"])] == r for r in _lines(alone / "results.jsonl"))
    assert evaluate_control(model, variants, 4, tmp_path, steps=STEPS, log=logged.append) == summary  # nothing left
