"""The cue task on Hopper: the cue only in its window, the final phase paid by the cue, fixed-length
episodes (a fall does not end one), and a named error for a body that does not exist."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

pytest.importorskip("gymnasium", reason="needs the rl extra: pip install 'kvpolicy[rl]'")
pytest.importorskip("mujoco", reason="needs the rl extra: pip install 'kvpolicy[rl]'")

from kvpolicy.errors import InvalidConfigError  # noqa: E402
from kvpolicy.rl.cli import main  # noqa: E402
from kvpolicy.rl.data import data_config  # noqa: E402
from kvpolicy.rl.env_specs import UnknownEnvError, env_spec  # noqa: E402
from kvpolicy.rl.envs import CueTaskConfig, make_env  # noqa: E402


def test_hopper_cue_window_final_reward_and_fixed_length():
    task = CueTaskConfig(
        env="hopper", horizon=60, cue_start=3, cue_steps=2, final_steps=20, final_weight=2.0, final_weight_backward=3.0
    )
    assert task.cue_index == 11 and make_env(task).observation_space.shape == (13,)
    for cue in (1, -1):
        env = make_env(task)
        obs, _ = env.reset(seed=0, options={"cue": cue})
        shown, flags, unhealthy = [], [], 0
        for t in range(task.horizon):
            shown.append(obs[11])
            flags.append(obs[12])
            obs, reward, terminated, truncated, info = env.step(np.array([1.0, -1.0, 1.0]))  # falls over
            if t >= task.final_start and cue == -1:  # slow down: 3 x (2 x healthy - |velocity|)
                expected = 3.0 * (2.0 * info["reward_survive"] - abs(info["x_velocity"])) + info["reward_ctrl"]
            else:
                weight = 2.0 if t >= task.final_start else 1.0
                expected = weight * info["x_velocity"] + info["reward_ctrl"] + info["reward_survive"]
            assert reward == pytest.approx(expected)
            unhealthy += info["reward_survive"] == 0.0
            assert not terminated  # a fall costs the healthy reward, it does not end the episode
        assert truncated and unhealthy > 0
        assert [t for t, v in enumerate(shown) if v != 0] == [3, 4] and all(shown[t] == cue for t in (3, 4))
        assert [t for t, v in enumerate(flags) if v] == list(range(task.final_start, task.horizon))


def test_hopper_defaults_and_halfcheetah_unchanged():
    hopper = data_config("hopper").task
    assert hopper.env == "hopper" and hopper.final_weight == env_spec("hopper").final_weight
    assert CueTaskConfig().to_dict() == {
        "env": "halfcheetah",
        "horizon": 1000,
        "cue_start": 20,
        "cue_steps": 10,
        "final_steps": 200,
        "final_weight": 4.0,
        "final_weight_backward": 10.0,
    }
    assert CueTaskConfig(**{k: v for k, v in CueTaskConfig().to_dict().items() if k != "env"}) == CueTaskConfig()


def test_unknown_body_is_a_named_error(capsys):
    with pytest.raises(UnknownEnvError, match="walker"):
        CueTaskConfig(env="walker")
    with pytest.raises(UnknownEnvError):
        data_config("walker")
    assert issubclass(UnknownEnvError, InvalidConfigError)
    assert main(["forget", "--out", "/nonexistent", "--env", "walker"]) == 2
    assert "unknown cue-task environment 'walker'" in capsys.readouterr().err


def test_ars_resumes_from_its_checkpoint_with_the_same_draws(tmp_path):
    from kvpolicy.rl.controllers import ArsConfig, forward_episode, train_ars

    spec = env_spec("hopper")
    config = ArsConfig(iterations=3, directions=2, top=1, episode_steps=30, seed=5)
    whole, snaps, history = train_ars(forward_episode(30), config, snapshot_at=(1,), spec=spec)
    path = tmp_path / "ars.npz"
    train_ars(forward_episode(30), attrs.evolve(config, iterations=2), snapshot_at=(1,), spec=spec, checkpoint=path)
    resumed, rsnaps, rhistory = train_ars(forward_episode(30), config, snapshot_at=(1,), spec=spec, checkpoint=path)
    assert whole.weights.shape == (3, 11)
    assert np.array_equal(whole.weights, resumed.weights) and np.array_equal(whole.std, resumed.std)
    assert np.array_equal(snaps[1].weights, rsnaps[1].weights) and history == rhistory


def test_hopper_smoke_pipeline(tmp_path):
    import json

    import kvpolicy
    from kvpolicy.rl.model import DecisionTransformer
    from kvpolicy.rl.rollout import rollout

    assert main(["smoke", "--out", str(tmp_path), "--env", "hopper"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["policy"] for row in summary][:2] == ["full", "full:hide-cue"]
    model = DecisionTransformer.load(tmp_path / "decision_transformer.safetensors")
    assert model.metadata["task"]["env"] == "hopper" and model.config.state_dim == 13 and model.config.act_dim == 3
    with np.load(tmp_path / "dataset.npz") as data:
        assert data["states"].shape[1:] == (60, 13) and data["actions"].shape[-1] == 3
    bare = rollout(model, seed=1, cue=-1)
    attached = rollout(model, seed=1, cue=-1, policy=kvpolicy.build("full"))
    assert bare.actions.shape == (60, 3) and np.array_equal(bare.actions, attached.actions)
    hidden = rollout(model, seed=1, cue=-1, hide_cue=True)
    assert np.array_equal(hidden.actions[:3], bare.actions[:3]) and not np.array_equal(hidden.actions, bare.actions)


def test_shipped_hopper_model_keep_all_is_exact_over_a_whole_rollout():
    import kvpolicy
    from kvpolicy.rl.cli import SHIPPED_HOPPER_MODEL
    from kvpolicy.rl.model import DecisionTransformer
    from kvpolicy.rl.rollout import rollout, task_config

    if not SHIPPED_HOPPER_MODEL.is_file():
        pytest.skip("the Hopper Decision Transformer is not installed")
    model = DecisionTransformer.load(SHIPPED_HOPPER_MODEL)
    assert task_config(model) == data_config("hopper").task
    bare = rollout(model, seed=0, cue=-1)
    attached = rollout(model, seed=0, cue=-1, policy=kvpolicy.build("full"))
    assert bare.actions.shape == (1000, 3)
    assert np.array_equal(bare.actions, attached.actions) and bare.episode_return == attached.episode_return
