"""``kvpolicy compare``: several policies × budgets on one suite, compared at MEASURED cache size.

Each (policy, budget) is an ordinary resumable eval run in ``OUT/runs/LABEL``; the comparison
is ``OUT/compare.md`` (a markdown table) and ``OUT/compare.png`` (score vs measured cache
fraction, and per-layer retention). Policies that choose their cache size themselves (``full``,
threshold selectors) run once, without a budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvpolicy.atomic import atomic_write_text
from kvpolicy.cli.eval import add_suite_arguments, run_from_args, suite_items
from kvpolicy.errors import InvalidBudgetError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", action="append", required=True, help="repeat for each policy (preset, preset:{json}, or file)"
    )
    parser.add_argument("--budget", nargs="+", default=[None], help="budgets to try for each budgeted policy")
    add_suite_arguments(parser)


def _grid(specs: list[str], budgets: list[str | None]) -> list[tuple[str, str | None, object]]:
    """``(spec, budget, policy)`` for every combination that makes sense."""
    from kvpolicy.eval.policy_spec import parse_policy

    grid = []
    for spec in specs:
        for budget in budgets:
            try:
                grid.append((spec, budget, parse_policy(spec, budget)))
            except InvalidBudgetError:
                if budget is None:
                    raise
                policy = parse_policy(spec)  # decides its own size: one run, no budget
                if getattr(policy.selector, "needs_budget", True) and policy.schedule.kind != "never":
                    raise
                if not any(g[0] == spec for g in grid):
                    grid.append((spec, None, policy))
    return grid


def comparison_table(summaries: list, tasks: list[str]) -> str:
    """Markdown: one row per run, measured cache kept, normalised score per task and overall."""
    head = "| policy | cache kept (measured) | " + " | ".join(tasks) + " | mean (normalised) | Δ vs full |"
    lines = [head, "|---|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    for summary in summaries:
        rows = {r.task: r for r in summary.rows}
        cells = []
        for task in tasks:
            row = rows.get(task)
            cells.append("–" if row is None or row.normalised is None else f"{row.normalised * 100:.0f}")
        overall = summary.overall
        norm = (
            "–" if overall.normalised is None else f"{overall.normalised * 100:.1f} ± {overall.normalised_se * 100:.1f}"
        )
        delta = "–" if overall.delta is None else f"{overall.delta * 100:+.1f} ± {overall.delta_se * 100:.1f}"
        lines.append(
            f"| {summary.label} | {overall.kept_fraction:.1%} | " + " | ".join(cells) + f" | {norm} | {delta} |"
        )
    return "\n".join(lines) + "\n"


def length_comparison_table(summaries: list) -> str:
    """Markdown: one row per run, its normalised mean over tasks and its measured cache kept at
    each context length (a fixed budget keeps a smaller share of a longer prompt); empty when
    the suite has a single length."""
    lengths = sorted({length for s in summaries for length, _ in s.by_length})
    if len(lengths) < 2:
        return ""
    lines = [
        "| policy | " + " | ".join(f"{length:,} tokens" for length in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for summary in summaries:
        rows = dict(summary.by_length)
        cells = []
        for length in lengths:
            row = rows.get(length)
            ok = row is not None and row.normalised is not None
            text = (
                f"{row.normalised * 100:.1f} ± {row.normalised_se * 100:.1f} ({row.kept_fraction:.0%})" if ok else "–"
            )
            cells.append(text)
        lines.append(f"| {summary.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from kvpolicy.eval.plot import comparison_figure
    from kvpolicy.eval.policy_spec import policy_label
    from kvpolicy.models import load_model

    grid = _grid(args.policy, args.budget)
    items = suite_items(args)
    model, tokenizer = load_model(args.model)
    out = Path(args.out)
    summaries = []
    for spec, budget, policy in grid:
        label = policy_label(spec, budget)
        summaries.append(run_from_args(args, policy, items, model, tokenizer, out=out / "runs" / label, label=label))
    tasks = list(dict.fromkeys(item.task for item in items))
    table = comparison_table(summaries, tasks)
    by_length = length_comparison_table(summaries)
    if by_length:
        table += "\nMean normalised score (%) by context length, with the cache kept in brackets:\n\n" + by_length
    header = (
        f"Scores in % of the full cache on the same items ({args.profile} profile, {args.split} split, "
        f"{len(items)} items, {args.model}); mean ± standard error; Δ = paired difference to the full cache "
        "in points.\n\n"
    )
    atomic_write_text(out / "compare.md", header + table)
    runs = [
        (
            spec.partition(":")[0],
            s.label,
            s.overall.kept_fraction,
            s.overall.normalised or 0.0,
            s.overall.normalised_se or 0.0,
            s.per_layer,
        )
        for (spec, _, _), s in zip(grid, summaries, strict=True)
    ]
    comparison_figure(runs, out / "compare.png")
    atomic_write_text(out / "compare.json", json.dumps([s.to_dict() for s in summaries], indent=2))
    print(header + table)
    print(f"wrote {out}/compare.md, compare.png, compare.json and one folder per run in {out}/runs")
    return 0
