"""Black-box optimizers for learned eviction: ``cma_es`` (on the ``cma`` package) and ``simple_es``.

NAMMs are evolved, not trained by backpropagation (Cetin et al., "An Evolved Universal
Transformer Memory", arXiv 2410.13166): CMA-ES (Hansen, "The CMA Evolution Strategy: A
Tutorial", arXiv 1604.00772) searches the scorer's flat parameter vector with task scores as
fitness. The defaults are the paper's: population 32, μ = 16 parents, σ₀ = 0.065, mean starting
at the zero vector (a zero scorer keeps every token). ``diagonal=True`` gives separable CMA-ES
(Ros & Hansen 2008), linear in the dimension; by default (``diagonal=None``) it is used above
`FULL_COVARIANCE_MAX_DIM` parameters, where a full covariance would make every checkpoint large
(4,172 BAM parameters: a 4,172² matrix, ~280 MB pickled per generation) and would need far more
generations than a CPU run affords to learn. pycma's own termination rules (``tolfun``,
``tolflatfitness``, …) are off unless ``stop_rules=True``: with a small population and tied
fitness they ended runs after a single generation, while a run should last as configured.

``simple_es`` is the OpenAI evolution strategy (Salimans et al., "Evolution Strategies as a
Scalable Alternative to Reinforcement Learning", arXiv 1703.03864): antithetic Gaussian samples,
centred-rank fitness shaping, plain gradient steps on the mean with a fixed σ. It exists to show
any optimizer registered under the ``kvpolicy`` entry-point group drops in.

Both minimise a *loss* (pycma's convention); callers negate a fitness once before `tell`. Both
are exactly resumable: `state_dict` holds the whole strategy and its random-number state.
"""

from __future__ import annotations

import contextlib
import math
import pickle
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import numpy as np
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import CheckpointError, InvalidConfigError, ShapeError
from kvpolicy.types import positive


