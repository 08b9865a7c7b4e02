"""The Decision Transformer pipeline on the real cue task (gymnasium + MuJoCo), tiny: skipped
cleanly when the ``rl`` extra is not installed."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gymnasium", reason="needs the rl extra: pip install 'kvpolicy[rl]'")
pytest.importorskip("mujoco", reason="needs the rl extra: pip install 'kvpolicy[rl]'")

import kvpolicy  # noqa: E402
from kvpolicy.rl.cli import SHIPPED_MODEL, main, smoke_configs  # noqa: E402
from kvpolicy.rl.envs import CueTaskConfig, make_env  # noqa: E402
from kvpolicy.rl.model import DecisionTransformer  # noqa: E402
from kvpolicy.rl.rollout import rollout  # noqa: E402
from kvpolicy.rl.train import cue_probe, returns_to_go  # noqa: E402
from kvpolicy.types import Schedule  # noqa: E402


def test_cue_is_visible_only_early_and_decides_the_final_reward():
    task = CueTaskConfig(
        horizon=40, cue_start=3, cue_steps=2, final_steps=10, final_weight=2.0, final_weight_backward=3.0
    )
    rewards = {}
    for cue in (1, -1):
        env = make_env(task)
        obs, info = env.reset(seed=0, options={"cue": cue})
        shown, flags, total_final = [], [], 0.0
        for t in range(task.horizon):
            shown.append(obs[17])
            flags.append(obs[18])
            obs, reward, _, truncated, info = env.step(np.sin(t + np.arange(6)))
            if t >= task.final_start:
                expected = (2.0 if cue == 1 else -3.0) * info["x_velocity"] + info["reward_ctrl"]
                assert reward == pytest.approx(expected)
                total_final += reward
        assert truncated  # the episode ends at the horizon
        assert [t for t, v in enumerate(shown) if v != 0] == [3, 4] and all(shown[t] == cue for t in (3, 4))
        assert [t for t, v in enumerate(flags) if v] == list(range(task.final_start, task.horizon))
        rewards[cue] = total_final
    assert rewards[1] != rewards[-1]


def test_returns_to_go():
    assert returns_to_go(np.array([[1.0, 2.0, 3.0]])).tolist() == [[6.0, 5.0, 3.0]]


def test_smoke_pipeline_and_keep_all_actions_are_bit_identical(tmp_path):
    assert main(["smoke", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    labels = ["full", "full:hide-cue", "h2o@16", "tova@16", "namm-bam-smollm2@25%"]
    assert [row["policy"] for row in summary] == labels
    full = summary[0]
    assert full["kept"] == 1.0 and full["episodes"] == 2
    assert summary[1]["kept"] == 1.0 and summary[1]["curve"] == "full:hide-cue"
    assert summary[2]["kept"] < 0.5  # 16 of up to 179 tokens
    assert (tmp_path / "return_vs_cache.png").stat().st_size > 0
    # cue kept, read from the cache at the final phase's first step (45): per episode and summarised
    episodes = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(episodes) == 10 and all(len(e["cue_kept_per_layer"]) == 2 for e in episodes)
    assert [e["cue_kept"] for e in episodes if e["preset"] == "full"] == [1.0] * 4
    assert summary[2]["cue_kept"] < 1.0  # h2o@16: 16 of up to 134 tokens cannot all be the cue's 9
    assert "cue kept at step 45" in (tmp_path / "summary.md").read_text()

    model = DecisionTransformer.load(tmp_path / "decision_transformer.safetensors")
    task, _, _ = smoke_configs()
    assert model.metadata["task"] == task.task.to_dict()
    bare = rollout(model, seed=3, cue=-1)
    attached = rollout(model, seed=3, cue=-1, policy=kvpolicy.build("full"))
    assert bare.actions.shape == (60, 6)
    assert np.array_equal(bare.actions, attached.actions)
    assert bare.episode_return == attached.episode_return
    blind = rollout(model, seed=3, cue=-1, hide_cue=True)
    shown_from = task.task.cue_start
    assert np.array_equal(blind.actions[:shown_from], bare.actions[:shown_from])  # same until the cue shows
    assert not np.array_equal(blind.actions, bare.actions)
    with np.load(tmp_path / "dataset.npz") as data:
        probe = cue_probe(model, dict(data), task.task, episodes=2, prefix=4, window=8)
    assert set(probe) == {"mse_with_cue", "mse_cue_hidden"} and all(np.isfinite(v) for v in probe.values())
    evicting = rollout(
        model, seed=3, cue=-1, policy=kvpolicy.build("streaming_llm", budget=8, schedule=Schedule("every_step"))
    )
    assert evicting.kept_fraction < 0.3 and not np.array_equal(bare.actions, evicting.actions)


@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="the shipped Decision Transformer is not installed")
def test_shipped_model_keep_all_is_exact_over_a_whole_rollout():
    model = DecisionTransformer.load(SHIPPED_MODEL)
    assert model.metadata["task"]["horizon"] >= 1000
    bare = rollout(model, seed=0, cue=1)
    attached = rollout(model, seed=0, cue=1, policy=kvpolicy.build("full"))
    assert bare.actions.shape[0] == model.metadata["task"]["horizon"]
    assert np.array_equal(bare.actions, attached.actions)
