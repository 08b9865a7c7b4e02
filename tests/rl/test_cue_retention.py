"""Cue retention read from the cache: which of the cue steps' tokens each policy still holds when
the first final-phase action is taken. Real rollouts of the shipped model on a short cue task."""

from __future__ import annotations

import pytest

pytest.importorskip("gymnasium", reason="needs the rl extra: pip install 'kvpolicy[rl]'")
pytest.importorskip("mujoco", reason="needs the rl extra: pip install 'kvpolicy[rl]'")

import kvpolicy  # noqa: E402
from kvpolicy.rl.cli import SHIPPED_MODEL  # noqa: E402
from kvpolicy.rl.envs import CueTaskConfig  # noqa: E402
from kvpolicy.rl.model import DecisionTransformer  # noqa: E402
from kvpolicy.rl.rollout import cue_positions, rollout  # noqa: E402
from kvpolicy.types import Schedule  # noqa: E402

pytestmark = pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="the shipped Decision Transformer is missing")

#: cue at steps 3-5 (tokens 9..17), final phase from step 30: read with tokens 0..88 cached
TASK = CueTaskConfig(horizon=34, cue_start=3, cue_steps=3, final_steps=4)
SINKS = 4  # streaming_llm's attention sinks


@pytest.fixture(scope="module")
def model() -> DecisionTransformer:
    return DecisionTransformer.load(SHIPPED_MODEL)


def _streaming(budget: int) -> kvpolicy.Policy:
    return kvpolicy.build("streaming_llm", budget=budget, schedule=Schedule("every_step"))


def _expected_streaming(budget: int) -> float:
    """StreamingLLM holds the sinks and the ``budget - sinks`` newest of the tokens seen so far."""
    start, stop = cue_positions(TASK)
    seen = 3 * TASK.final_start - 1
    held = set(range(SINKS)) | set(range(seen - (budget - SINKS), seen))
    return len(held & set(range(start, stop))) / (stop - start)


def test_cue_positions_are_the_cue_steps_tokens():
    assert cue_positions(TASK) == (9, 18)
    assert cue_positions(CueTaskConfig()) == (60, 90)  # steps 20-29 of the shipped task


def test_full_cache_keeps_the_whole_cue(model):
    result = rollout(model, seed=0, cue=1, task=TASK, policy=kvpolicy.build("full"))
    assert result.cue_kept == 1.0
    assert result.cue_kept_per_layer == (1.0,) * model.backbone.config.num_hidden_layers


@pytest.mark.parametrize("budget", [16, 80])
def test_streaming_llm_keeps_what_its_window_covers(model, budget):
    result = rollout(model, seed=1, cue=-1, task=TASK, policy=_streaming(budget))
    expected = _expected_streaming(budget)
    assert result.cue_kept == pytest.approx(expected)
    assert all(share == pytest.approx(expected) for share in result.cue_kept_per_layer)
    assert expected == (0.0 if budget == 16 else 5 / 9)  # far behind the window / partly inside it


def test_no_reading_without_an_evicting_cache_or_a_final_phase(model):
    assert rollout(model, seed=0, cue=1, task=TASK).cue_kept is None  # the bare model
    cut = rollout(model, seed=0, cue=1, task=TASK, policy=kvpolicy.build("full"), steps=TASK.final_start)
    assert cut.cue_kept is None and cut.cue_kept_per_layer is None
