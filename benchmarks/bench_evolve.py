"""Evaluations per minute of NAMM evolution on this machine, per executor and prompt length, and
a projection of what a paper-sized run costs here and on a GPU.

One evaluation = one member (a `namm-bam` parameter vector drawn around zero with σ = 0.065, as
in CMA-ES generation 0) scored on one item of the ``needle`` task. Each executor is warmed up
first (model loaded in every worker), then times the same jobs, so the figures are side by side
from one run. Projections are arithmetic on the measured rate, labelled as projections.

    python benchmarks/bench_evolve.py --lengths 1024 2048 --members 4 --executors inprocess process
    python benchmarks/bench_evolve.py --lengths 1024 --members 8 --executors inprocess process ray

``ray`` starts a local Ray instance (``pip install "kvpolicy[ray]"``) with ``--workers`` actors.

``--batched`` instead compares, in-process and on one item, the members scored one after another
with the members scored as one batch (``"population_batch": true``, one parameter row per batch row):

    python benchmarks/bench_evolve.py --batched --lengths 1024 --members 4

``--shared`` compares, in-process, the evolved NAMM's members (``examples/namm-smollm2/evolve_linear.json``,
first eviction pass after the prompt) scored one after another through the harness with the same
members forked from one shared prefill (``"shared_prefill": true``): the first time an item is
seen (its prefill included) and again in a later generation (prefill stored):

    python benchmarks/bench_evolve.py --shared --lengths 2048 --members 17
"""

from __future__ import annotations

import argparse
import time

import torch

from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.executors import make_executor
from kvpolicy.evolve.jobs import Job
from kvpolicy.evolve.workloads import build_workload

#: A separate measurement of SmolLM2 on an H200 (bf16, transformers 5.17): batched prefill of
#: 256 sequences × 1k tokens in 0.39 s. Used only for the labelled projection below.
GPU_TOKENS_PER_SECOND = 256 * 1024 / 0.39


def config_for(
    model: str, length: int, executor: str, workers: int, threads: int, metric: str, batched: bool = False
) -> EvolveConfig:
    return EvolveConfig.from_dict(
        {
            "model": model,
            "policy": "namm-bam",
            "stages": [{"tasks": ["needle"], "generations": 1, "items": 1, "length": length}],
            "fitness": {"metric": metric, "population_batch": batched},
            "executor": {"kind": executor, "workers": workers, "threads": threads},
            "progress": False,
        }
    )


def measure(config: EvolveConfig, members: int, length: int) -> float:
    """Evaluations per minute of ``members`` one-member jobs (after a warm-up on every worker)."""
    workload = build_workload(config)
    executor = make_executor(config, workload)
    try:
        warm = [Job(i, "evaluate", "needle", "train", length, (100 + i,)) for i in range(config.executor.workers)]
        list(executor.map(warm))
        params = torch.randn(members, workload.num_params, generator=torch.Generator().manual_seed(0)) * 0.065
        jobs = [
            Job(i, "evaluate", "needle", "train", length, (i,), params[i : i + 1], {}, (i,)) for i in range(members)
        ]
        start = time.perf_counter()
        results = list(executor.map(jobs))
        seconds = time.perf_counter() - start
    finally:
        executor.close()
    kept = sum(float(r.kept.mean()) for _, r in results) / len(results)
    rate = members / seconds * 60
    print(f"  {config.executor.kind:>9} x{config.executor.workers}  {length:>5} tokens: {rate:6.2f} evaluations/min "
          f"({seconds:.1f} s for {members}; mean cache kept {kept:.1%})", flush=True)  # fmt: skip
    return rate


def measure_population(config: EvolveConfig, params: torch.Tensor, length: int) -> tuple[float, torch.Tensor]:
    """Evaluations per minute of ``params [members, n]`` on one item, in-process: one job per
    member, or one job of all members when the config batches the population. Also the kept fractions."""
    workload = build_workload(config)
    executor = make_executor(config, workload)
    members = params.shape[0]
    try:
        list(executor.map([Job(0, "evaluate", "needle", "train", length, (100,))]))  # warm-up: load the model
        if config.fitness.population_batch:
            jobs = [Job(0, "evaluate", "needle", "train", length, (0,), params, {}, tuple(range(members)))]
        else:
            jobs = [
                Job(i, "evaluate", "needle", "train", length, (0,), params[i : i + 1], {}, (i,)) for i in range(members)
            ]
        start = time.perf_counter()
        results = [r for _, r in sorted(executor.map(jobs), key=lambda pair: pair[0])]
        seconds = time.perf_counter() - start
    finally:
        executor.close()
    kept = torch.cat([r.kept[:, 0] for r in results])
    rate = members / seconds * 60
    mode = "one batch" if config.fitness.population_batch else "one by one"
    print(f"  {mode:>10}  {length:>5} tokens: {rate:6.2f} evaluations/min ({seconds:.1f} s for {members}; "
          f"kept per member {', '.join(f'{k:.3f}' for k in kept.tolist())})", flush=True)  # fmt: skip
    return rate, kept


