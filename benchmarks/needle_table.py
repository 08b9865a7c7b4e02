"""Needle in a haystack (~2,000 tokens of essays) with every reference policy at several budgets.

Prints a markdown table: per policy and budget, the needles found out of the depths tried and
the mean share of the KV cache kept. The full cache is run on the same items first, as the
reference. Results are stored item by item (atomically) in ``--store`` so an interrupted run
resumes where it stopped; ``--fresh`` ignores what is stored.

    python benchmarks/needle_table.py                      # 5 depths × 6 policies × 3 budgets
    python benchmarks/needle_table.py --depths 2 --budgets 256 --presets h2o,l2   # quick look

The prompt is prefilled in chunks of ``--chunk`` tokens with eviction between chunks (as the
evaluation harness does); FastGen is run capped at each budget and once uncapped (its own size).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import kvpolicy
from kvpolicy.atomic import atomic_write_text
from kvpolicy.eval.harness import run_item
from kvpolicy.eval.needle import make_item
from kvpolicy.models import load_model

PRESETS = ("h2o", "l2", "snapkv", "tova", "fastgen", "streaming_llm")
UNCAPPED = "own size"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2000, help="haystack length in tokens (default 2000)")
    parser.add_argument("--depths", type=int, default=5, help="needle depths (items) per cell, 1-5 (default 5)")
    parser.add_argument("--budgets", default="128,256,512", help="comma-separated token budgets")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk size (eviction between chunks)")
    parser.add_argument("--store", default="benchmarks/results/needle_table.json", help="resumable result store")
    parser.add_argument("--fresh", action="store_true", help="ignore stored results")
    parser.add_argument("--report", action="store_true", help="print the table from the store, run nothing")
    return parser.parse_args()


def _policies(presets: list[str], budgets: list[int], tokenizer) -> list[tuple[str, str, kvpolicy.Policy]]:
    """``(preset, budget label, policy)`` for every cell of the table."""
    from kvpolicy_plugins.fastgen import token_classes

    classes = token_classes(tokenizer) if "fastgen" in presets else None
    cells = []
    for preset in presets:
        extra = {"extractor": classes} if preset == "fastgen" else {}
        for budget in budgets:
            cells.append((preset, str(budget), kvpolicy.build(preset, budget=budget, **extra)))
        if preset == "fastgen":
            cells.append((preset, UNCAPPED, kvpolicy.build(preset, **extra)))
    return cells


def main() -> None:
    args = _parse()
    if not 1 <= args.depths <= 5:
        raise SystemExit("--depths must be between 1 and 5 (the needle task has five depths)")
    budgets = [int(b) for b in args.budgets.split(",") if b]
    presets = [p for p in args.presets.split(",") if p]
    store_path = Path(args.store)
    store = {} if args.fresh or not store_path.is_file() else json.loads(store_path.read_text())

    model, tokenizer = load_model("smollm2-135m-instruct")  # the tokenizer gives FastGen its token classes
    items = [make_item("test", seed, args.length) for seed in range(args.depths)]
    cells = [("full", "-", kvpolicy.build("full"))] + _policies(presets, budgets, tokenizer)
    started = time.perf_counter()
    # depth-major order: after each depth the table is complete for the depths done so far
    for item in [] if args.report else items:
        for preset, budget, policy in cells:
            key = f"{preset}|{budget}|{args.length}|{args.chunk}|{item.uid}"
            if key in store:
                continue
            result = run_item(policy, item, model, tokenizer, chunk_size=args.chunk)
            store[key] = {
                "preset": preset,
                "budget": budget,
                "depth": item.depth,
                "score": result.score,
                "kept_fraction": result.kept_fraction,
                "prompt_tokens": result.prompt_tokens,
                "prediction": result.prediction,
                "seconds": result.seconds,
            }
            atomic_write_text(store_path, json.dumps(store, indent=1, sort_keys=True))
            print(
                f"{preset:>14} {budget:>8} depth {item.depth:.1f}: score {result.score:.0f} "
                f"kept {result.kept_fraction:.1%} ({result.seconds:.1f}s) {result.prediction!r}",
                flush=True,
            )
    done = [i for i in items if all(f"{p}|{b}|{args.length}|{args.chunk}|{i.uid}" in store for p, b, _ in cells)]
    if not done:
        raise SystemExit(f"no depth has every cell in {store_path} yet; run without --report")
    items = done

    def cell(preset: str, budget: str) -> str:
        rows = [store[f"{preset}|{budget}|{args.length}|{args.chunk}|{item.uid}"] for item in items]
        found = sum(r["score"] >= 0.5 for r in rows)
        kept = sum(r["kept_fraction"] for r in rows) / len(rows)
        return f"{found}/{len(rows)} ({kept:.0%})"

    tokens = store[f"full|-|{args.length}|{args.chunk}|{items[0].uid}"]["prompt_tokens"]
    depths = ", ".join(f"{item.depth:.1f}" for item in items)
    print(
        f"\nNeedle in a haystack, SmolLM2-135M-Instruct, {tokens}-token prompts, depths {depths}, "
        f"prefill chunks of {args.chunk}; cell = needles found (mean KV cache kept)\n"
    )
    columns = [str(b) for b in budgets]
    print("| policy | " + " | ".join(f"budget {b}" for b in columns) + " |")
    print("|---|" + "---|" * len(columns))
    print("| full cache | " + " | ".join(cell("full", "-") for _ in columns) + " |")
    for preset in presets:
        row = " | ".join(cell(preset, b) for b in columns)
        print(f"| {preset} | {row} |")
    if "fastgen" in presets:
        print(f"\nFastGen at its own size (no cap): {cell('fastgen', UNCAPPED)}")
    print(f"\n(run time this invocation: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
