"""The real workload: a transformers model running a learnable policy on kvpolicy's offline tasks.

Each member of the population is the policy with one parameter row (`Policy.set_flat`); every
item goes through the evaluation driver (`kvpolicy.eval.harness.evaluate`: chunked prefill with
eviction between chunks, then greedy decoding or teacher forcing), which measures the score and
the cache actually kept. Calibration runs the zero policy (which keeps every token) with the
extractor collecting its normalisation statistics, then freezes them (Cetin et al. 2024).

Members are evaluated one after another, each with batch 1, or — with ``"population_batch":
true`` in the fitness config — all rows of a job as one batch, batch row *i* with parameter row
*i* (`kvpolicy.eval.rows.PopulationRows`), the faster path on a GPU; or — with
``"shared_prefill": true`` — forked as one batch from a prefill of the item run once and kept
for later generations (`kvpolicy.eval.rows.ForkedRows`), the fast path on a CPU.

The optimizer searches the offset of the ``search``-ed parameter groups from the ``start`` point
(`SearchSpace`); the workload turns its rows into full parameter vectors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from kvpolicy.calibration import calibrate, calibrates
from kvpolicy.checkpoint import tensor_checksum
from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.harness import evaluate
from kvpolicy.eval.prefills import PrefillStore
from kvpolicy.eval.rows import ForkedRows, PopulationRows, RowPlan, shared_prompt
from kvpolicy.eval.tasks import check_tasks, make_item
from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.jobs import Job, JobResult, item_split
from kvpolicy.evolve.search_space import SearchSpace, subspace_of
from kvpolicy.integrations.hf.shared_prefill import Prefill, prefill
from kvpolicy.integrations.hf.transfer import model_record
from kvpolicy.models import load_named_model
from kvpolicy.policy import Policy, build


class HfWorkload:
    """Built once per process; the model is loaded on the first job (the parent process of a
    process pool never loads it)."""

    def __init__(self, config: EvolveConfig) -> None:
        self.config = config
        for stage in config.stages:
            check_tasks(stage.tasks)
        self.policy = build(config.policy)
        if self.policy.num_params == 0:
            raise InvalidConfigError(
                f"policy {self.policy!r} has no learnable parameters; evolve a Parametric scorer such as namm-bam"
            )
        self.full = build("full")
        schedule = self.policy.schedule
        self.chunk_size = schedule.every if schedule.kind == "every_n" else 512
        self.space = SearchSpace(self.policy, config.search, config.start, subspace_of(config))
        self._model: Any = None
        self._tokenizer: Any = None
        self._prefills: PrefillStore | None = None
        if config.fitness.shared_prefill:
            if schedule.kind != "after_prefill":
                raise InvalidConfigError(
                    "fitness.shared_prefill needs a policy whose first eviction pass comes after the whole prompt "
                    f"(schedule 'after_prefill'); this policy's schedule is {schedule.kind!r}"
                )
            self._prefills = PrefillStore(int(config.fitness.prefill_store_gib * 2**30))

    @property
    def num_params(self) -> int:
        return self.space.dim

    def _ensure_model(self) -> tuple[Any, Any]:
        if self._model is None:
            self._model, self._tokenizer = load_named_model(self.config.model)
        return self._model, self._tokenizer

    def _results(
        self, policy: Policy, task: str, split: str, length: int, seed: int, rows: RowPlan | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [rows], kept [rows])`` of ``policy`` on one item, its rows prepared by ``rows``."""
        model, tokenizer = self._ensure_model()
        item = make_item(task, item_split(split), seed, length)
        fitness = self.config.fitness
        results = evaluate(
            policy, [item], model, tokenizer, metric=fitness.metric, chunk_size=self.chunk_size, rows=rows,
            protocol=fitness.protocol,
        )  # fmt: skip
        scores = torch.tensor([r.score for r in results], dtype=torch.float64)
        return scores, torch.tensor([r.kept_fraction for r in results], dtype=torch.float64)

    def _forked_rows(self, params: torch.Tensor | None, item_key: tuple, buffers_key: str) -> ForkedRows:
        """Rows forked from the item's shared prefill, kept for later generations; ``params=None``:
        the full cache of that prefill (the reference)."""
        model, _ = self._ensure_model()
        store = self._prefills
        if store is None:
            raise InvalidConfigError("forked rows need fitness.shared_prefill")

        def shared(row: Any) -> Prefill:
            def make() -> Prefill:
                return prefill(self.policy, model, shared_prompt(row, self.config.fitness.protocol), self.chunk_size)

            return store.get((*item_key, buffers_key), make)

        return ForkedRows(shared, population=params, evict=params is not None)

    def _prefill_key(self, job: Job, seed: int) -> tuple:
        """What a stored prefill is the prefill of: the item, or under ``context-first`` its
        context (the questions of one context share it)."""
        if self.config.fitness.protocol == "context-first":
            return (make_item(job.task, item_split(job.split), seed, job.length).context_id, job.length)
        return (job.task, job.split, job.length, seed)

    def run(self, job: Job) -> JobResult:
        start = time.perf_counter()
        if job.kind == "calibrate":
            return self._calibrate(job, start)
        self.policy.load_buffers(job.buffers, "the calibration of this run")
        params = None if job.params is None else self.space.full_params(job.params)
        if self._prefills is not None:
            scores = torch.zeros(job.rows, len(job.seeds), dtype=torch.float64)
            kept = torch.ones_like(scores)
            # the reference jobs carry no buffers: they share the prefill made with the current ones
            key = tensor_checksum(dict(job.buffers or self.policy.buffers()))
            for i, seed in enumerate(job.seeds):
                rows = self._forked_rows(params, self._prefill_key(job, seed), key)
                scores[:, i], kept[:, i] = self._results(self.policy, job.task, job.split, job.length, seed, rows)
            return JobResult(scores, kept, {}, time.perf_counter() - start)
        if params is not None and self.config.fitness.population_batch:
            scores = torch.zeros(job.rows, len(job.seeds), dtype=torch.float64)
            kept = torch.ones_like(scores)
            for i, seed in enumerate(job.seeds):
                rows = PopulationRows(params)
                scores[:, i], kept[:, i] = self._results(self.policy, job.task, job.split, job.length, seed, rows)
            return JobResult(scores, kept, {}, time.perf_counter() - start)
        rows = [None] if params is None else list(params)
        scores = torch.zeros(len(rows), len(job.seeds), dtype=torch.float64)
        kept = torch.ones_like(scores)
        for r, row in enumerate(rows):
            if row is not None:
                self.policy.set_flat(row.float())
            policy = self.full if row is None else self.policy
            for i, seed in enumerate(job.seeds):
                scores[r, i], kept[r, i] = self._results(policy, job.task, job.split, job.length, seed)
        return JobResult(scores, kept, {}, time.perf_counter() - start)

    def _calibrate(self, job: Job, start: float) -> JobResult:
        if not calibrates(self.policy):
            return JobResult(torch.ones(1, 0), torch.ones(1, 0), {}, time.perf_counter() - start)
        model, _ = self._ensure_model()
        items = [(task, seed) for task in job.tasks or (job.task,) for seed in job.seeds]

        def run(policy: Policy, model: Any, item: tuple[str, int]) -> None:
            self._results(policy, item[0], job.split, job.length, item[1])

        count = calibrate(self.policy, model, items, params=self.space.start, run=run)
        return JobResult(torch.ones(1, count), torch.ones(1, count), self.policy.buffers(), time.perf_counter() - start)

    def save_result(self, params: torch.Tensor, buffers: dict[str, torch.Tensor], path: Path) -> None:
        """Write the policy with these parameters and buffers as a policy file (`Policy.save`)."""
        self.policy.load_buffers(buffers, "the calibration of this run")
        self.policy.set_flat(self.space.full_params(params))
        self.policy.save(str(path), made_for=model_record(self._ensure_model()[0]))
