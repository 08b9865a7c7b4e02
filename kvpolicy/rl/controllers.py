"""Linear controllers trained by Augmented Random Search, and the cue-following expert.

ARS V2-t (Mania, Guy & Recht, "Simple random search provides a competitive approach to
reinforcement learning", NeurIPS 2018): a linear policy on running-normalised states, improved
by antithetic random perturbations of which only the best ``top`` directions count. It needs no
gradients, no GPU and no replay, and reaches a HalfCheetah return in the thousands within a
few single-thread CPU minutes — enough to make expert and medium data for the cue task.

Two controllers are trained on plain ``HalfCheetah-v5``: one running forward, and one that runs
backwards after having run forward for ``warmup`` steps (the switch the cue task asks for).
`CueController` composes them the way an expert with memory plays the task: it remembers the
cue when it is shown and, in the final phase, keeps running or turns around.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import gymnasium as gym
import numpy as np

from kvpolicy.atomic import atomic_path
from kvpolicy.errors import InvalidConfigError
from kvpolicy.rl.env_specs import EnvSpec, env_spec

BASE_OBS = 17  # HalfCheetah's observation size; the cue task appends [cue, final flag]


@attrs.define(eq=False)
class LinearController:
    """``action = clip(weights @ (state - mean) / std, -1, 1)`` on the body's own state values
    (HalfCheetah's 17, Hopper's 11: the observation's first ``len(mean)``)."""

    weights: np.ndarray  # [actions, state]
    mean: np.ndarray  # [state]
    std: np.ndarray  # [state]

    @property
    def state_size(self) -> int:
        return self.mean.shape[0]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = (np.asarray(obs[: self.state_size], dtype=np.float64) - self.mean) / self.std
        return np.clip(self.weights @ x, -1.0, 1.0)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.weights": self.weights, f"{prefix}.mean": self.mean, f"{prefix}.std": self.std}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> LinearController:
        return cls(*(np.asarray(arrays[f"{prefix}.{k}"], dtype=np.float64) for k in ("weights", "mean", "std")))


class RunningStats:
    """Welford mean / variance of every state seen, for ARS V2's state normalisation."""

    def __init__(self, size: int) -> None:
        self.count = 0
        self.mean = np.zeros(size)
        self.m2 = np.zeros(size)

    def push_many(self, states: np.ndarray) -> None:
        n = states.shape[0]
        if n == 0:
            return
        batch_mean = states.mean(axis=0)
        batch_m2 = ((states - batch_mean) ** 2).sum(axis=0)
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        if self.count < 2:
            return np.ones_like(self.mean)
        std = np.sqrt(self.m2 / (self.count - 1))
        return np.where(std < 1e-8, 1.0, std)


@attrs.frozen
class ArsConfig:
    """ARS V2-t hyper-parameters (HalfCheetah values of Mania et al.: step 0.02, noise 0.03)."""

    iterations: int = 40
    directions: int = 16
    top: int = 4
    step_size: float = 0.02
    noise: float = 0.03
    episode_steps: int = 1000
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.top <= self.directions:
            raise InvalidConfigError(f"ArsConfig.top must be in 1..directions ({self.directions}), got {self.top}")
        if self.iterations < 1 or self.episode_steps < 1:
            raise InvalidConfigError("ArsConfig.iterations and episode_steps must be >= 1")


#: (env, controller, seed) → (return, states visited)
Episode = Callable[[gym.Env, LinearController, int], tuple[float, np.ndarray]]


def upright_score(info: dict[str, Any], velocity_weight: float) -> float:
    """One step's ARS score on a body with a healthy reward (Hopper): ``velocity_weight`` × x
    velocity + the healthy reward − control cost (`EnvSpec.ars_velocity_weight` says why)."""
    return velocity_weight * float(info["x_velocity"]) + float(info["reward_survive"]) + float(info["reward_ctrl"])


def forward_episode(steps: int, velocity_weight: float | None = None) -> Episode:
    """The environment's own return over ``steps`` steps (run forward; HalfCheetah), or with
    ``velocity_weight`` the `upright_score` of every step."""

    def run(env: gym.Env, controller: LinearController, seed: int) -> tuple[float, np.ndarray]:
        obs, _ = env.reset(seed=seed)
        total, states = 0.0, []
        for _ in range(steps):
            states.append(obs)
            obs, reward, terminated, truncated, info = env.step(controller(obs))
            total += float(reward) if velocity_weight is None else upright_score(info, velocity_weight)
            if terminated or truncated:
                break
        return total, np.asarray(states)

    return run


def backward_episode(
    forward: LinearController,
    warmup: int,
    steps: int,
    velocity_weight: float | None = None,
    *,
    slow_healthy_weight: float | None = None,
) -> Episode:
    """Run forward with ``forward`` for ``warmup`` steps, then score the controller being trained
    on ``steps`` steps of backward velocity minus control cost (the cue task's turn-around); with
    ``velocity_weight`` the `upright_score` of backward velocity. ``slow_healthy_weight``: score
    stopping instead — that many × the healthy reward − |x velocity| − control cost (Hopper's
    cue −1, slowing down, `EnvSpec.cue_minus`; `EnvSpec.ars_slow_healthy_weight` says why the weight)."""

    def run(env: gym.Env, controller: LinearController, seed: int) -> tuple[float, np.ndarray]:
        obs, _ = env.reset(seed=seed)
        for _ in range(warmup):
            obs, *_ = env.step(forward(obs))
        total, states = 0.0, []
        for _ in range(steps):
            states.append(obs)
            obs, _, terminated, truncated, info = env.step(controller(obs))
            if slow_healthy_weight is not None:
                upright = slow_healthy_weight * float(info["reward_survive"])
                total += upright - abs(float(info["x_velocity"])) + float(info["reward_ctrl"])
            elif velocity_weight is None:
                total += -float(info["x_velocity"]) + float(info["reward_ctrl"])
            else:
                total += upright_score(info, -velocity_weight)
            if terminated or truncated:
                break
        return total, np.asarray(states)

    return run


def train_ars(
    episode: Episode,
    config: ArsConfig,
    *,
    snapshot_at: tuple[int, ...] = (),
    log: Callable[[str], None] | None = None,
    spec: EnvSpec | None = None,
    checkpoint: Path | None = None,
    init: LinearController | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> tuple[LinearController, dict[int, LinearController], list[float]]:
    """Train a linear controller with ARS V2-t.

    Returns the final controller, snapshots after the iterations listed in ``snapshot_at`` (the
    "medium" data comes from an early one) and the mean return of the unperturbed policy's
    evaluation at each iteration (measured on the perturbation episodes' seeds). ``spec``: the
    body, trained on its plain environment (default HalfCheetah). ``checkpoint``: a file the
    whole search state is written to (atomically) after every iteration and resumed from, so a
    stopped run goes on where it stopped with the same random draws. ``init``: start from this
    controller's weights and state statistics, kept fixed (ARS V1's normalisation), instead of
    zero weights — a Hopper that stops acting mid-hop falls at once, so its turn-around has to
    start from a controller that keeps it upright; and updated statistics take in the states of
    the perturbed episodes that fell, which rescale the inherited weights' inputs until the
    unperturbed controller falls too (measured: a perturbed return of 126 fell to −220 in 14
    iterations with them updated). ``env_kwargs``: for `gymnasium.make`
    instead of the spec's ``train_kwargs``.
    """
    spec = spec or env_spec("halfcheetah")
    size = spec.base_obs
    kwargs = dict(spec.train_kwargs) if env_kwargs is None else env_kwargs
    env = gym.make(spec.base_env, max_episode_steps=max(config.episode_steps, 1) + 1000, **kwargs)
    actions = env.action_space.shape[0]
    rng = np.random.default_rng(config.seed)
    weights = np.zeros((actions, size))
    stats = RunningStats(size)
    if init is not None:
        weights = init.weights.copy()
        stats.count, stats.mean, stats.m2 = 2, init.mean.copy(), init.std**2  # std = init.std
    snapshots: dict[int, LinearController] = {}
    history: list[float] = []
    episode_seed = config.seed * 1_000_003
    start = 1
    if checkpoint is not None and Path(checkpoint).is_file():
        weights, start, episode_seed = _resume(Path(checkpoint), rng, stats, snapshots, history)
    for iteration in range(start, config.iterations + 1):
        mean, std = stats.mean.copy(), stats.std.copy()
        deltas = rng.standard_normal((config.directions, actions, size))
        plus, minus, visited = np.zeros(config.directions), np.zeros(config.directions), []
        for k in range(config.directions):
            episode_seed += 1
            for sign, out in ((1.0, plus), (-1.0, minus)):
                controller = LinearController(weights + sign * config.noise * deltas[k], mean, std)
                out[k], states = episode(env, controller, episode_seed)
                visited.append(states[:, :size])
        best = np.argsort(-np.maximum(plus, minus))[: config.top]
        spread = np.concatenate([plus[best], minus[best]]).std() or 1.0
        step = ((plus[best] - minus[best])[:, None, None] * deltas[best]).sum(axis=0)
        weights = weights + config.step_size / (config.top * spread) * step
        if init is None:
            stats.push_many(np.concatenate(visited))
        history.append(float((plus + minus).mean() / 2))
        if iteration in snapshot_at:
            snapshots[iteration] = LinearController(weights.copy(), stats.mean.copy(), stats.std.copy())
        if checkpoint is not None:
            _save_state(Path(checkpoint), weights, iteration, episode_seed, rng, stats, snapshots, history)
        if log is not None:
            log(f"ars iteration {iteration}/{config.iterations}: mean perturbed return {history[-1]:.1f}")
    env.close()
    return LinearController(weights, stats.mean.copy(), stats.std.copy()), snapshots, history


def _save_state(
    path: Path,
    weights: np.ndarray,
    iteration: int,
    episode_seed: int,
    rng: np.random.Generator,
    stats: RunningStats,
    snapshots: dict[int, LinearController],
    history: list[float],
) -> None:
    arrays = {
        "weights": weights,
        "counters": np.asarray([iteration, episode_seed, stats.count], dtype=np.int64),
        "rng": np.asarray(json.dumps(rng.bit_generator.state)),
        "stats.mean": stats.mean,
        "stats.m2": stats.m2,
        "history": np.asarray(history),
    }
    for k, snapshot in snapshots.items():
        arrays.update(snapshot.to_arrays(f"snapshot.{k}"))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def _resume(
    path: Path,
    rng: np.random.Generator,
    stats: RunningStats,
    snapshots: dict[int, LinearController],
    history: list[float],
) -> tuple[np.ndarray, int, int]:
    """Load `_save_state`'s file into the fresh objects; the weights, the next iteration, the seed."""
    with np.load(path) as data:
        arrays = dict(data)
    iteration, episode_seed, stats.count = (int(x) for x in arrays["counters"])
    rng.bit_generator.state = json.loads(str(arrays["rng"]))
    stats.mean, stats.m2 = arrays["stats.mean"], arrays["stats.m2"]
    history.extend(float(x) for x in arrays["history"])
    for key in arrays:
        if key.startswith("snapshot.") and key.endswith(".weights"):
            k = int(key.split(".")[1])
            snapshots[k] = LinearController.from_arrays(arrays, f"snapshot.{k}")
    return arrays["weights"], iteration + 1, episode_seed


class CueController:
    """An expert with memory for the cue task: remembers the cue when it is shown, runs
    forward, and in the final phase keeps running (cue +1) or turns around (cue -1).
    ``follow_cue=False`` ignores the cue and always runs forward. The cue is read right after
    the body's own state values (`LinearController.state_size`)."""

    def __init__(self, forward: LinearController, backward: LinearController, follow_cue: bool = True) -> None:
        self.forward = forward
        self.backward = backward
        self.follow_cue = follow_cue
        self.remembered = 0

    def reset(self) -> None:
        self.remembered = 0

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        cue = self.forward.state_size
        if obs[cue] != 0:
            self.remembered = int(np.sign(obs[cue]))
        final = obs[cue + 1] > 0.5
        if final and self.follow_cue and self.remembered == -1:
            return self.backward(obs)
        return self.forward(obs)


class RandomController:
    """Uniform random actions in [-1, 1] from its own seeded generator."""

    def __init__(self, actions: int, seed: int) -> None:
        self.actions = actions
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def __call__(self, obs: Any) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, self.actions)
