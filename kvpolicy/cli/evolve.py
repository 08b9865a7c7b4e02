"""``kvpolicy evolve CONFIG``: evolve a learnable policy with CMA-ES; rerun the same command to resume."""

from __future__ import annotations

import argparse
from pathlib import Path

import attrs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="evolution config (JSON): model, policy, optimizer, stages, seed, fitness, executor"
    )
    parser.add_argument("--out", default=None, help="output folder (default: the config's name without .json)")
    parser.add_argument("--executor", choices=("inprocess", "process", "ray"), default=None,
                        help="override where members are evaluated (does not change the result)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, help="worker processes / Ray actors")
    parser.add_argument("--address", default=None,
                        help='the Ray cluster to join ("auto" on a node of it, or HEAD:6379); implies --executor ray')  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--plot-only", action="store_true", help="only redraw fitness.png from the log")


def run(args: argparse.Namespace) -> int:
    from kvpolicy.errors import InvalidConfigError
    from kvpolicy.evolve.config import EvolveConfig
    from kvpolicy.evolve.plot import plot_log
    from kvpolicy.evolve.runner import LOG, PLOT, RESULT, Evolution

    config = EvolveConfig.from_file(args.config)
    out = Path(args.out) if args.out else Path(args.config).with_suffix("")
    if args.plot_only:
        print(plot_log(out / LOG, out / PLOT))
        return 0
    executor = config.executor
    if args.executor:
        executor = attrs.evolve(executor, kind=args.executor)
    if args.workers:
        executor = attrs.evolve(executor, workers=args.workers)
    if args.address:
        if args.executor not in (None, "ray"):
            raise InvalidConfigError(f"--address joins a Ray cluster; it cannot go with --executor {args.executor}")
        executor = attrs.evolve(executor, kind="ray", address=args.address)
    config = attrs.evolve(config, executor=executor, progress=config.progress and not args.no_progress)
    result = Evolution(config, out).run()
    plot = plot_log(out / LOG, out / PLOT)
    print(
        f"best mean: held-out fitness {result.best_fitness:.4f} at generation {result.best_generation} "
        f"-> {out / RESULT}\nlast mean: held-out fitness {result.final_fitness:.4f}; "
        f"{result.generations} generations" + (f"; stopped early: {result.stop_reason}" if result.stop_reason else "")
    )
    print(f"log: {out / LOG}\nplot: {plot}")
    return 0
