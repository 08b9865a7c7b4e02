"""The MuJoCo bodies the cue task runs on: one `EnvSpec` per gymnasium environment.

The cue task (`kvpolicy.rl.envs`) is the same on every body — a cue shown early, a final phase
whose reward depends on it — but the body decides the sizes (observation, action), how the
environment is made (Hopper must not end an episode when it falls, or the cue would not stay
thousands of tokens back), which reward terms the task keeps, and the final-phase weights that
make both cues worth about as much to the expert. Everything else reads these numbers from here.
"""

from __future__ import annotations

from typing import Any

import attrs

from kvpolicy.errors import InvalidConfigError


class UnknownEnvError(InvalidConfigError):
    """A cue-task body name that `ENV_SPECS` does not hold."""


@attrs.frozen
class EnvSpec:
    """One body of the cue task.

    ``task_kwargs``: what `gymnasium.make` gets for the cue task itself; ``train_kwargs``: for
    training the ARS controllers on the plain environment (Hopper ends a training episode when
    it falls, which is what teaches a controller not to). ``healthy``: the environment pays a
    reward for staying upright (``info["reward_survive"]``), which the task keeps in both phases.
    ``final_weight`` / ``final_weight_backward``: the defaults of `CueTaskConfig`'s weights
    (Hopper: 4 and 10, measured on 8 expert episodes, env seeds 5000–5007: the final phase paid
    2,056 with cue +1 and 1,995 with cue −1 on average).
    ``ars_velocity_weight``: None trains the ARS controllers on the environment's own return;
    a number scores every step as that many × x velocity + healthy reward − control cost. Hopper
    needs it: on its own return (1 per upright step, 1 per m/s) ARS settled on standing still
    (a perturbed return of 1,000–1,100 from iteration 23 to 86, when it was stopped), and with
    the healthy reward taken away (the ARS paper's "shift") it dived forward and fell within
    ~200 steps (400 iterations);
    with velocity weighted 3× it started hopping after ~70 iterations. ``turn_from_forward``:
    train the turn-around from the forward controller's weights on the task's environment (no
    end at a fall) — from zero weights a Hopper moving at 2 m/s falls at once, and where a fall
    ends the episode a score still negative while it moves forward teaches it to fall sooner.
    ``cue_minus``: what cue −1 asks for in the final phase — ``"backward"`` (run backwards,
    HalfCheetah) or ``"slow"`` (slow down: ``final_weight_backward`` × (``slow_below`` × healthy
    reward − |x velocity|) − control cost, positive only upright and slower than ``slow_below``
    m/s; Hopper, because ARS learnt neither to hop backwards nor to stand still from a 2.4 m/s
    hop, only to slow to about 1 m/s — the Hopper section of docs/decision_transformer.md has
    the numbers). ``ars_slow_healthy_weight``: the slowing controller's ARS score is that many
    × the healthy reward − |x velocity| − control cost: at 1, where carrying on hopping at
    2.4 m/s scores below lying on the ground, ARS learnt to fall (a perturbed return of −284
    rising only to about −90 in 86 iterations); at 3 slowing down upright scores more than falling.
    """

    name: str
    base_env: str
    base_obs: int
    actions: int
    final_weight: float
    final_weight_backward: float
    healthy: bool = False
    ars_velocity_weight: float | None = None
    turn_from_forward: bool = False
    cue_minus: str = attrs.field(default="backward", validator=attrs.validators.in_(("backward", "slow")))
    slow_below: float = 0.0
    ars_slow_healthy_weight: float = 1.0
    task_kwargs: tuple[tuple[str, Any], ...] = ()
    train_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def cue_index(self) -> int:
        """Where the cue sits in the task's observation (after the body's own values); the
        final-phase flag follows it."""
        return self.base_obs


ENV_SPECS: dict[str, EnvSpec] = {
    "halfcheetah": EnvSpec(
        "halfcheetah", "HalfCheetah-v5", base_obs=17, actions=6, final_weight=4.0, final_weight_backward=10.0
    ),
    # Fixed-length episodes: a fall costs the healthy reward from then on, it does not end the
    # episode (which would end it before the final phase and take the cue's distance with it).
    "hopper": EnvSpec(
        "hopper",
        "Hopper-v5",
        base_obs=11,
        actions=3,
        final_weight=4.0,
        final_weight_backward=10.0,
        healthy=True,
        ars_velocity_weight=3.0,
        turn_from_forward=True,
        cue_minus="slow",
        slow_below=2.0,
        ars_slow_healthy_weight=3.0,
        task_kwargs=(("terminate_when_unhealthy", False),),
    ),
}


def env_spec(name: str) -> EnvSpec:
    """The `EnvSpec` called ``name``; `UnknownEnvError` naming the known ones otherwise."""
    try:
        return ENV_SPECS[name]
    except (KeyError, TypeError):
        raise UnknownEnvError(f"unknown cue-task environment {name!r}; known: {', '.join(ENV_SPECS)}") from None
