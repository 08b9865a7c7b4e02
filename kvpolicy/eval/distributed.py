"""Evaluation past one process: every (item, policy, budget) as a job for a worker pool —
spawned local processes or Ray actors (`kvpolicy.worker_pools`) — written to the same stores as
the in-process run (``kvpolicy eval/compare --executor processes|ray``).

A job is plain data: the item's ``(task, split, seed, length)``, the policy spec and budget, and
the run options. A worker loads the model once per process and rebuilds everything else from
the job (`kvpolicy.eval.tasks.make_item`, `kvpolicy.build`), so a job's result is the one the
in-process run computes for it (``seconds`` aside), wherever it runs. Results are stored as they
arrive; a rerun makes jobs only for what its stores lack, so it resumes. With a shared prefill
(`kvpolicy.eval.many_policies`) the prompt recording is per item, so a job is one item × every
policy.

The stores are filled here; the summaries are then written by the ordinary in-process run
(`kvpolicy.eval.run.run_suite`), which finds every result done.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
from tqdm.auto import tqdm

import kvpolicy
from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.harness import check_run_arguments, evaluate
from kvpolicy.eval.items import Item
from kvpolicy.eval.many_policies import bind_policies, context_groups, shared_item_results
from kvpolicy.eval.protocols import DEFAULT_PROTOCOL, EvalProtocol, check_protocol
from kvpolicy.eval.references import reference_path
from kvpolicy.eval.results import ItemResult, ResultStore
from kvpolicy.eval.rows import ChunkAlign, ItemRows
from kvpolicy.eval.tasks import make_item
from kvpolicy.worker_pools import ProcessPool, RayPool

ExecutorKind = Literal["in-process", "processes", "ray"]
EXECUTORS: tuple[str, ...] = ("in-process", "processes", "ray")


@attrs.frozen
class PolicyRun:
    """One run of a comparison: its label (and results folder name), spec and budget."""

    label: str
    spec: str
    budget: str | None = None

    def build(self) -> Any:
        return kvpolicy.build(self.spec, **({} if self.budget is None else {"budget": self.budget}))


@attrs.frozen(eq=False)
class EvalJob:
    """One item, rebuilt by the worker, under ``runs``: one run, or with ``shared_prefill`` every
    evicting run of the comparison (those ``pending`` computed). ``reference``: also the item's
    full-cache result. ``options`` are `evaluate`'s keyword arguments (metric, chunk_size, …), so
    a new run option is one more key."""

    index: int
    task: str
    split: str
    seed: int
    length: int
    runs: tuple[PolicyRun, ...] = ()
    pending: tuple[str, ...] = ()
    reference: bool = False
    shared_prefill: bool = False
    #: with ``shared_prefill`` under ``context-first``: the seeds of the other questions of the
    #: item's context, computed from the same prefill (`kvpolicy.eval.many_policies.context_groups`)
    also: tuple[int, ...] = ()
    chunk_align: ChunkAlign = "start"
    options: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def of(cls, index: int, item: Item, **fields: Any) -> EvalJob:
        return cls(index, item.task, item.split, item.seed, item.length, **fields)

    def describe(self) -> str:
        what = ", ".join(run.label for run in self.runs) + (" + full cache" if self.reference else "")
        seeds = ", ".join(str(s) for s in (self.seed, *self.also))
        return f"job {self.index} ({self.task} seed {seeds}, {self.length} tokens: {what})"


@attrs.frozen
class EvalJobResult:
    """``results`` by run label (one per item of the job), and the full-cache results when the job
    asked for them."""

    results: dict[str, list[ItemResult]]
    reference: list[ItemResult] = attrs.field(factory=list)


class EvalWorker:
    """One worker process: the model, loaded once, and the policies it has built so far."""

    def __init__(self, model_name: str) -> None:
        from kvpolicy.models import load_named_model  # a worker's own import: the parent never loads a model

        self.model, self.tokenizer = load_named_model(model_name)
        self._policies: dict[PolicyRun, Any] = {}

    def _policy(self, run: PolicyRun) -> Any:
        if run not in self._policies:
            self._policies[run] = run.build()
        return self._policies[run]

    def run(self, job: EvalJob) -> EvalJobResult:
        item = make_item(job.task, job.split, job.seed, job.length)
        model, tokenizer = self.model, self.tokenizer
        if job.shared_prefill:
            group = [item, *(make_item(job.task, job.split, seed, job.length) for seed in job.also)]
            policies = [(run.label, self._policy(run)) for run in job.runs]
            union = bind_policies(policies, tokenizer, job.options.get("protocol", DEFAULT_PROTOCOL))
            results, reference = shared_item_results(
                policies, {label: group for label in job.pending}, union, group, model, tokenizer,
                reference=group if job.reference else [], **job.options,
            )  # fmt: skip
            return EvalJobResult(results, reference)
        plan = ItemRows(1, job.chunk_align)
        results = {
            run.label: evaluate(self._policy(run), [item], model, tokenizer, rows=plan, label=run.label, **job.options)
            for run in job.runs
        }
        full = []
        if job.reference:  # as `reference_results` computes it: the default plan
            full = evaluate(kvpolicy.build("full"), [item], model, tokenizer, label="full", **job.options)
        return EvalJobResult(results, full)


@attrs.frozen
class MakeEvalWorker:
    """The picklable recipe each worker process calls once."""

    model_name: str

    def __call__(self) -> EvalWorker:
        return EvalWorker(self.model_name)


def make_pool(
    kind: ExecutorKind, model_name: str, *, workers: int, threads: int | None = None, address: str | None = None
) -> ProcessPool | RayPool:
    """A pool of ``workers`` evaluation workers: ``processes`` (torch threads: ``threads``, default
    this machine's CPUs shared among them) or ``ray`` (each actor reserves ``threads`` CPUs, default 1)."""
    if not isinstance(workers, int) or workers < 1:
        raise InvalidConfigError(f"--workers must be a positive count, got {workers!r}")
    if threads is not None and threads < 1:
        raise InvalidConfigError(f"--threads must be a positive count, got {threads!r}")
    make = MakeEvalWorker(model_name)
    if kind == "processes":
        return ProcessPool(make, workers=workers, threads=threads or max(1, (os.cpu_count() or 1) // workers))
    if kind == "ray":
        return RayPool(make, workers=workers, threads=threads or 1, address=address, describe=EvalJob.describe)
    raise InvalidConfigError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS[1:])} for a worker pool")


def _is_full_cache(policy: Any) -> bool:
    return policy.config == kvpolicy.build("full").config


def evaluation_jobs(
    runs: Sequence[tuple[PolicyRun, Any, Path]],
    items: Sequence[Item],
    references: ResultStore,
    *,
    shared_prefill: bool,
    chunk_align: ChunkAlign,
    options: dict[str, Any],
) -> tuple[list[EvalJob], dict[str, ResultStore]]:
    """The jobs that compute what the stores lack, and each run's store by label. Runs the
    in-process path would not compute here (the full cache: copied from the references; with a
    shared prefill, non-evicting policies) get no job."""
    stores = {run.label: ResultStore(Path(out) / "results.jsonl", options.get("protocol")) for run, _, out in runs}
    jobs: list[EvalJob] = []
    if shared_prefill:
        evicting = tuple(run for run, policy, _ in runs if policy.schedule.kind != "never")
        for group in context_groups(items, options.get("protocol", DEFAULT_PROTOCOL)):
            pending = tuple(
                run.label for run in evicting if any(not stores[run.label].done(i.uid, i.fingerprint) for i in group)
            )
            need_reference = any(not references.done(i.uid, i.fingerprint) for i in group) and bool(evicting)
            if pending or need_reference:
                also = tuple(i.seed for i in group[1:])
                fields = dict(runs=evicting, pending=pending, reference=need_reference, shared_prefill=True, also=also)
                jobs.append(EvalJob.of(len(jobs), group[0], options=options, **fields))
        return jobs, stores
    for item in items:
        if not references.done(item.uid, item.fingerprint):
            jobs.append(EvalJob.of(len(jobs), item, reference=True, options=options))
    for run, policy, _ in runs:
        if _is_full_cache(policy):
            continue
        for item in items:
            stored = stores[run.label].finished(item)
            if stored is None or stored.chunks != chunk_align:
                jobs.append(EvalJob.of(len(jobs), item, runs=(run,), chunk_align=chunk_align, options=options))
    return jobs, stores


def evaluate_distributed(
    runs: Sequence[tuple[PolicyRun, Any, str | Path]],
    items: Sequence[Item],
    pool: Any,
    *,
    model_name: str,
    metric: str = "task",
    chunk_size: int = 512,
    chunk_align: ChunkAlign = "start",
    shared_prefill: bool = False,
    reference_dir: str | Path | None = None,
    progress: bool = True,
    protocol: EvalProtocol = DEFAULT_PROTOCOL,
) -> int:
    """Compute on ``pool`` (`make_pool`) every missing result of ``runs`` (``(run, its built
    policy, out folder)``) and of the full-cache reference on ``items``, storing each as it
    arrives; returns the jobs run (0 when everything was done)."""
    check_run_arguments(metric, chunk_size)
    if shared_prefill and metric == "both":
        raise InvalidConfigError("--shared-prefill scores with 'task' or 'loglik', not 'both'")
    ItemRows(1, chunk_align)  # checked before any job starts
    check_protocol(protocol)
    options: dict[str, Any] = {"metric": metric, "chunk_size": chunk_size, "protocol": protocol}
    references = ResultStore(reference_path(model_name, metric, chunk_size, reference_dir, protocol), protocol)
    runs = [(run, policy, Path(out)) for run, policy, out in runs]
    jobs, stores = evaluation_jobs(
        runs, items, references, shared_prefill=shared_prefill, chunk_align=chunk_align, options=options
    )
    if not jobs:
        return 0
    with tqdm(total=len(jobs), desc="jobs", unit="job", dynamic_ncols=True, disable=not progress) as bar:
        for _, result in pool.map(jobs):
            # a shared context's job computes all its questions; some may have been stored before
            for done in result.reference:
                if not (shared_prefill and references.done(done.uid, done.fingerprint)):
                    references.add(done)
            for label, done_results in result.results.items():
                for done in done_results:
                    if not (shared_prefill and stores[label].done(done.uid, done.fingerprint)):
                        stores[label].add(done)
            bar.update()
    return len(jobs)
