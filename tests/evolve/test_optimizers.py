"""The optimizer plugins, loaded through the real entry points, on a known quadratic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpolicy import default_registry
from kvpolicy.errors import CheckpointError, InvalidConfigError, ShapeError

TARGET = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64)


def sphere(x: torch.Tensor) -> torch.Tensor:
    return (x - TARGET).square().sum(dim=1)


def minimise(optimizer, generations: int) -> float:
    for _ in range(generations):
        x = optimizer.ask()
        optimizer.tell(x, sphere(x))
    return float(sphere(optimizer.result.reshape(1, -1)))


def test_both_optimizers_are_registered_through_entry_points():
    names = default_registry().names("optimizer")
    assert {"cma_es", "simple_es"} <= set(names)


def test_cma_es_paper_defaults():
    opt = default_registry().create("optimizer", "cma_es", dim=50, seed=0)
    assert (opt.config.popsize, opt.config.sigma0) == (32, 0.065)
    assert opt._es.sp.weights.mu == 16  # μ = popsize // 2
    assert torch.equal(opt.result, torch.zeros(50, dtype=torch.float64))
    assert opt.ask().shape == (32, 50)
    assert opt.sigma == pytest.approx(0.065)


def test_cma_es_converges_on_a_quadratic():
    opt = default_registry().create("optimizer", "cma_es", {"popsize": 16, "mu": 8, "sigma0": 0.5}, dim=10, seed=3)
    start = float(sphere(torch.zeros(1, 10, dtype=torch.float64)))
    assert minimise(opt, 150) < 1e-8 * start


def test_separable_cma_es_converges_on_a_quadratic():
    config = {"popsize": 16, "mu": 8, "sigma0": 0.5, "diagonal": True}
    opt = default_registry().create("optimizer", "cma_es", config, dim=10, seed=3)
    assert minimise(opt, 200) < 1e-6


def test_simple_es_converges_on_a_quadratic():
    config = {"popsize": 32, "sigma": 0.05, "learning_rate": 0.05}
    opt = default_registry().create("optimizer", "simple_es", config, dim=10, seed=3)
    start = float(sphere(torch.zeros(1, 10, dtype=torch.float64)))
    assert minimise(opt, 300) < start / 50


@pytest.mark.parametrize("name", ["cma_es", "simple_es"])
def test_state_dict_resumes_exactly(name):
    registry = default_registry()
    first = registry.create("optimizer", name, {"popsize": 8}, dim=10, seed=1)
    minimise(first, 5)
    state = first.state_dict()
    expected = [first.ask()]
    first.tell(expected[0], sphere(expected[0]))
    expected.append(first.ask())

    second = registry.create("optimizer", name, {"popsize": 8}, dim=10, seed=99)
    second.load_state_dict(state)
    got = [second.ask()]
    second.tell(got[0], sphere(got[0]))
    got.append(second.ask())
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_seed_decides_the_samples_and_global_numpy_rng_is_untouched():
    registry = default_registry()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = registry.create("optimizer", "cma_es", {"popsize": 8}, dim=6, seed=5).ask()
    b = registry.create("optimizer", "cma_es", {"popsize": 8}, dim=6, seed=5).ask()
    c = registry.create("optimizer", "cma_es", {"popsize": 8}, dim=6, seed=6).ask()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert np.array_equal(np.random.get_state()[1], before)


def test_bad_input_gives_clear_errors():
    registry = default_registry()
    opt = registry.create("optimizer", "cma_es", {"popsize": 8}, dim=6, seed=0)
    x = opt.ask()
    with pytest.raises(ShapeError, match="one loss per solution"):
        opt.tell(x, torch.zeros(7))
    with pytest.raises(InvalidConfigError, match="NaN"):
        opt.tell(x, torch.full((8,), float("nan")))
    with pytest.raises(InvalidConfigError, match="mu"):
        registry.create("optimizer", "cma_es", {"popsize": 8, "mu": 9}, dim=6)
    with pytest.raises(InvalidConfigError, match="even"):
        registry.create("optimizer", "simple_es", {"popsize": 7}, dim=6)
    other = registry.create("optimizer", "simple_es", {"popsize": 8}, dim=6)
    with pytest.raises(CheckpointError, match="cma_es"):
        other.load_state_dict(opt.state_dict())
    wrong_dim = registry.create("optimizer", "cma_es", {"popsize": 8}, dim=7)
    with pytest.raises(CheckpointError, match="dim=6"):
        wrong_dim.load_state_dict(opt.state_dict())


def test_cma_es_stop_rules_are_off_unless_asked():
    """Tied fitness (every member equal) trips pycma's tolfun / tolflatfitness at once; a run
    should nevertheless last as configured unless the config enables pycma's stop rules."""
    registry = default_registry()
    quiet = registry.create("optimizer", "cma_es", {"popsize": 4}, dim=6, seed=0)
    strict = registry.create("optimizer", "cma_es", {"popsize": 4, "stop_rules": True}, dim=6, seed=0)
    for opt in (quiet, strict):
        for _ in range(3):
            x = opt.ask()
            opt.tell(x, torch.zeros(x.shape[0], dtype=torch.float64))
    assert not quiet.stop() and quiet.stop_reasons == {}
    assert strict.stop() and strict.stop_reasons


def test_cma_es_is_diagonal_above_the_full_covariance_limit():
    from kvpolicy_plugins.cma_es import FULL_COVARIANCE_MAX_DIM

    registry = default_registry()
    small = registry.create("optimizer", "cma_es", dim=26, seed=0)
    large = registry.create("optimizer", "cma_es", dim=FULL_COVARIANCE_MAX_DIM + 1, seed=0)
    forced = registry.create("optimizer", "cma_es", {"diagonal": False}, dim=FULL_COVARIANCE_MAX_DIM + 1, seed=0)
    assert (small.diagonal, large.diagonal, forced.diagonal) == (False, True, False)
    import pickle

    # the checkpointed strategy stays small: no dim x dim covariance in the diagonal case
    assert len(pickle.dumps(large.state_dict())) < 2_000_000
