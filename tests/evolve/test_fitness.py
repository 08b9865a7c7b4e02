"""Fitness: score ÷ full-cache score, mean over tasks, cache term, and the sign flip to a loss."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.errors import ShapeError
from kvpolicy.evolve.fitness import population_fitness, task_ratio, to_loss


def test_ratio_is_summed_score_over_summed_reference():
    scores = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 1.0]])
    ratio = task_ratio(scores, torch.tensor([1.0, 1.0]))
    assert ratio.tolist() == [0.5, 0.5, 1.0]


def test_task_unsolved_by_the_full_cache_does_not_divide_by_zero():
    ratio = task_ratio(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([0.0, 0.0]))
    assert ratio.tolist() == [1.0, 1.5]


def test_mean_over_tasks_and_cache_term():
    scores = {"a": torch.tensor([[1.0], [0.5]]), "b": torch.tensor([[0.25], [0.5]])}
    references = {"a": torch.tensor([1.0]), "b": torch.tensor([0.5])}
    kept = torch.tensor([1.0, 0.25])
    plain = population_fitness(scores, references, kept)
    assert plain.tolist() == pytest.approx([0.75, 0.75])
    rewarded = population_fitness(scores, references, kept, cache_weight=0.4)
    assert rewarded.tolist() == pytest.approx([0.75, 0.75 + 0.4 * 0.75])


def test_loss_is_negated_fitness():
    assert to_loss(torch.tensor([1.0, -2.0])).tolist() == [-1.0, 2.0]


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ShapeError, match="members, items"):
        task_ratio(torch.zeros(3, 2), torch.zeros(3))
