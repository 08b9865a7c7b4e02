"""What the speed costs: each row of the long-context tables next to its score on the evaluation's items.

Reads the long-context benchmark's records (``--speed``, JSONL of `bench_long_context.py`; one
table per model and length in them) and the per-policy summaries of ``kvpolicy compare`` runs
(``--scores``: folders holding ``runs/<label>/summary.json``), and prints one table per model:
each (variant, budget) of the speed records, the score of the same policy with the same
schedule on the scored items (normalised to the full cache on the same items, and the paired
difference to it in points, both ± standard error; the cache it measured), and its speed-up and
peak ratio at every length measured. A benchmark variant ``name/chunk`` is scored as the run
labelled ``name-chunk@budget`` (a preset with its schedule changed, `docs/eval-plan.md`, T5);
the shipped form ``name`` as ``name@budget``. A variant with no scored run shows "–".

    python benchmarks/score_next_to_speed.py --model smollm2-135m-instruct \\
        --speed docs/long-context/smollm2-4k-store.jsonl --speed docs/long-context/smollm2-8k-store.jsonl \\
        --scores docs/results/A/T1-multikey-shared-smollm2-4096 --scores docs/results/A/T5-schedule-variants-smollm2-4096
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_long_context import load_results, summarize  # noqa: E402


def score_label(variant: str, budget: str) -> str:
    """The compare label of a benchmark variant: ``snapkv/chunk`` at 25% → ``snapkv-chunk@25%``."""
    return "full" if variant == "full" else f"{variant.replace('/', '-')}@{budget}"


def read_scores(folders: list[Path], model: str) -> dict[str, dict]:
    """Label → the overall row of its summary (task ``all``), for runs of ``model``; a label
    scored in two folders is an error (which one would the table show?)."""
    scores: dict[str, dict] = {}
    for folder in folders:
        for path in sorted((folder / "runs").glob("*/summary.json")):
            summary = json.loads(path.read_text())
            if summary["model"] != model:
                continue
            overall = next(row for row in summary["by_length"] if row["task"] == "all")
            label = summary["label"]
            if label in scores and label != "full":
                raise SystemExit(f"{label} is scored in two folders; give one of them")
            if label not in scores:
                scores[label] = {**overall, "folder": str(folder), "protocol": summary["protocol"]}
    return scores


def table(speed: list[dict], scores: dict[str, dict], model: str) -> tuple[str, list[dict]]:
    """The table, and the scores it shows."""
    sizes = sorted({(r["tokens"], r["decode"]) for r in speed if r["model"] == model})
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    for tokens, decode in sizes:
        for row in summarize(speed, model, tokens, decode):
            rows.setdefault((row["variant"], row["budget"]), {})[tokens] = row
    lengths = [tokens for tokens, _ in sizes]
    head = "| variant | budget | items | cache kept | score % of full | Δ vs full (points) | " + " | ".join(
        f"{t // 1024}k prefill × | {t // 1024}k decode × | {t // 1024}k peak ×" for t in lengths
    )
    lines = [head + " |", "|---|---|---:|---:|---:|---:|" + "---:|" * 3 * len(lengths)]
    shown = []
    for (variant, budget), by_length in rows.items():
        score = scores.get(score_label(variant, budget))
        shown += [] if score is None else [score]
        if score is None:
            cells = ["–"] * 4
        else:
            cells = [
                str(score["n"]),
                f"{score['kept_fraction']:.1%}",
                f"{score['normalised'] * 100:.1f} ± {score['normalised_se'] * 100:.1f}",
                f"{score['delta'] * 100:+.1f} ± {score['delta_se'] * 100:.1f}",
            ]
        for tokens in lengths:
            row = by_length.get(tokens)
            for field in ("prefill_speedup", "decode_speedup", "peak_ratio"):
                value = None if row is None else row[field]
                cells.append("–" if value is None else f"{value:.2f}")
        lines.append(f"| {variant} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines), shown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--speed", action="append", required=True, help="bench_long_context.py records (JSONL)")
    parser.add_argument("--scores", action="append", required=True, help="a kvpolicy compare --out folder")
    args = parser.parse_args(argv)
    speed = [record for path in args.speed for record in load_results(Path(path))]
    scores = read_scores([Path(folder) for folder in args.scores], args.model)
    text, shown = table(speed, scores, args.model)
    protocols = ", ".join(sorted({score["protocol"] for score in shown}))
    items = "/".join(map(str, sorted({score["n"] for score in shown})))
    print(f"{args.model}: scores from {', '.join(args.scores)} ({protocols}; {items} items per policy); "
          "speed ratios full ÷ variant, peak variant ÷ full (medians over rounds)\n")  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
