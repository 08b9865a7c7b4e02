"""Fitness of a population: task scores normalised by the full cache, and the one place where a
fitness (higher = better) becomes a loss (lower = better) for the optimizer.

NAMM (Cetin et al. 2024, section 4): a member's fitness is the mean over tasks of its score
divided by the full-cache model's score on the same prompts, so tasks of different difficulty
weigh alike and 1.0 means "as good as keeping everything". All members of a generation see the
same items (common random numbers), so differences between members are not item noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kvpolicy.errors import ShapeError

#: below this, a full-cache reference is treated as zero (the task is unsolved even with the full cache)
REFERENCE_FLOOR = 1e-9


def task_ratio(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``scores [members, items]`` ÷ full-cache ``reference [items]`` summed over the items → ``[members]``.

    Where the full cache scores zero on every item the ratio is undefined; the task then
    contributes ``1 + mean score`` (1.0 for a member that also fails, more for one that succeeds),
    so an unsolved task neither divides by zero nor drowns the other tasks.
    """
    if scores.dim() != 2 or reference.shape != scores.shape[1:]:
        raise ShapeError(
            f"scores must be [members, items] and the reference [items]; got {tuple(scores.shape)} "
            f"and {tuple(reference.shape)}"
        )
    scores, reference = scores.double(), reference.double()
    total = reference.sum()
    if total <= REFERENCE_FLOOR:
        return 1.0 + scores.mean(dim=1)
    return scores.sum(dim=1) / total


def population_fitness(
    scores: Mapping[str, torch.Tensor],
    references: Mapping[str, torch.Tensor],
    kept_fraction: torch.Tensor,
    cache_weight: float = 0.0,
) -> torch.Tensor:
    """``[members]`` fitness: mean over tasks of `task_ratio`, plus ``cache_weight × (1 − kept)``.

    ``scores[task]`` is ``[members, items]``, ``references[task]`` ``[items]`` and
    ``kept_fraction`` ``[members]`` (the measured cache size, mean over every item evaluated).
    """
    if not scores:
        raise ShapeError("population_fitness needs the scores of at least one task")
    ratios = torch.stack([task_ratio(scores[task], references[task]) for task in scores])
    fitness = ratios.mean(dim=0)
    if cache_weight:
        fitness = fitness + cache_weight * (1.0 - kept_fraction.double())
    return fitness


def to_loss(fitness: torch.Tensor) -> torch.Tensor:
    """Optimizers minimise: the loss of a fitness is its negation. The only place this happens."""
    return -fitness.double()
