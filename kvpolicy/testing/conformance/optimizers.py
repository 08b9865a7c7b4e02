"""Checks of optimizers: ask / tell shapes, determinism under a seed, resuming from ``state_dict``."""

from __future__ import annotations

from typing import Any

import torch

from kvpolicy.testing.conformance.base import Target, _fail

# --------------------------------------------------------------------------- optimizers

_OPT_DIM = 6


def _optimizer(target: Target, seed: int = 0) -> Any:
    obj = target.make()
    return type(obj)(obj.config, dim=_OPT_DIM, seed=seed)


def _sphere(solutions: torch.Tensor) -> torch.Tensor:
    return (solutions.double() - 0.5).pow(2).sum(-1)


def check_optimizer_ask_tell(target: Target) -> None:
    optimizer = _optimizer(target)
    for _ in range(3):
        solutions = optimizer.ask()
        if not isinstance(solutions, torch.Tensor) or solutions.dim() != 2 or solutions.shape[1] != _OPT_DIM:
            _fail(
                target,
                "ask_tell",
                f"ask() must return [population, {_OPT_DIM}], got {getattr(solutions, 'shape', None)}",
            )
        if not torch.isfinite(solutions).all():
            _fail(target, "ask_tell", "ask() returned non-finite candidates")
        optimizer.tell(solutions, _sphere(solutions))
    result = optimizer.result
    if tuple(result.shape) != (_OPT_DIM,):
        _fail(target, "ask_tell", f"result has shape {tuple(result.shape)}; expected [{_OPT_DIM}]")
    if not isinstance(optimizer.stop(), bool):
        _fail(target, "ask_tell", "stop() must return a bool")


def check_optimizer_seeded(target: Target) -> None:
    a, b = _optimizer(target, seed=3), _optimizer(target, seed=3)
    for step in range(2):
        xa, xb = a.ask(), b.ask()
        if not torch.equal(xa, xb):
            _fail(target, "seeded", f"two optimizers with seed 3 asked different candidates at step {step}")
        a.tell(xa, _sphere(xa))
        b.tell(xb, _sphere(xb))


def check_optimizer_resume(target: Target) -> None:
    original = _optimizer(target, seed=5)
    solutions = original.ask()
    original.tell(solutions, _sphere(solutions))
    resumed = _optimizer(target, seed=99)
    resumed.load_state_dict(original.state_dict())
    if not torch.equal(original.ask(), resumed.ask()):
        _fail(target, "resume", "an optimizer restored from state_dict() asked different candidates than the original")
