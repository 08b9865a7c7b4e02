"""Decision Transformers whose memory a kvpolicy policy manages (the ``rl`` extra).

A Decision Transformer (Chen et al., NeurIPS 2021) acts by reading its whole episode — returns-to-go,
states and actions as a token stream — so its KV cache grows by three tokens per timestep and a
1,000-step episode fills thousands of cache slots. This package makes that concrete with installable
parts only: a MuJoCo task whose reward depends on a cue shown early (`envs`), a quickly trained
linear controller that makes random / medium / expert data (`controllers`, `data`), a small
Decision Transformer on a tiny Llama fed ``inputs_embeds`` (`model`, `train`), rollouts that decode
one timestep at a time through an evicting cache (`rollout`) and the evaluation of every policy
(`evaluate_control`). ``python -m kvpolicy.rl --help`` lists the commands.

Nothing in kvpolicy's core imports this package; it needs ``pip install "kvpolicy[rl]"``
(gymnasium with MuJoCo).
"""

from __future__ import annotations

import importlib.util

from kvpolicy.errors import ModelUnavailableError


class RLExtraMissingError(ModelUnavailableError, ImportError):
    """The ``rl`` extra (gymnasium with MuJoCo) is not installed."""


def require_rl_extra() -> None:
    """Raise `RLExtraMissingError` naming the install command unless gymnasium and mujoco import."""
    missing = [name for name in ("gymnasium", "mujoco") if importlib.util.find_spec(name) is None]
    if missing:
        raise RLExtraMissingError(
            f'kvpolicy.rl needs {" and ".join(missing)}: pip install "kvpolicy[rl]" (gymnasium[mujoco] >= 1.0)'
        )


__all__ = ["RLExtraMissingError", "require_rl_extra"]
