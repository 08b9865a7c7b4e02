"""``kvpolicy eval``: score one policy on the offline long-context suite against the full cache."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.distributed import EXECUTORS
from kvpolicy.eval.harness import DEFAULT_CHUNK, METRIC_MODES
from kvpolicy.eval.items import SPLITS, VALIDATION_SEED
from kvpolicy.eval.plan import DEFAULT_PLAN
from kvpolicy.eval.profiles import PROFILES, get_profile, parse_tasks
from kvpolicy.eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS
from kvpolicy.eval.report import markdown_table
from kvpolicy.eval.rows import CHUNK_ALIGNMENTS

if TYPE_CHECKING:
    from kvpolicy.eval.run import RunSummary

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``eval`` and ``compare``: which suite, model and scoring."""
    parser.add_argument("--profile", default="ci", choices=sorted(PROFILES), help="suite size (default: ci)")
    parser.add_argument("--tasks", help="comma-separated subset of the profile's tasks")
    parser.add_argument("--lengths", help="comma-separated context lengths in tokens (default: the profile's)")
    parser.add_argument("--seeds", type=int, help="items per task and length (default: the profile's)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seed of the first item (default 0), counted from 1,000 with --split validation",
    )
    parser.add_argument(
        "--split",
        default="validation",
        choices=(*SPLITS, "validation"),
        help="validation (default: train material from seed 1,000 on, where choices are made), train, or test "
        "(only inside a block of the frozen plan, --plan)",
    )
    parser.add_argument(
        "--plan",
        default=str(DEFAULT_PLAN),
        help=f"the frozen evaluation plan a test run must fit (default {DEFAULT_PLAN})",
    )
    parser.add_argument("--unseal", metavar="BLOCK", help="run a sealed block of the plan (its one final comparison)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"shipped model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--metric", default="task", choices=METRIC_MODES, help="task metric, loglik, or both")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="prefill chunk; eviction in between")
    parser.add_argument(
        "--protocol",
        default=DEFAULT_PROTOCOL,
        choices=PROTOCOLS,
        help="question-aware: one prompt, eviction passes may see the question (default); context-first: the "
        "context is compressed before the question is appended (no pass sees it)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="items evaluated as one left-padded batch (default 1); a batch chunks each prompt from its end",
    )
    parser.add_argument(
        "--chunk-align",
        choices=CHUNK_ALIGNMENTS,
        help="prefill chunks from the prompt's start or end (default: end with --batch-size > 1, else start); "
        "--batch-size 1 --chunk-align end gives what a batch gives, item by item",
    )
    parser.add_argument(
        "--closed-book",
        action="store_true",
        help="blank every item's context (the question alone), to measure what the weights know without it; "
        "labels end in +closed-book and full-cache references are cached apart",
    )
    parser.add_argument("--reference-dir", help="where full-cache results are cached (default: user cache)")
    parser.add_argument(
        "--executor",
        default="in-process",
        choices=EXECUTORS,
        help="where items run: here (default), in --workers spawned processes, or on --workers Ray actors "
        "(each worker loads the model once; same results, stored as they arrive)",
    )
    parser.add_argument("--workers", type=int, help="worker processes or Ray actors (default 2)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per process (default: in-process torch's; the CPUs shared among worker processes; 1 per "
        "Ray actor)",
    )
    parser.add_argument("--address", help='the Ray cluster to join ("auto", HEAD:6379; default: a local one)')
    parser.add_argument("--out", required=True, help="output folder (rerunning resumes it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="preset, preset:{json overrides}, or a saved policy file")
    parser.add_argument("--budget", help="tokens kept per head (256), or a ratio (0.25 / 25%%)")
    add_suite_arguments(parser)


def suite_items(args: argparse.Namespace) -> list:
    """The items ``args`` select, every suite argument checked first (before any model loads)."""
    from kvpolicy.errors import UnknownComponentError
    from kvpolicy.eval.harness import check_run_arguments
    from kvpolicy.models import MODELS

    check_run_arguments(args.metric, args.chunk_size)
    if args.model not in MODELS:
        raise UnknownComponentError("shipped model", args.model, MODELS)
    profile = get_profile(args.profile)
    lengths = None
    if args.lengths:
        try:
            lengths = tuple(int(x) for x in args.lengths.split(","))
        except ValueError:
            raise InvalidConfigError(f"--lengths takes comma-separated token counts, got {args.lengths!r}") from None
    if getattr(args, "batch_size", 1) < 1:
        raise InvalidConfigError(f"--batch-size must be a positive count of items, got {args.batch_size}")
    if getattr(args, "batch_size", 1) > 1 and getattr(args, "shared_prefill", False):
        raise InvalidConfigError(
            "--shared-prefill already runs each prompt once for every policy; drop --batch-size with it"
        )
    check_executor_arguments(args)
    if args.seeds is not None and args.seeds <= 0:
        raise InvalidConfigError(f"--seeds must be a positive count, got {args.seeds}")
    first = getattr(args, "first_seed", 0) or 0
    if first < 0:
        raise InvalidConfigError(f"--first-seed must be 0 or more, got {first}")
    split = args.split
    if split == "validation":  # train material no evolution pool draws: seeds from VALIDATION_SEED on
        split, first = "train", first + VALIDATION_SEED
    seeds = tuple(range(first, first + args.seeds)) if args.seeds else None
    if first and seeds is None:
        seeds = tuple(first + s for s in profile.seeds)
    items = profile.items(split, parse_tasks(args.tasks), lengths, seeds)
    if getattr(args, "closed_book", False):
        from kvpolicy.eval.closed_book import closed_book

        items = [closed_book(item) for item in items]
    if split == "test":
        from kvpolicy.eval.plan import load_plan

        plan = load_plan(args.plan)
        block = plan.block_for(items, args.model, args.protocol, getattr(args, "unseal", None))
        budget = getattr(args, "budget", None)
        block.check_budgets(budget if isinstance(budget, list) else [budget])
        args.plan_record = {"plan": str(plan.path), "plan_sha256": plan.sha256, "block": block.name}
    return items


def reference_dir_for(args: argparse.Namespace) -> str | Path | None:
    """Closed-book references live beside the ordinary ones, never in the same file: both share
    item uids, so one cache would recompute each kind whenever the other ran."""
    if not getattr(args, "closed_book", False):
        return args.reference_dir
    from kvpolicy.eval.references import cache_dir

    return Path(args.reference_dir or cache_dir()) / "closed-book"


def check_executor_arguments(args: argparse.Namespace) -> None:
    """``--executor`` and what goes with it, checked before any model work."""
    executor = getattr(args, "executor", "in-process")
    if executor == "in-process":
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise InvalidConfigError(f"--threads must be a positive count, got {args.threads}")
        for flag in ("workers", "address"):
            if getattr(args, flag, None) is not None:
                raise InvalidConfigError(f"--{flag} sets up worker processes; give it with --executor processes or ray")
        return
    if getattr(args, "address", None) is not None and executor != "ray":
        raise InvalidConfigError(f"--address joins a Ray cluster; it cannot go with --executor {executor}")
    if getattr(args, "batch_size", 1) > 1:
        raise InvalidConfigError(
            f"--executor {executor} runs one item per job, so it cannot batch items: drop --batch-size "
            "(--chunk-align end gives what a batch gives, item by item)"
        )
    for flag in ("workers", "threads"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise InvalidConfigError(f"--{flag} must be a positive count, got {value}")


def distribute(args: argparse.Namespace, runs: list, items: list, *, shared_prefill: bool = False) -> None:
    """With ``--executor processes|ray``: fill the stores of ``runs`` (``(PolicyRun, policy, out)``)
    on a worker pool; the in-process run that follows then finds every result done. In-process,
    only ``--threads`` applies (this process's torch threads: results are bit-identical across
    executors at the same thread count, since float sums split across threads differently)."""
    if args.executor == "in-process":
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        return
    from kvpolicy.eval.distributed import evaluate_distributed, make_pool

    pool = make_pool(args.executor, args.model, workers=args.workers or 2, threads=args.threads, address=args.address)
    try:
        evaluate_distributed(
            runs,
            items,
            pool,
            model_name=args.model,
            metric=args.metric,
            chunk_size=args.chunk_size,
            chunk_align=args.chunk_align or "start",
            shared_prefill=shared_prefill,
            reference_dir=reference_dir_for(args),
            progress=not args.no_progress,
            protocol=args.protocol,
        )
    finally:
        pool.close()


def run_from_args(
    args: argparse.Namespace, policy: Any, items: list, model: Any, tokenizer: Any, *, out: str | Path, label: str
) -> RunSummary:
    """`run_suite` with the suite options of ``args`` (the part ``eval`` and ``compare`` share)."""
    from kvpolicy.eval.closed_book import closed_book_label
    from kvpolicy.eval.run import run_suite

    closed = bool(getattr(args, "closed_book", False))
    return run_suite(
        policy,
        items,
        model,
        tokenizer,
        out=out,
        label=closed_book_label(label) if closed else label,
        model_name=args.model,
        metric=args.metric,
        chunk_size=args.chunk_size,
        reference_dir=reference_dir_for(args),
        progress=not args.no_progress,
        batch_size=args.batch_size,
        chunk_align=args.chunk_align,
        protocol=args.protocol,
        settings={
            "profile": args.profile,
            "split": args.split,
            "tasks": args.tasks,
            "lengths": args.lengths,
            "prefill": "shared" if getattr(args, "shared_prefill", False) else "chunked",
            **getattr(args, "plan_record", {}),
            "closed_book": closed,
        },
    )


def run(args: argparse.Namespace) -> int:
    import kvpolicy
    from kvpolicy.eval.distributed import PolicyRun
    from kvpolicy.eval.labels import label_for_spec
    from kvpolicy.models import load_model

    policy = kvpolicy.build(args.policy, **({} if args.budget is None else {"budget": args.budget}))
    items = suite_items(args)
    label = label_for_spec(args.policy, args.budget)
    distribute(args, [(PolicyRun(label, args.policy, args.budget), policy, args.out)], items)
    model, tokenizer = load_model(args.model)
    summary = run_from_args(args, policy, items, model, tokenizer, out=args.out, label=label)
    print(
        markdown_table(
            summary.rows, title=f"{summary.label} — {args.profile} profile, {args.split} split, {args.model}"
        )
    )
    print(f"wrote {args.out}/results.jsonl, results.csv, summary.json, summary.md")
    return 0
