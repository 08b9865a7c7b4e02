"""Offline data for the cue task: random, medium and expert trajectories.

`make_controllers` trains the two ARS controllers (forward, and the turn-around to backwards)
and keeps early snapshots of both as the "medium" ones; `collect` plays `CuedHalfCheetah`
episodes with a controller, cues alternating +1 / -1 so both are equally represented. Every
file is written atomically and an existing one is reused, so an interrupted run resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from kvpolicy.atomic import atomic_path
from kvpolicy.errors import KVPolicyError
from kvpolicy.rl.controllers import (
    ArsConfig,
    CueController,
    LinearController,
    RandomController,
    backward_episode,
    forward_episode,
    train_ars,
)
from kvpolicy.rl.env_specs import EnvSpec, env_spec
from kvpolicy.rl.envs import CueTaskConfig, make_env

KINDS = ("random", "medium", "expert")


class DataCollectionError(KVPolicyError):
    """A controller failed too often to collect the episodes asked for."""


@attrs.frozen
class DataConfig:
    """How much data and controller training (defaults: the shipped model's data set)."""

    task: CueTaskConfig = attrs.field(factory=CueTaskConfig)
    forward: ArsConfig = attrs.field(factory=lambda: ArsConfig(iterations=100, directions=8, top=4, seed=0))
    backward: ArsConfig = attrs.field(
        factory=lambda: ArsConfig(iterations=60, directions=8, top=4, episode_steps=200, seed=1)
    )
    warmup: int = 100  # forward steps before the turn-around is scored
    medium_fraction: float = 0.25  # medium = the snapshot after this fraction of the iterations
    episodes: dict[str, int] = attrs.field(factory=lambda: {"random": 16, "medium": 48, "expert": 64})
    #: medium / expert episodes whose return before the final phase is below this are replayed
    #: with another seed (the controller flipped the cheetah over); None keeps every episode
    min_main_return: float | None = 0.0
    seed: int = 0


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def make_controllers(config: DataConfig, path: Path, log: Callable[[str], None] = print) -> dict[str, CueController]:
    """Train (or load from ``path``) the expert and medium `CueController`."""
    if not path.is_file():
        medium_fwd = max(1, round(config.forward.iterations * config.medium_fraction))
        medium_bwd = max(1, round(config.backward.iterations * config.medium_fraction))
        spec = config.task.spec
        forward, fsnap, fhist = train_ars(
            forward_episode(config.forward.episode_steps, spec.ars_velocity_weight),
            config.forward,
            snapshot_at=(medium_fwd,),
            log=log,
            spec=spec,
            checkpoint=path.with_name(path.stem + ".forward-ars.npz"),
        )
        backward, bsnap, bhist = train_ars(
            backward_episode(
                forward,
                config.warmup,
                config.backward.episode_steps,
                spec.ars_velocity_weight,
                slow_healthy_weight=spec.ars_slow_healthy_weight if spec.cue_minus == "slow" else None,
            ),
            config.backward,
            snapshot_at=(medium_bwd,),
            log=log,
            spec=spec,
            checkpoint=path.with_name(path.stem + ".backward-ars.npz"),
            **_turn_start(spec, forward),
        )
        arrays = {
            **forward.to_arrays("expert.forward"),
            **backward.to_arrays("expert.backward"),
            **fsnap[medium_fwd].to_arrays("medium.forward"),
            **bsnap[medium_bwd].to_arrays("medium.backward"),
            "history.forward": np.asarray(fhist),
            "history.backward": np.asarray(bhist),
        }
        _save_npz(path, arrays)
    with np.load(path) as data:
        arrays = dict(data)
    return {
        kind: CueController(
            LinearController.from_arrays(arrays, f"{kind}.forward"),
            LinearController.from_arrays(arrays, f"{kind}.backward"),
        )
        for kind in ("medium", "expert")
    }


def _turn_start(spec: EnvSpec, forward: LinearController) -> dict[str, Any]:
    """How a body's turn-around training starts (`EnvSpec.turn_from_forward`): HalfCheetah from
    zero weights on its training environment; Hopper from the forward controller, on the task's
    environment, where a fall does not end the episode."""
    if not spec.turn_from_forward:
        return {}
    return {"init": forward, "env_kwargs": dict(spec.task_kwargs)}


def collect(
    task: CueTaskConfig, controller: Any, episodes: int, seed: int, *, min_main_return: float | None = None
) -> dict[str, np.ndarray]:
    """Play ``episodes`` episodes (cues +1, -1, +1, …; env seeds ``seed``, ``seed + 1``, …).

    ``min_main_return``: drop an episode whose return before the final phase is below it and play
    another seed instead (a linear controller sometimes flips the cheetah onto its back in the
    first steps and never recovers; such an episode is not expert behaviour). Returns ``states [episodes, horizon, obs]``, ``actions [episodes, horizon, act]``,
    ``rewards [episodes, horizon]`` and ``cues [episodes]``.
    """
    env = make_env(task)
    states, actions, rewards, cues = [], [], [], []
    attempt = 0
    while len(cues) < episodes:
        if attempt >= 20 * episodes:
            raise DataCollectionError(
                f"only {len(cues)} of {attempt} episodes reached a main-phase return of {min_main_return}"
            )
        cue = 1 if len(cues) % 2 == 0 else -1
        obs, _ = env.reset(seed=seed + attempt, options={"cue": cue})
        attempt += 1
        controller.reset()
        ep_s, ep_a, ep_r = [], [], []
        for _ in range(task.horizon):
            action = np.asarray(controller(obs), dtype=np.float64)
            ep_s.append(obs)
            ep_a.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            ep_r.append(reward)
            if terminated or truncated:
                break
        if min_main_return is not None and sum(ep_r[: task.final_start]) < min_main_return:
            continue
        states.append(ep_s)
        actions.append(ep_a)
        rewards.append(ep_r)
        cues.append(cue)
    env.close()
    return {
        "states": np.asarray(states, dtype=np.float32),
        "actions": np.asarray(actions, dtype=np.float32),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "cues": np.asarray(cues, dtype=np.int8),
    }


def make_dataset(config: DataConfig, out: Path, log: Callable[[str], None] = print) -> Path:
    """Controllers, then random / medium / expert episodes, into ``out/dataset.npz`` (reused if present)."""
    out = Path(out)
    path = out / "dataset.npz"
    if path.is_file():
        return path
    controllers = make_controllers(config, out / "controllers.npz", log)
    act_dim = config.task.spec.actions
    parts: dict[str, dict[str, np.ndarray]] = {}
    for index, kind in enumerate(KINDS):
        controller = RandomController(act_dim, config.seed + index) if kind == "random" else controllers[kind]
        parts[kind] = collect(
            config.task,
            controller,
            config.episodes[kind],
            seed=10_000 * (index + 1) + config.seed,
            min_main_return=None if kind == "random" else config.min_main_return,
        )
        returns = parts[kind]["rewards"].sum(axis=1)
        cues = parts[kind]["cues"]
        log(
            f"{kind}: {len(returns)} episodes, return {returns.mean():.1f} ± {returns.std():.1f} "
            f"(cue +1 {returns[cues == 1].mean():.1f}, cue -1 {returns[cues == -1].mean():.1f})"
        )
    arrays = {key: np.concatenate([parts[k][key] for k in KINDS]) for key in ("states", "actions", "rewards", "cues")}
    arrays["kinds"] = np.concatenate([np.full(config.episodes[k], i, dtype=np.int8) for i, k in enumerate(KINDS)])
    _save_npz(path, arrays)
    return path


def final_phase_returns(task: CueTaskConfig, rewards: np.ndarray) -> np.ndarray:
    """Per episode, the return of the final phase alone."""
    return rewards[:, task.final_start :].sum(axis=1)


def data_config(env: str = "halfcheetah") -> DataConfig:
    """The data set's settings for body ``env`` (`ENV_SPECS`): HalfCheetah's are `DataConfig`'s
    defaults; other bodies get their own task and ARS settings. `UnknownEnvError` for a name
    not in `ENV_SPECS`."""
    spec = env_spec(env)
    if spec.name == "halfcheetah":
        return DataConfig()
    return DataConfig(
        task=CueTaskConfig(env=spec.name),
        forward=ArsConfig(iterations=300, directions=8, top=4, step_size=0.02, noise=0.03, seed=0),
        backward=ArsConfig(iterations=50, directions=8, top=4, step_size=0.02, noise=0.03, episode_steps=200, seed=1),
        medium_fraction=0.4,  # forward iteration 120, slowing iteration 20
        warmup=400,  # the forward hopper reaches its steady ~2.3 m/s by step 400 (0.9 m/s in its first 100)
    )
