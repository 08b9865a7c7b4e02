"""A MuJoCo control task where memory provably matters: HalfCheetah with a cue.

`CuedHalfCheetah` wraps gymnasium's ``HalfCheetah-v5``. Each episode draws a cue ``c ∈ {-1, +1}``
that is visible in the observation only during a few early steps (``cue_start`` ..
``cue_start + cue_steps``). Until the last ``final_steps`` steps the reward is HalfCheetah's own
(forward velocity minus control cost) whatever the cue; in the final phase, which a flag in the
observation announces, it is ``final_weight · forward velocity`` (cue +1: run on) or
``final_weight_backward · backward velocity`` (cue -1: turn and run backwards), minus control
cost. Running backwards pays more per metre so that both cues are worth the same to the expert:
then the returns-to-go a Decision Transformer is trained on say nothing about the cue. Nothing between the cue and the final
phase depends on it, so the only way to choose the right direction ~2,900 cached tokens later is
to remember the cue; an agent that has forgotten it guesses and, on average, wins nothing in the
final phase. The cue is not shown at step 0 on purpose: the first tokens of a sequence are the
"attention sinks" several policies keep by position alone, which would keep the cue by accident.

Observation: HalfCheetah's 17 values, then ``[cue or 0, final-phase flag]`` (19 in all).

``CueTaskConfig.env`` puts the same task on another body of `kvpolicy.rl.env_specs` (Hopper:
11 values + cue + flag, fixed-length episodes, and cue -1 asks it to slow down instead of
turning round — `EnvSpec.cue_minus` says why); the wrapper keeps its HalfCheetah name.
"""

from __future__ import annotations

from typing import Any

import attrs
import gymnasium as gym
import numpy as np

from kvpolicy.errors import InvalidConfigError
from kvpolicy.rl.env_specs import EnvSpec, env_spec

BASE_ENV = "HalfCheetah-v5"
#: where the cue is in HalfCheetah's observation (after its 17 values); `CueTaskConfig.cue_index` for any body
CUE_INDEX = 17


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidConfigError(f"CueTaskConfig.{attribute.name} must be a whole number >= 1, got {value!r}")


@attrs.frozen
class CueTaskConfig:
    """Timing and weights of the cue task (defaults: a 1,000-step episode, cue at steps 20–29,
    final phase = the last 200 steps at 4× the forward velocity, so it is worth about as much as
    the 800 steps before it; backwards 10×, because the expert runs backwards at about 0.4× its
    forward speed — measured on 16 episodes of the shipped data's controllers, both cues then
    pay the expert about 4,000 in the final phase). ``env`` names the body (`ENV_SPECS`); the
    final-phase weights default to its spec's."""

    env: str = attrs.field(default="halfcheetah", validator=lambda _i, _a, value: env_spec(value))
    horizon: int = attrs.field(default=1000, validator=_positive)
    cue_start: int = attrs.field(default=20, validator=_positive)
    cue_steps: int = attrs.field(default=10, validator=_positive)
    final_steps: int = attrs.field(default=200, validator=_positive)
    final_weight: float = attrs.field(default=attrs.Factory(lambda self: self.spec.final_weight, takes_self=True))
    final_weight_backward: float = attrs.field(
        default=attrs.Factory(lambda self: self.spec.final_weight_backward, takes_self=True)
    )

    def __attrs_post_init__(self) -> None:
        if self.cue_start + self.cue_steps >= self.horizon - self.final_steps:
            raise InvalidConfigError(
                f"the cue (steps {self.cue_start}..{self.cue_start + self.cue_steps - 1}) must end before the final "
                f"phase starts at step {self.horizon - self.final_steps}"
            )
        if not (self.final_weight > 0 and self.final_weight_backward > 0):
            raise InvalidConfigError(
                f"final_weight and final_weight_backward must be > 0, got {self.final_weight}, {self.final_weight_backward}"
            )

    @property
    def spec(self) -> EnvSpec:
        return env_spec(self.env)

    @property
    def cue_index(self) -> int:
        """Where the cue sits in the observation; the final-phase flag follows it."""
        return self.spec.cue_index

    @property
    def final_start(self) -> int:
        return self.horizon - self.final_steps

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class CuedHalfCheetah(gym.Wrapper):
    """HalfCheetah whose late reward depends on an early cue (see the module docstring).

    ``reset(options={"cue": ±1})`` fixes the cue; otherwise it is drawn from the env's RNG.
    ``info`` carries ``cue``, ``phase`` (``"main"`` / ``"final"``) and ``x_velocity``.
    """

    def __init__(self, config: CueTaskConfig | None = None) -> None:
        self.config = config or CueTaskConfig()
        spec = self.config.spec
        super().__init__(gym.make(spec.base_env, max_episode_steps=self.config.horizon, **dict(spec.task_kwargs)))
        low = np.concatenate([self.env.observation_space.low, [-1.0, 0.0]]).astype(np.float64)
        high = np.concatenate([self.env.observation_space.high, [1.0, 1.0]]).astype(np.float64)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float64)
        self.cue = 1
        self.t = 0

    def _extend(self, obs: np.ndarray) -> np.ndarray:
        c = self.config
        shown = self.cue if c.cue_start <= self.t < c.cue_start + c.cue_steps else 0
        return np.concatenate([obs, [float(shown), float(self.t >= c.final_start)]])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed)
        cue = (options or {}).get("cue")
        if cue is None:
            cue = int(self.env.unwrapped.np_random.choice([-1, 1]))
        if cue not in (-1, 1):
            raise InvalidConfigError(f"cue must be -1 or +1, got {cue!r}")
        self.cue, self.t = int(cue), 0
        return self._extend(obs), {**info, "cue": self.cue, "phase": "main"}

    def step(self, action: np.ndarray):
        obs, _, terminated, truncated, info = self.env.step(action)
        c = self.config
        final = self.t >= c.final_start
        velocity = float(info["x_velocity"])
        if not final:
            forward = velocity
        elif self.cue == 1:
            forward = c.final_weight * velocity
        elif c.spec.cue_minus == "backward":
            forward = -c.final_weight_backward * velocity
        else:  # "slow": upright below the spec's speed pays, weighted
            forward = c.final_weight_backward * (c.spec.slow_below * float(info["reward_survive"]) - abs(velocity))
        reward = forward + float(info["reward_ctrl"])
        if c.spec.healthy and not (final and self.cue == -1 and c.spec.cue_minus == "slow"):
            reward += float(info["reward_survive"])
        self.t += 1
        info = {**info, "cue": self.cue, "phase": "final" if final else "main"}
        return self._extend(obs), reward, terminated, truncated, info


def make_env(config: CueTaskConfig | None = None) -> CuedHalfCheetah:
    """A fresh cue task on ``config.env``'s body (HalfCheetah by default)."""
    return CuedHalfCheetah(config)