def _as_losses(solutions: torch.Tensor, losses: torch.Tensor, popsize: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    solutions = torch.as_tensor(solutions, dtype=torch.float64)
    losses = torch.as_tensor(losses, dtype=torch.float64).reshape(-1)
    if solutions.shape != (popsize, dim):
        raise ShapeError(f"tell() expects solutions [popsize={popsize}, dim={dim}], got {tuple(solutions.shape)}")
    if losses.shape != (popsize,):
        raise ShapeError(f"tell() expects one loss per solution ({popsize}), got {tuple(losses.shape)}")
    if not torch.isfinite(losses).all():
        raise InvalidConfigError("tell() got a NaN or infinite loss; the evaluation of some member failed")
    return solutions.numpy(), losses.numpy()


def _global_randn(*shape: int) -> np.ndarray:
    """pycma's sampler. A module-level function pickles by reference, so an unpickled strategy
    still draws from numpy's global RNG (which `_numpy_rng` swaps for the optimizer's own);
    pycma's default, the bound ``np.random.randn``, would pickle a frozen private copy of it."""
    return np.random.randn(*shape)


@contextlib.contextmanager
def _numpy_rng(owner: Any) -> Iterator[None]:
    """Run pycma on the optimizer's own copy of numpy's global RNG (pycma samples from
    ``np.random``), leaving the caller's global RNG untouched."""
    outside = np.random.get_state()
    np.random.set_state(owner._rng_state)
    try:
        yield
    finally:
        owner._rng_state = np.random.get_state()
        np.random.set_state(outside)


@attrs.frozen
class CmaEsConfig:
    """CMA-ES settings; defaults follow the NAMM paper.

    ``popsize`` new candidates per generation, ``mu`` of them (default ``popsize // 2``: 16 of
    32 as in the paper) recombined into the new mean,
    ``sigma0`` initial step size, ``mean0`` value of every coordinate of the starting mean,
    ``diagonal`` separable (diagonal-covariance) CMA-ES (None: only above
    `FULL_COVARIANCE_MAX_DIM` parameters), ``stop_rules`` let pycma's termination criteria end
    the run, ``options`` any further pycma option.
    """

    popsize: int = attrs.field(default=32, validator=positive)
    mu: int | None = attrs.field(default=None, validator=positive)
    sigma0: float = attrs.field(default=0.065, validator=positive)
    mean0: float = 0.0
    diagonal: bool | None = None
    stop_rules: bool = False
    options: dict[str, Any] = attrs.field(factory=dict, converter=lambda d: dict(d or {}))

    @mu.validator
    def _check_mu(self, attribute: attrs.Attribute, value: int) -> None:
        if value is not None and value > self.popsize:
            raise InvalidConfigError(f"CmaEsConfig.mu ({value}) cannot exceed popsize ({self.popsize})")

    def __hash__(self) -> int:
        return hash(
            (
                self.popsize,
                self.mu,
                self.sigma0,
                self.mean0,
                self.diagonal,
                self.stop_rules,
                repr(sorted(self.options.items())),
            )
        )


#: above this many parameters ``cma_es`` defaults to a diagonal covariance: a full one is dim²
#: doubles (8 MB at 1,000; 140 MB at 4,172) pickled into every checkpoint
FULL_COVARIANCE_MAX_DIM = 1000


class CmaEsOptimizer:
    """CMA-ES through pycma's ``CMAEvolutionStrategy``; ask / tell / stop / result on tensors."""

    name: ClassVar[str] = "cma_es"
    Config = CmaEsConfig

    def __init__(self, config: CmaEsConfig | None = None, *, dim: int, seed: int = 0) -> None:
        import cma

        self.config = config or CmaEsConfig()
        if dim < 2:
            raise InvalidConfigError(f"cma_es needs at least 2 parameters to search, got dim={dim}")
        self.dim, self.seed = int(dim), int(seed)
        self.diagonal = self.config.diagonal if self.config.diagonal is not None else self.dim > FULL_COVARIANCE_MAX_DIM
        self._rng_state = np.random.RandomState(self.seed).get_state()
        options = {
            "popsize": self.config.popsize,
            "CMA_mu": self.config.mu or self.config.popsize // 2,
            "CMA_diagonal": True if self.diagonal else 0,
            "randn": _global_randn,
            "seed": np.nan,  # pycma must not reseed: our own RNG state is installed around every call
            "verbose": -10,  # quiet, and never read a cma_signals.in file
            "verb_log": 0,
            "verb_disp": 0,
            **self.config.options,
        }
        with _numpy_rng(self):
            try:
                self._es = cma.CMAEvolutionStrategy(np.full(self.dim, self.config.mean0), self.config.sigma0, options)
            except (ValueError, TypeError) as exc:
                raise InvalidConfigError(f"pycma rejected the cma_es options {self.config.options}: {exc}") from exc
        self._asked: np.ndarray | None = None

    def ask(self) -> torch.Tensor:
        """``[popsize, dim]`` float64 candidates to evaluate."""
        with _numpy_rng(self):
            self._asked = np.asarray(self._es.ask())
        return torch.from_numpy(self._asked.copy())

    def tell(self, solutions: torch.Tensor, losses: torch.Tensor) -> None:
        """Update the distribution from the losses (lower = better) of the asked candidates."""
        if self._asked is None:
            raise InvalidConfigError("cma_es.tell() called before ask()")
        x, f = _as_losses(solutions, losses, self.config.popsize, self.dim)
        with _numpy_rng(self):
            self._es.tell(list(x), list(f))
        self._asked = None

    def stop(self) -> bool:
        """pycma's termination criteria, only when the config enables them (``stop_rules``)."""
        return self.config.stop_rules and bool(self._es.stop())

    @property
    def stop_reasons(self) -> dict[str, Any]:
        return dict(self._es.stop()) if self.config.stop_rules else {}

    @property
    def result(self) -> torch.Tensor:
        """The distribution mean: what NAMM evaluates and ships."""
        return torch.from_numpy(np.array(self._es.mean, dtype=np.float64))

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "strategy": pickle.dumps(self._es, protocol=pickle.HIGHEST_PROTOCOL),
            "rng": self._rng_state,
            "asked": self._asked,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name or state.get("dim") != self.dim:
            raise CheckpointError(
                f"optimizer state is for {state.get('name')!r} with dim={state.get('dim')}; "
                f"this is {self.name!r} with dim={self.dim}"
            )
        try:
            strategy = pickle.loads(state["strategy"])
        except (pickle.UnpicklingError, KeyError, EOFError, AttributeError) as exc:
            raise CheckpointError(f"cma_es state cannot be restored: {exc}") from exc
        if int(strategy.popsize) != self.config.popsize:
            raise CheckpointError(
                f"cma_es state has popsize {strategy.popsize}, the config asks for {self.config.popsize}"
            )
        self._es, self._rng_state, self._asked = strategy, state["rng"], state.get("asked")


@attrs.frozen
class SimpleEsConfig:
    """OpenAI-ES settings: ``popsize`` (even: antithetic pairs), fixed ``sigma``, ``learning_rate``
    of the gradient step on the mean, ``mean0`` starting value of every coordinate."""

    popsize: int = attrs.field(default=32, validator=positive)
    sigma: float = attrs.field(default=0.065, validator=positive)
    learning_rate: float = attrs.field(default=0.05, validator=positive)
    mean0: float = 0.0

    @popsize.validator
    def _check_even(self, attribute: attrs.Attribute, value: int) -> None:
        if value % 2:
            raise InvalidConfigError(f"SimpleEsConfig.popsize must be even (antithetic pairs), got {value}")


class SimpleEsOptimizer:
    """Antithetic evolution strategy with centred-rank shaping (Salimans et al. 2017)."""

    name: ClassVar[str] = "simple_es"
    Config = SimpleEsConfig

    def __init__(self, config: SimpleEsConfig | None = None, *, dim: int, seed: int = 0) -> None:
        self.config = config or SimpleEsConfig()
        if dim < 1:
            raise InvalidConfigError(f"simple_es needs at least 1 parameter, got dim={dim}")
        self.dim, self.seed = int(dim), int(seed)
        self._mean = torch.full((self.dim,), float(self.config.mean0), dtype=torch.float64)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._noise: torch.Tensor | None = None
        self._generation = 0

    def ask(self) -> torch.Tensor:
        half = self.config.popsize // 2
        eps = torch.randn(half, self.dim, generator=self._generator, dtype=torch.float64)
        self._noise = torch.cat([eps, -eps])
        return self._mean + self.config.sigma * self._noise

    def tell(self, solutions: torch.Tensor, losses: torch.Tensor) -> None:
        if self._noise is None:
            raise InvalidConfigError("simple_es.tell() called before ask()")
        _, f = _as_losses(solutions, losses, self.config.popsize, self.dim)
        ranks = torch.from_numpy(np.argsort(np.argsort(f, kind="stable"), kind="stable")).to(torch.float64)
        shaped = ranks / (self.config.popsize - 1) - 0.5  # best (lowest loss) → -0.5
        gradient = (shaped[:, None] * self._noise).sum(0) / (self.config.popsize * self.config.sigma)
        self._mean = self._mean - self.config.learning_rate * gradient
        self._noise = None
        self._generation += 1

    def stop(self) -> bool:
        return False

    @property
    def result(self) -> torch.Tensor:
        return self._mean.clone()

    @property
    def sigma(self) -> float:
        return self.config.sigma

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "mean": self._mean.clone(),
            "generator": self._generator.get_state(),
            "noise": None if self._noise is None else self._noise.clone(),
            "generation": self._generation,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name or state.get("dim") != self.dim:
            raise CheckpointError(
                f"optimizer state is for {state.get('name')!r} with dim={state.get('dim')}; "
                f"this is {self.name!r} with dim={self.dim}"
            )
        mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        if mean.shape != (self.dim,) or not math.isfinite(float(mean.abs().sum())):
            raise CheckpointError(f"simple_es state holds a mean of shape {tuple(mean.shape)}, expected ({self.dim},)")
        self._mean = mean
        self._generator.set_state(state["generator"])
        self._noise = state.get("noise")
        self._generation = int(state.get("generation", 0))


@hookimpl
def kvpolicy_register_optimizers(register) -> None:
    register("cma_es", CmaEsOptimizer, description="CMA-ES via pycma (NAMM defaults: λ=32, μ=16, σ₀=0.065)")
    register("simple_es", SimpleEsOptimizer, description="antithetic OpenAI-ES with centred ranks (Salimans et al.)")
