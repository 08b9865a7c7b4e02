"""The evolution runner: calibrate, then ask → evaluate → tell, generation after generation,
stage after stage, with a checkpoint after every generation so a killed run resumes exactly.

NAMM's training loop (Cetin et al. 2024, section 4) made resumable: the optimizer's whole state
(its RNG included) carries over between stages and across restarts; the items of generation
``g`` are drawn from ``(seed, g, task)`` alone, so a resumed run sees the same items; finished
jobs of the generation in progress are kept, so a kill loses only the jobs in flight. The
distribution *mean* is scored on held-out items every ``eval_every`` generations and the best
scoring mean is the result, saved as a policy file.

Files in the output folder: ``checkpoint.bin`` (run state), ``partial.bin`` (jobs finished in
the current generation), ``references.json`` (full-cache scores, computed once), ``log.jsonl``,
``result.safetensors`` (best mean), ``final.safetensors`` (last mean), ``fitness.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from kvpolicy.atomic import atomic_write_text
from kvpolicy.errors import CheckpointError, InvalidConfigError
from kvpolicy.eval.tasks import TASKS
from kvpolicy.evolve import log
from kvpolicy.evolve.config import EvolveConfig, StageConfig
from kvpolicy.evolve.executors import Executor, make_executor
from kvpolicy.evolve.fitness import population_fitness, to_loss
from kvpolicy.evolve.jobs import VALIDATION, Job, JobResult, Workload
from kvpolicy.evolve.reference_scores import ReferenceScores
from kvpolicy.evolve.state import (
    PartialGeneration,
    RunState,
    load_partial,
    load_state,
    population_sha,
    save_partial,
    save_state,
)
from kvpolicy.evolve.workloads import build_workload
from kvpolicy.registry import Registry, default_registry

CHECKPOINT = "checkpoint.bin"
PARTIAL = "partial.bin"
REFERENCES = "references.json"
LOG = "log.jsonl"
RESULT = "result.safetensors"
FINAL = "final.safetensors"
PLOT = "fitness.png"

#: ``on_event(name, info)`` is told ``job_done``, ``generation_logged``, ``checkpoint_saved``,
#: ``calibrated`` and ``finished``; an exception it raises stops the run at that point.
EventHook = Callable[[str, dict[str, Any]], None]


@attrs.frozen(eq=False)
class EvolutionResult:
    """The best mean found (by held-out fitness), the last mean, and where they were written."""

    best_params: torch.Tensor
    best_fitness: float
    best_generation: int
    final_params: torch.Tensor
    final_fitness: float
    generations: int
    stop_reason: str | None
    out_dir: Path


class Evolution:
    """One run of `EvolveConfig` writing into ``out_dir``; `run` starts it or resumes it."""

    def __init__(
        self,
        config: EvolveConfig,
        out_dir: str | Path,
        *,
        workload: Workload | None = None,
        executor: Executor | None = None,
        registry: Registry | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.registry = registry or default_registry()
        self.workload = workload or build_workload(config)
        self._executor = executor
        self._on_event = on_event or (lambda name, info: None)
        for stage in config.stages:
            if stage.items > config.train_pool:
                raise InvalidConfigError(
                    f"a stage asks for {stage.items} items per generation but train_pool has only {config.train_pool}"
                )
        self.registry.spec("optimizer", config.optimizer.name)  # unknown name → clear error before any work
        self._references = ReferenceScores(self._path(REFERENCES), config.fitness.metric)

    # ----------------------------------------------------------------- paths & state

    def _path(self, name: str) -> Path:
        return self.out / name

    def _new_state(self) -> RunState:
        optimizer = self._make_optimizer()
        return RunState(
            fingerprint=self.config.fingerprint(),
            config=self.config.result_fields(),
            optimizer=self.config.optimizer.name,
            optimizer_state=optimizer.state_dict(),
        )

    def _make_optimizer(self) -> Any:
        dim = self.workload.num_params
        if dim < 1:
            raise InvalidConfigError("the policy has no learnable parameters to evolve; use a Parametric scorer")
        ref = self.config.optimizer
        return self.registry.create("optimizer", ref.name, ref.config, dim=dim, seed=self.config.seed)

    def _load_or_start(self) -> RunState:
        checkpoint = self._path(CHECKPOINT)
        if checkpoint.exists():
            state = load_state(checkpoint, self.config.fingerprint(), self.config.result_fields())
            log.truncate(self._path(LOG), state.next_generation, state.calibrated, state.finished)
            return state
        if self._path(LOG).exists() and log.read(self._path(LOG)):
            raise CheckpointError(
                f"{self.out} has a run log but no {CHECKPOINT}; the checkpoint was deleted. "
                "Use a new output folder (or delete the log) to start over"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path("config.json"), json.dumps(self.config.to_dict(), indent=2, sort_keys=True))
        return self._new_state()

    # ----------------------------------------------------------------- items

    def _train_seeds(self, generation: int, task_index: int, stage: StageConfig) -> tuple[int, ...]:
        """Common random numbers: every member of a generation sees these items; drawn from
        ``(seed, generation, task)`` only, so a resumed run draws the same ones."""
        rng = np.random.default_rng([self.config.seed, generation, task_index])
        task = TASKS.get(stage.tasks[task_index])  # the quadratic workload's tasks are only names
        per_context = 1 if task is None else task.questions_per_context
        if per_context > 1:  # whole contexts: their questions share one prefill (`kvpolicy.eval.shared_context`)
            contexts = rng.choice(
                self.config.train_pool // per_context, size=-(-stage.items // per_context), replace=False
            )
            return tuple(int(c) * per_context + q for c in contexts for q in range(per_context))[: stage.items]
        return tuple(int(s) for s in rng.choice(self.config.train_pool, size=stage.items, replace=False))

    def _heldout(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """Validation items: ``train``-split seeds just past the pool generations draw from, so they
        are never trained on, and the ``test`` split is left for the final report alone."""
        last = self.config.stages[-1]
        pool = self.config.train_pool
        return [(task, last.length, tuple(range(pool, pool + self.config.eval_items))) for task in last.tasks]

    # ----------------------------------------------------------------- running jobs

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = make_executor(self.config, self.workload)
        return self._executor

    def _run_jobs(self, jobs: list[Job], generation: int, rows: torch.Tensor) -> dict[int, JobResult]:
        """Run ``jobs``, reusing those a killed run already finished for the same population."""
        sha = population_sha(rows)
        path = self._path(PARTIAL)
        partial = PartialGeneration(self.config.fingerprint(), generation, sha)
        if path.exists():
            found = load_partial(path)
            if found.fingerprint == partial.fingerprint and found.generation == generation:
                if found.population_sha != sha:
                    raise CheckpointError(
                        f"{path} holds results for another population of generation {generation}; the run is not "
                        "reproducible from its checkpoint (was the code or a plugin changed?)"
                    )
                partial = found
        todo = [job for job in jobs if job.index not in partial.results]
        for index, result in self.executor.map(todo):
            partial.results[index] = result
            save_partial(path, partial)
            self._on_event("job_done", {"generation": generation, "job": index, "done": len(partial.results)})
        return dict(partial.results)

    # ----------------------------------------------------------------- the loop

    def run(self) -> EvolutionResult:
        """Run (or resume) to the end; returns the best mean and the last one."""
        try:
            return self._run()
        finally:
            if self._executor is not None:
                self._executor.close()
                self._executor = None

    def _run(self) -> EvolutionResult:
        state = self._load_or_start()
        self._references.load()
        optimizer = self._make_optimizer()
        optimizer.load_state_dict(state.optimizer_state)
        if not state.calibrated:
            self._calibrate(state)
        total = self.config.total_generations
        bar = _progress(self.config.progress, total, state.next_generation)
        try:
            while not state.finished and state.stop_reason is None and state.next_generation < total:
                record = self._generation(state, optimizer)
                bar.update(1)
                bar.set_postfix(mean=f"{record['mean_fitness']:.4f}", sigma=f"{record['sigma']:.4f}")
        finally:
            bar.close()
        if not state.finished:
            self._finish(state, optimizer)
        return self._result(state, optimizer)

    def _calibrate(self, state: RunState) -> None:
        stage = self.config.stages[0]
        seeds = tuple(range(self.config.calibration_items))
        buffers: dict[str, torch.Tensor] = {}
        if seeds:
            job = Job(0, "calibrate", stage.tasks[0], "train", stage.length, seeds, tasks=stage.tasks)
            ((_, result),) = list(self.executor.map([job]))
            buffers = result.buffers
        state.buffers, state.calibrated = buffers, True
        log.append(
            self._path(LOG),
            {"type": "calibration", "tasks": list(stage.tasks), "items": len(seeds), "buffers": sorted(buffers)},
        )
        save_state(self._path(CHECKPOINT), state)
        self._on_event("calibrated", {"buffers": sorted(buffers)})

    def _evaluation_jobs(
        self,
        rows: torch.Tensor,
        train: list[tuple[str, int, tuple[int, ...]]],
        heldout: bool,
        buffers: dict[str, torch.Tensor],
    ) -> list[Job]:
        """Jobs scoring every row on the train items (chunks of ``members_per_job``) and, when
        due, the last row (the mean) on the held-out items."""
        jobs: list[Job] = []
        chunk = self.config.members_per_job
        for task, length, seeds in train:
            for start in range(0, rows.shape[0], chunk):
                members = tuple(range(start, min(start + chunk, rows.shape[0])))
                jobs.append(Job(len(jobs), "evaluate", task, "train", length, seeds, rows[start : members[-1] + 1],
                                buffers, members))  # fmt: skip
        if heldout:
            for task, length, seeds in self._heldout():
                jobs.append(
                    Job(
                        len(jobs), "evaluate", task, VALIDATION, length, seeds, rows[-1:], buffers, (rows.shape[0] - 1,)
                    )
                )
        return jobs

    def _generation(self, state: RunState, optimizer: Any) -> dict[str, Any]:
        generation = state.next_generation
        stage_index, stage = self.config.stage_of(generation)
        started = time.perf_counter()
        population = optimizer.ask()
        mean = optimizer.result.reshape(1, -1)
        rows = torch.cat([population, mean.to(population.dtype)])
        members = population.shape[0]
        train = [(task, stage.length, self._train_seeds(generation, t, stage)) for t, task in enumerate(stage.tasks)]
        heldout = generation % self.config.eval_every == 0 or generation == self.config.total_generations - 1
        wanted = [(t, "train", n, s) for t, n, s in train]
        if heldout:
            wanted += [(t, VALIDATION, n, s) for t, n, s in self._heldout()]
        self._references.ensure(wanted, self.executor)
        jobs = self._evaluation_jobs(rows, train, heldout, state.buffers)
        results = self._run_jobs(jobs, generation, rows)

        scores = {task: torch.zeros(rows.shape[0], len(seeds), dtype=torch.float64) for task, _, seeds in train}
        kept_sum = torch.zeros(rows.shape[0], dtype=torch.float64)
        kept_count = 0
        heldout_scores: dict[str, torch.Tensor] = {}
        heldout_kept: list[torch.Tensor] = []
        for job in jobs:
            result = results[job.index]
            if job.split == VALIDATION:
                heldout_scores[job.task] = result.scores.double()
                heldout_kept.append(result.kept.double().reshape(-1))
                continue
            scores[job.task][list(job.members)] = result.scores.double()
            kept_sum[list(job.members)] += result.kept.double().sum(dim=1)
        for _, _, seeds in train:
            kept_count += len(seeds)
        kept = kept_sum / kept_count
        references = {task: self._references.of(task, "train", n, s) for task, n, s in train}
        fitness = population_fitness(scores, references, kept, self.config.fitness.cache_weight)
        optimizer.tell(population, to_loss(fitness[:members]))

        record: dict[str, Any] = {
            "type": "generation",
            "generation": generation,
            "stage": stage_index,
            "tasks": list(stage.tasks),
            "items": {task: list(seeds) for task, _, seeds in train},
            "member_fitness": fitness[:members].tolist(),
            "mean_fitness": float(fitness[-1]),
            "best_member_fitness": float(fitness[:members].max()),
            "sigma": float(optimizer.sigma) if hasattr(optimizer, "sigma") else None,
            "member_kept_fraction": kept[:members].tolist(),
            "mean_kept_fraction": float(kept[-1]),
            "heldout_fitness": None,
        }
        if heldout:
            record.update(self._score_heldout(state, mean.reshape(-1), heldout_scores, heldout_kept, generation))
        if optimizer.stop():
            reasons = getattr(optimizer, "stop_reasons", {}) or {"stop": True}
            state.stop_reason = ", ".join(f"{k}={v}" for k, v in reasons.items())
            record["stop_reason"] = state.stop_reason
        record["seconds"] = round(time.perf_counter() - started, 3)
        log.append(self._path(LOG), record)
        self._on_event("generation_logged", {"generation": generation})
        state.optimizer_state = optimizer.state_dict()
        state.next_generation = generation + 1
        save_state(self._path(CHECKPOINT), state)
        self._path(PARTIAL).unlink(missing_ok=True)
        self._on_event("checkpoint_saved", {"generation": generation})
        return record

    def _score_heldout(
        self,
        state: RunState,
        params: torch.Tensor,
        scores: dict[str, torch.Tensor],
        kept: list[torch.Tensor],
        generation: int,
    ) -> dict[str, Any]:
        """Held-out fitness of the mean; a new best is saved as the result policy at once."""
        references = {task: self._references.of(task, VALIDATION, n, s) for task, n, s in self._heldout()}
        kept_fraction = torch.cat(kept).mean().reshape(1)
        fitness = float(population_fitness(scores, references, kept_fraction, self.config.fitness.cache_weight)[0])
        if state.best_fitness is None or fitness > state.best_fitness:
            state.best_fitness, state.best_generation, state.best_params = fitness, generation, params.clone()
            self.workload.save_result(params, state.buffers, self._path(RESULT))
        return {"heldout_fitness": fitness, "heldout_kept_fraction": float(kept_fraction)}

    def _finish(self, state: RunState, optimizer: Any) -> None:
        """Score the last mean on the held-out items, keep it if best, save it, mark the run done."""
        generation = state.next_generation
        final = optimizer.result.reshape(1, -1)
        self._references.ensure([(t, VALIDATION, n, s) for t, n, s in self._heldout()], self.executor)
        jobs = self._evaluation_jobs(final, [], True, state.buffers)
        results = self._run_jobs(jobs, generation, final)
        scores = {job.task: results[job.index].scores.double() for job in jobs}
        kept = [results[job.index].kept.double().reshape(-1) for job in jobs]
        summary = self._score_heldout(state, final.reshape(-1), scores, kept, generation)
        self.workload.save_result(final.reshape(-1), state.buffers, self._path(FINAL))
        log.append(self._path(LOG), {"type": "final", "generation": generation, **summary,
                                     "best_generation": state.best_generation, "best_fitness": state.best_fitness})  # fmt: skip
        state.finished = True
        state.optimizer_state = optimizer.state_dict()
        save_state(self._path(CHECKPOINT), state)
        self._path(PARTIAL).unlink(missing_ok=True)
        self._on_event("finished", {"best_fitness": state.best_fitness})

    def _result(self, state: RunState, optimizer: Any) -> EvolutionResult:
        final_records = [r for r in log.read(self._path(LOG)) if r.get("type") == "final"]
        return EvolutionResult(
            best_params=state.best_params,
            best_fitness=float(state.best_fitness),
            best_generation=int(state.best_generation),
            final_params=optimizer.result,
            final_fitness=float(final_records[-1]["heldout_fitness"]) if final_records else float("nan"),
            generations=state.next_generation,
            stop_reason=state.stop_reason,
            out_dir=self.out,
        )


class _NoBar:
    def update(self, n: int) -> None: ...

    def set_postfix(self, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


def _progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="evolve", unit="gen")