def compare_batched(args: argparse.Namespace) -> None:
    """One-by-one vs population-as-the-batch, side by side in this run."""
    for length in args.lengths:
        rates, kept = {}, {}
        for batched in (False, True):
            config = config_for(args.model, length, "inprocess", 1, args.threads, args.metric, batched)
            params = torch.randn(args.members, build_workload(config).num_params,
                                 generator=torch.Generator().manual_seed(0)) * 0.065  # fmt: skip
            rates[batched], kept[batched] = measure_population(config, params, length)
        same = "identical" if torch.equal(kept[True], kept[False]) else "DIFFERENT"
        print(f"ratio one batch / one by one at {length} tokens: {rates[True] / rates[False]:.2f}x "
              f"(kept fractions per member {same})")  # fmt: skip


def compare_shared(args: argparse.Namespace) -> None:
    """One-by-one vs members forked from a shared prefill (cold and stored), side by side."""
    import json
    from pathlib import Path

    base = json.loads((Path(__file__).parents[1] / "examples" / "namm-smollm2" / "evolve_linear.json").read_text())
    for length in args.lengths:
        scores, rates = {}, {}
        for shared in (False, True):
            data = {**base, "model": args.model, "progress": False, "calibration_items": 0,
                    "stages": [{"tasks": ["needle"], "generations": 1, "items": 1, "length": length}],
                    "fitness": {"metric": args.metric, "shared_prefill": shared},
                    "executor": {"kind": "inprocess", "threads": args.threads}}  # fmt: skip
            workload = build_workload(EvolveConfig.from_dict(data))
            workload.run(Job(0, "evaluate", "needle", "train", length, (100,)))  # warm-up: load the model
            params = torch.randn(args.members, workload.num_params, generator=torch.Generator().manual_seed(0)) * 0.25
            job = Job(1, "evaluate", "needle", "train", length, (0,), params, {}, tuple(range(args.members)))
            for phase in ("first", "stored") if shared else ("one by one",):
                start = time.perf_counter()
                result = workload.run(job)
                seconds = time.perf_counter() - start
                scores[phase], rates[phase] = result.scores[:, 0], args.members / seconds * 60
                print(f"  {phase:>10}  {length:>5} tokens: {rates[phase]:7.2f} evaluations/min "
                      f"({seconds:.1f} s for {args.members} members)", flush=True)  # fmt: skip
        same = torch.allclose(scores["first"], scores["one by one"], atol=1e-4)
        print(f"ratio shared / one by one at {length} tokens: first sight {rates['first'] / rates['one by one']:.1f}x, "
              f"prefill stored {rates['stored'] / rates['one by one']:.1f}x (scores {'equal to 1e-4' if same else 'DIFFER'})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--executors", nargs="+", choices=("inprocess", "process", "ray"), default=["inprocess", "process"]
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (in-process and workers)")
    parser.add_argument("--metric", choices=("loglik", "task"), default="loglik")
    parser.add_argument("--batched", action="store_true", help="compare one-by-one with population-as-the-batch")
    parser.add_argument("--shared", action="store_true", help="compare one-by-one with a shared prefill")
    args = parser.parse_args()
    print(f"model {args.model}, metric {args.metric}, torch threads per process {args.threads}", flush=True)
    if args.batched:
        compare_batched(args)
        return
    if args.shared:
        compare_shared(args)
        return
    rates: dict[tuple[str, int], float] = {}
    for length in args.lengths:
        for kind in args.executors:
            workers = 1 if kind == "inprocess" else args.workers
            rates[kind, length] = measure(
                config_for(args.model, length, kind, workers, args.threads, args.metric), args.members, length
            )
    for length in args.lengths:
        base = rates.get(("inprocess", length))
        for (kind, n), rate in rates.items():
            if n == length and base and kind != "inprocess":
                print(f"ratio {kind}/inprocess at {length} tokens: {rate / base:.2f}x")
    print("\nPROJECTION (arithmetic on the rates above, not measured):")
    for length in args.lengths:
        best = max(rate for (kind, n), rate in rates.items() if n == length)
        per_gen = 33 * 16  # 32 members + the mean, 16 items per generation
        hours = per_gen / best / 60
        gpu_seconds = per_gen * length / GPU_TOKENS_PER_SECOND
        print(f"  {length} tokens, one generation of 33 x 16 evaluations: {hours:.1f} h here; "
              f"~{gpu_seconds:.2f} s of batched prefill on an H200 (projection from a measured 680k tokens/s)")  # fmt: skip
        print(f"    an assumed paper-sized run of 3 stages x 200 generations: {600 * hours / 24:.0f} days here; "
              f"~{600 * gpu_seconds / 60:.0f} min of GPU prefill (decoding and eviction overheads not included)")  # fmt: skip


if __name__ == "__main__":
    main()
