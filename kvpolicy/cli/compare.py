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
from kvpolicy.cli.eval import add_suite_arguments, distribute, reference_dir_for, run_from_args, suite_items
from kvpolicy.errors import InvalidBudgetError, InvalidConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", action="append", help="repeat for each policy (preset, preset:{json}, or file)")
    parser.add_argument(
        "--all-presets",
        action="store_true",
        help="every registered preset (span variants and installed plugins' included) besides any --policy",
    )
    parser.add_argument("--budget", nargs="+", default=[None], help="budgets to try for each budgeted policy")
    parser.add_argument(
        "--shared-prefill",
        action="store_true",
        help="run each prompt once for every policy and budget; each policy's first eviction pass then comes after "
        "the whole prompt (see kvpolicy.eval.many_policies)",
    )
    parser.add_argument(
        "--paired-against",
        metavar="LABEL",
        help="also tabulate each run's chance-corrected skill kept and its paired bootstrap 95%% interval "
        "against this run (a label such as namm-bam-smollm2@25%%)",
    )
    parser.add_argument(
        "--report",
        default="compare",
        metavar="NAME",
        help="write the tables and figure as NAME.md, NAME.png and NAME.json (default: compare), so one --out "
        "folder can hold several reports over its records (e.g. a headline at two budgets and curves at four)",
    )
    add_suite_arguments(parser)


