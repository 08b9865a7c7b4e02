"""The evolution config: one JSON file says what is evolved, on what, how, and where it runs.

A run is a sequence of *stages* (NAMM's incremental training, Cetin et al. 2024 section 4: one
task, then two, then three), each with its tasks, its number of generations and the items every
member sees per generation. The optimizer's whole state carries from stage to stage.

Everything except ``executor`` and ``progress`` decides the result, so it is fingerprinted into
the checkpoint: resuming with a different config is refused instead of silently mixing runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS
from kvpolicy.types import config_from_dict, config_to_dict, non_negative, positive

Metric = Literal["task", "loglik"]
ExecutorKind = Literal["inprocess", "process", "ray"]
#: config fields that change how a run is executed, never what it computes
NOT_FINGERPRINTED = ("executor", "progress")


@attrs.frozen
class StageConfig:
    """One stage: ``tasks`` evaluated, ``generations`` run, ``items`` per task and generation
    (all members see the same items: common random numbers), prompt ``length`` in tokens."""

    tasks: tuple[str, ...] = attrs.field(converter=tuple)
    generations: int = attrs.field(validator=positive)
    items: int = attrs.field(default=2, validator=positive)
    length: int = attrs.field(default=1024, validator=positive)

    @tasks.validator
    def _check_tasks(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value or not all(isinstance(t, str) and t for t in value):
            raise InvalidConfigError(f"a stage needs a non-empty list of task names, got {list(value)}")


@attrs.frozen
class FitnessConfig:
    """How a member's fitness is measured (higher is better).

    ``metric``: ``task`` (the task's own metric on greedy output) or ``loglik`` (teacher-forced
    log-likelihood of the gold answer, scored as ``exp(mean log p)``: cheap, smooth, no decoding).
    ``cache_weight``: adds ``cache_weight × (1 − kept fraction)``, rewarding memory saved.
    ``population_batch``: run all members of a job as one batch, batch row *i* with parameter row
    *i* (`kvpolicy.eval.rows.PopulationRows`), instead of one after another; the fast path on a GPU. The
    figures equal one-by-one runs up to the rounding of batched kernels, so it is fingerprinted.
    ``shared_prefill``: members share everything up to their first eviction pass — each item's
    prompt runs once, its features are extracted once, and every member of a job is forked from
    that (`kvpolicy.integrations.hf.shared_prefill`); the prefill is kept for later generations in a
    store of at most ``prefill_store_gib`` GiB per process. Needs a policy whose first eviction
    pass comes after the whole prompt (``after_prefill``). Same figures as ``population_batch``.
    ``protocol``: when the question reaches the cache (`kvpolicy.eval.protocols`); under
    ``context-first`` a member compresses each context before its question exists, so what it
    learns cannot come from the question's attention.
    """

    metric: Metric = attrs.field(default="task", validator=attrs.validators.in_(("task", "loglik")))
    cache_weight: float = attrs.field(default=0.0, validator=non_negative)
    population_batch: bool = attrs.field(default=False)
    shared_prefill: bool = attrs.field(default=False)
    prefill_store_gib: float = attrs.field(default=4.0, validator=positive)
    protocol: str = attrs.field(default=DEFAULT_PROTOCOL, validator=attrs.validators.in_(PROTOCOLS))

    @shared_prefill.validator
    def _check_shared(self, attribute: attrs.Attribute, value: object) -> None:
        if not isinstance(value, bool):
            raise InvalidConfigError(f"fitness.shared_prefill must be true or false, got {value!r}")

    @population_batch.validator
    def _check_population_batch(self, attribute: attrs.Attribute, value: object) -> None:
        if not isinstance(value, bool):
            raise InvalidConfigError(f"fitness.population_batch must be true or false, got {value!r}")


@attrs.frozen
class ExecutorConfig:
    """Where members are evaluated: ``inprocess``, ``process`` (``workers`` local processes, each
    with its own model copy) or ``ray`` (``workers`` actors). ``threads``: torch threads per
    worker (default: the CPU count divided by the workers; a Ray actor: 1, reserved on its
    node) or, in-process, during evaluation
    (default: leave torch's setting). On a shared, busy CPU one thread per process avoids
    OpenMP threads spinning against each other (measured in ``benchmarks/bench_evolve.py``)."""

    kind: ExecutorKind = attrs.field(
        default="inprocess", validator=attrs.validators.in_(("inprocess", "process", "ray"))
    )
    workers: int = attrs.field(default=2, validator=positive)
    threads: int | None = attrs.field(default=None, validator=positive)
    #: the Ray cluster to join (``"auto"``, ``"HEAD:6379"``, ``"local"``; other executors ignore
    #: it); unset: ``$RAY_ADDRESS``, else a cluster ``ray start`` made here, else a local Ray
    address: str | None = attrs.field(default=None)

    @address.validator
    def _check_address(self, attribute: attrs.Attribute, value: object) -> None:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidConfigError(f'executor.address must be a Ray address such as "auto", got {value!r}')


@attrs.frozen
class OptimizerRef:
    """A registered optimizer by name with its config as plain JSON data."""

    name: str = "cma_es"
    config: Mapping[str, Any] = attrs.field(factory=dict, converter=lambda d: dict(d or {}))

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(self.config, sort_keys=True, default=str)))


@attrs.frozen
class EvolveConfig:
    """A whole evolution run.

    ``workload``: what is evaluated — ``hf`` (a model + policy on kvpolicy's offline tasks) or
    ``quadratic`` (a known test function, for checking optimizers and the runner in
    milliseconds). ``model``: a shipped model name (`kvpolicy.models`) or ``tiny:<family>`` for a
    random-weight test model. ``policy``: a preset name or a policy config dict (its scorer must
    be `Parametric`). ``members_per_job``: members evaluated together in one job (a batch on one
    worker); the split is fixed by the config, so every executor computes the same numbers.
    ``eval_every``: the mean is scored on *validation* items every that many generations, on
    ``eval_items`` items per task of the last stage; the best scoring mean is the result.
    Validation items are carved from the ``train`` split (seeds ``train_pool`` onwards, never
    drawn for a generation), so the ``test`` split, which `kvpolicy compare` reports, never
    influences a choice. ``train_pool``: seeds of the train split the per-generation items are
    drawn from. ``search``: the named parameter groups evolved (``"scorer.w_s"``; empty: all),
    the others held at their start; ``start``: the starting point, named groups to a list of
    values or one number (unnamed ones start at zero), or the path of a saved policy file (an
    earlier stage's result). The optimizer searches an offset from the start, so its mean
    starts there. ``subspace``: random directions through further groups, searched beside ``search``.
    """

    stages: tuple[StageConfig, ...] = attrs.field(converter=tuple)
    model: str = "smollm2-135m-instruct"
    policy: Any = "namm-bam"
    optimizer: OptimizerRef = OptimizerRef()
    workload: str = attrs.field(default="hf", validator=attrs.validators.in_(("hf", "quadratic")))
    seed: int = attrs.field(default=0, validator=non_negative)
    eval_every: int = attrs.field(default=1, validator=positive)
    eval_items: int = attrs.field(default=2, validator=positive)
    train_pool: int = attrs.field(default=64, validator=positive)
    members_per_job: int = attrs.field(default=4, validator=positive)
    calibration_items: int = attrs.field(default=2, validator=non_negative)
    search: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    start: Mapping[str, Any] | str = attrs.field(
        factory=dict, converter=lambda d: d if isinstance(d, str) else dict(d or {})
    )
    fitness: FitnessConfig = FitnessConfig()
    executor: ExecutorConfig = ExecutorConfig()
    progress: bool = True
    #: ``{"groups": [...], "dim": n, "seed": s}``: also search ``n`` random directions through
    #: these groups (`kvpolicy.evolve.search_space.Subspace`); none by default
    subspace: Mapping[str, Any] | None = attrs.field(default=None)

    @stages.validator
    def _check_stages(self, attribute: attrs.Attribute, value: tuple[StageConfig, ...]) -> None:
        if not value:
            raise InvalidConfigError("an evolution config needs at least one stage")

    @property
    def total_generations(self) -> int:
        return sum(s.generations for s in self.stages)

    def stage_of(self, generation: int) -> tuple[int, StageConfig]:
        """``(stage index, stage)`` that global ``generation`` belongs to."""
        start = 0
        for index, stage in enumerate(self.stages):
            if generation < start + stage.generations:
                return index, stage
            start += stage.generations
        raise InvalidConfigError(f"generation {generation} is past the last stage ({self.total_generations} in all)")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def fingerprint(self) -> str:
        """sha256 of everything that decides the result (not the executor or the progress bar)."""
        data = {k: v for k, v in self.to_dict().items() if k not in NOT_FINGERPRINTED}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def result_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in NOT_FINGERPRINTED}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvolveConfig:
        if not isinstance(data, Mapping):
            raise InvalidConfigError(f"an evolution config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        if "stages" not in data:
            raise InvalidConfigError(
                'an evolution config needs "stages", e.g. [{"tasks": ["needle"], "generations": 4, "items": 2}]'
            )
        stages = data["stages"]
        if not isinstance(stages, list):
            raise InvalidConfigError(f'"stages" must be a list of stage objects, got {type(stages).__name__}')
        data["stages"] = tuple(config_from_dict(StageConfig, s) for s in stages)
        optimizer = data.get("optimizer")
        if isinstance(optimizer, str):
            data["optimizer"] = OptimizerRef(optimizer)
        elif optimizer is not None:
            data["optimizer"] = config_from_dict(OptimizerRef, optimizer)
        for key, cls_ in (("fitness", FitnessConfig), ("executor", ExecutorConfig)):
            if key in data:
                data[key] = config_from_dict(cls_, data[key])
        policy = data.get("policy")
        if policy is not None and not isinstance(policy, (str, Mapping)):
            raise InvalidConfigError(f'"policy" must be a preset name or a policy config object, got {policy!r}')
        return config_from_dict(cls, data)

    @classmethod
    def from_file(cls, path: str | Path) -> EvolveConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidConfigError(f"cannot read evolution config {path}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
