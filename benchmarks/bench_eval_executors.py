"""Evaluated items per minute of ``kvpolicy eval/compare`` per executor on this machine: in this
process, in ``--workers`` spawned processes, and on ``--workers`` Ray actors (a local instance),
side by side from one run. One item = one (item, policy) result, the unit of a job.

Every executor runs the same jobs (`kvpolicy.eval.distributed.EvalJob`: the ``small`` profile's
tasks at ``--length`` tokens, ``--seeds`` items per task, each under every ``--policies`` at
``--budget``) with ``--threads`` torch threads per process; workers are started and have loaded
the model before the clock starts. It also checks that every executor returned the same scores,
predictions and kept fractions.

    nice -n 10 python benchmarks/bench_eval_executors.py --length 2048 --seeds 1 --workers 2
"""

from __future__ import annotations

import argparse
import time

import torch

from kvpolicy.eval.distributed import EvalJob, EvalWorker, PolicyRun, make_pool
from kvpolicy.eval.profiles import get_profile


def jobs_for(args: argparse.Namespace) -> list[EvalJob]:
    items = get_profile("small").items("test", lengths=(args.length,), seeds=tuple(range(args.seeds)))
    runs = [PolicyRun(f"{spec}@{args.budget}", spec, args.budget) for spec in args.policies]
    options = {"metric": "task", "chunk_size": 512}
    pairs = [(item, run) for item in items for run in runs]
    return [EvalJob.of(i, item, runs=(run,), options=options) for i, (item, run) in enumerate(pairs)]


def outcome(results: dict) -> dict:
    """What must not depend on the executor: each result but its times."""
    return {
        index: [
            (r.uid, r.policy, r.score, r.prediction, r.kept_fraction)
            for per_run in result.results.values()  # one list per policy run: a job may hold a context's items
            for r in per_run
        ]
        for index, result in results.items()
    }


def in_process(args: argparse.Namespace, jobs: list[EvalJob]) -> tuple[float, dict]:
    torch.set_num_threads(args.threads)
    worker = EvalWorker(args.model)
    worker.run(jobs[0])  # warm-up: first-call costs out of the timing
    start = time.perf_counter()
    results = {job.index: worker.run(job) for job in jobs}
    return time.perf_counter() - start, results


def pooled(kind: str, args: argparse.Namespace, jobs: list[EvalJob]) -> tuple[float, dict]:
    if kind == "ray":
        import ray

        ray.init(address="local", num_cpus=args.workers * args.threads, include_dashboard=False, log_to_driver=False)
    pool = make_pool(kind, args.model, workers=args.workers, threads=args.threads)  # type: ignore[arg-type]
    try:
        pool.wait_ready()
        start = time.perf_counter()
        results = dict(pool.map(jobs))
        return time.perf_counter() - start, results
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--seeds", type=int, default=1, help="items per task")
    parser.add_argument("--policies", nargs="+", default=["h2o", "snapkv", "streaming_llm"])
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--executors", nargs="+", choices=("in-process", "processes", "ray"),
                        default=["in-process", "processes", "ray"])  # fmt: skip
    args = parser.parse_args()
    jobs = jobs_for(args)
    rows, outcomes = [], {}
    for kind in args.executors:
        seconds, results = in_process(args, jobs) if kind == "in-process" else pooled(kind, args, jobs)
        outcomes[kind] = outcome(results)
        label = (
            "1 process"
            if kind == "in-process"
            else f"{args.workers} {'processes' if kind == 'processes' else 'Ray actors'}"
        )
        rows.append((label, len(jobs) / seconds * 60, seconds))
        print(f"{label}: {len(jobs)} items in {seconds:.1f} s", flush=True)
    base = rows[0][1]
    print(f"\n{len(jobs)} items ({args.seeds} per task of the small profile at {args.length} tokens × "
          f"{', '.join(args.policies)} @ {args.budget}), {args.threads} torch thread(s) per process, {args.model}\n")  # fmt: skip
    print(f"| executor | items/min | × {rows[0][0]} |\n|---|---:|---:|")
    for label, rate, _ in rows:
        print(f"| {label} | {rate:.1f} | {rate / base:.2f} |")
    same = all(o == next(iter(outcomes.values())) for o in outcomes.values())
    print(f"\nsame scores, predictions and kept fractions from every executor: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
