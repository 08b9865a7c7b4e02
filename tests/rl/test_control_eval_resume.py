"""`evaluate_control` runs blocks of seeds as batches, block by block, resumes from ``results.jsonl``
(a torn last line from a killed run is rerun) and gives every episode the same record however the
run was cut; a batch row does not depend on the other rows."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gymnasium", reason="needs the rl extra: pip install 'kvpolicy[rl]'")
pytest.importorskip("mujoco", reason="needs the rl extra: pip install 'kvpolicy[rl]'")

from kvpolicy.errors import InvalidConfigError  # noqa: E402
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
    evaluate_control(model, variants, 3, tmp_path, batch=2, steps=STEPS, log=logged.append)
    rows = _lines(tmp_path / "results.jsonl")
    order = [(r["policy"], r["seed"]) for r in rows]
    assert order == [("h2o@16", 0), ("h2o@16", 1), ("random@16", 0), ("random@16", 1), ("h2o@16", 2), ("random@16", 2)]
    assert [r["batch"] for r in rows] == [2, 2, 2, 2, 1, 1] and len(logged) == 4

    # a killed run: the last line torn half-way; the rerun drops it, reruns that episode, adds seed 3
    path = tmp_path / "results.jsonl"
    text = path.read_text()
    path.write_text(text[: text.rindex("{") + 20])
    logged.clear()
    summary = evaluate_control(model, variants, 4, tmp_path, batch=2, steps=STEPS, log=logged.append)
    assert [line.split(":")[0] for line in logged] == ["h2o@16 seeds 2-3", "random@16 seeds 2-3"]
    resumed = _lines(path)
    assert [r["episodes"] for r in summary] == [4, 4] and len(resumed) == 8
    assert resumed[:5] == rows[:5]
    # random@16 seed 2, torn, was rerun in a batch of 2 (seeds 2-3) instead of 1: a row does not depend
    # on its companions, but batched arithmetic may differ from a batch of one in the last bits
    rerun = {(r["policy"], r["seed"]): r for r in resumed}[("random@16", 2)]
    assert rerun["batch"] == 2 and rerun["kept_fraction"] == rows[5]["kept_fraction"]

    # the same blocks run in a fresh folder for one variant alone: the same records
    alone = tmp_path / "alone"
    evaluate_control(model, [variants[0]], 4, alone, batch=2, steps=STEPS, log=lambda s: None)
    by_key = {(r["policy"], r["seed"]): r for r in resumed}
    fresh = _lines(alone / "results.jsonl")
    assert [by_key[("h2o@16", r["seed"])] for r in fresh if r["seed"] < 2] == fresh[:2]
    assert evaluate_control(model, variants, 4, tmp_path, batch=2, steps=STEPS, log=logged.append) == summary
    with pytest.raises(InvalidConfigError, match="batch"):
        evaluate_control(model, variants, 4, tmp_path, batch=0, steps=STEPS)