def paired_table(labels: list[str], kept: dict[str, float], results: dict, references: dict, against: str) -> str:
    """Markdown: each run's chance-corrected skill kept (% of the full cache's skill above chance)
    and ``against − run`` with its paired bootstrap 95% interval, in points."""
    from kvpolicy.eval.paired import paired_difference

    if against not in results:
        raise InvalidConfigError(f"--paired-against {against!r} is not one of the runs: {', '.join(labels)}")
    lines = [
        f"| policy | cache kept (measured) | skill kept (chance-corrected) | {against} − policy [95% CI] | items |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in labels:
        diff = paired_difference(results[against], results[label], references)
        interval = (
            "–" if label == against else f"{diff.delta * 100:+.1f} [{diff.low * 100:+.1f}, {diff.high * 100:+.1f}]"
        )
        lines.append(f"| {label} | {kept[label]:.1%} | {diff.b * 100:.1f} | {interval} | {diff.n} |")
    return "\n".join(lines) + "\n"


def check_report_name(name: str) -> str:
    """A report name is a plain file stem: it may not climb out of ``--out`` or name a folder."""
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith("."):
        raise InvalidConfigError(f"--report takes a plain file name (letters, digits, - _ .), got {name!r}")
    return name


def policy_specs(args: argparse.Namespace) -> list[str]:
    """The ``--policy`` specs, then every registered preset not among them with ``--all-presets``."""
    import kvpolicy

    specs = list(args.policy or [])
    if args.all_presets:
        specs += [name for name in kvpolicy.default_registry().preset_names() if name not in specs]
    if not specs:
        raise InvalidConfigError("compare needs --policy (repeat it for each policy) or --all-presets")
    return specs


def _grid(specs: list[str], budgets: list[str | None]) -> list[tuple[str, str | None, object]]:
    """``(spec, budget, policy)`` for every combination that makes sense."""
    import kvpolicy

    grid = []
    for spec in specs:
        for budget in budgets:
            try:
                grid.append((spec, budget, kvpolicy.build(spec, **({} if budget is None else {"budget": budget}))))
            except InvalidBudgetError:
                if budget is None:
                    raise
                policy = kvpolicy.build(spec)  # decides its own size: one run, no budget
                if policy.needs_budget:
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
    from kvpolicy.eval.distributed import PolicyRun
    from kvpolicy.eval.labels import label_for_spec
    from kvpolicy.eval.plot import comparison_figure
    from kvpolicy.models import load_model

    report = check_report_name(args.report)
    grid = _grid(policy_specs(args), args.budget)
    items = suite_items(args)
    labels = [label_for_spec(spec, budget) for spec, budget, _ in grid]
    if args.paired_against and args.paired_against not in labels:  # before any run, not after all of them
        raise InvalidConfigError(
            f"--paired-against {args.paired_against!r} is not one of the runs: {', '.join(labels)}"
        )
    out = Path(args.out)
    runs = [
        (PolicyRun(label, spec, budget), policy, out / "runs" / label)
        for label, (spec, budget, policy) in zip(labels, grid, strict=True)
    ]
    distribute(args, runs, items, shared_prefill=args.shared_prefill)
    model, tokenizer = load_model(args.model)
    if args.shared_prefill and args.executor == "in-process":
        from kvpolicy.eval.many_policies import evaluate_many

        evaluate_many(
            [(label, policy, out / "runs" / label) for label, (_, _, policy) in zip(labels, grid, strict=True)],
            items,
            model,
            tokenizer,
            model_name=args.model,
            metric=args.metric,
            chunk_size=args.chunk_size,
            reference_dir=reference_dir_for(args),
            progress=not args.no_progress,
            protocol=args.protocol,
        )
    summaries = []
    for label, (_, _, policy) in zip(labels, grid, strict=True):
        summaries.append(run_from_args(args, policy, items, model, tokenizer, out=out / "runs" / label, label=label))
    tasks = list(dict.fromkeys(item.task for item in items))
    table = comparison_table(summaries, tasks)
    if args.paired_against:
        from kvpolicy.eval.references import reference_path
        from kvpolicy.eval.results import ResultStore

        uids = {item.uid for item in items}
        results = {
            label: [r for r in ResultStore(out / "runs" / label / "results.jsonl", args.protocol) if r.uid in uids]
            for label in labels
        }
        path = reference_path(args.model, args.metric, args.chunk_size, reference_dir_for(args), args.protocol)
        references = {r.uid: r for r in ResultStore(path, args.protocol) if r.uid in uids}
        kept = {s.label: s.overall.kept_fraction for s in summaries}
        table += (
            "\nSkill kept: per task (score − chance) ÷ (full − chance), mean over tasks; paired bootstrap over "
            "items (2,000 resamples, stratified by task; items of one context resampled together):\n\n"
            + paired_table(labels, kept, results, references, args.paired_against)
        )
    by_length = length_comparison_table(summaries)
    if by_length:
        table += "\nMean normalised score (%) by context length, with the cache kept in brackets:\n\n" + by_length
    context_first = args.protocol == "context-first"
    if args.shared_prefill and context_first:
        prefill = (
            "one shared prefill of each context, forked for every policy whose first eviction pass comes at the "
            "context's end; policies evicting as the context streams in prefill it themselves"
        )
    elif args.shared_prefill:
        prefill = "one shared prefill per item, every policy's first eviction pass after the whole prompt"
    else:
        prefill = f"prompt in chunks of {args.chunk_size} with eviction between them"
    protocol = (
        f"{args.protocol}: "
        + ("the context compressed before the question is appended, " if context_first else "")
        + prefill
    )
    header = (
        f"Scores in % of the full cache on the same items ({args.profile} profile, {args.split} split"
        + (f" from seed {args.first_seed}" if args.first_seed else "")
        + f", {len(items)} items, {args.model}; {protocol}); mean ± standard error; Δ = paired difference to the "
        "full cache in points.\n\n"
    )
    atomic_write_text(out / f"{report}.md", header + table)
    runs = [
        (
            label_for_spec(spec),  # one curve per policy spec across budgets (a span variant is its own curve)
            s.label,
            s.overall.kept_fraction,
            s.overall.normalised or 0.0,
            s.overall.normalised_se or 0.0,
            s.per_layer,
        )
        for (spec, _, _), s in zip(grid, summaries, strict=True)
    ]
    comparison_figure(runs, out / f"{report}.png")
    atomic_write_text(out / f"{report}.json", json.dumps([s.to_dict() for s in summaries], indent=2))
    print(header + table)
    print(f"wrote {out}/{report}.md, {report}.png, {report}.json and one folder per run in {out}/runs")
    return 0
