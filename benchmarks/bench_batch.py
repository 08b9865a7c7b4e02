"""Items per second at batch 1 against a left-padded batch, on the real SmolLM2, same scores.

Both sides run the same items through `kvpolicy.eval.harness.evaluate` with prompts chunked from
their end (``ItemRows(align="end")``): ``--batch-size 1`` evaluates one item at a time, the other
side ``--batch`` items as one left-padded batch (`kvpolicy.eval.rows.ItemRows`). Items are drawn from
all the suite's tasks at ``--tokens``, so prompts differ in length by up to ~2x across tasks, as
real ones do; they are sorted by prompt length and taken ``--batch`` at a time, as `evaluate`
batches them. The two sides are interleaved batch by batch, each on
the same items, so a slow spell on a shared machine hits both; printed: seconds per side,
items/s and their ratio, and how many items got the same prediction and score on both sides
(the largest |Δ| of the answer log-probability too).

    OMP_NUM_THREADS=2 python benchmarks/bench_batch.py                 # 16 items, 1,024 tokens, batch 8
    python benchmarks/bench_batch.py --tokens 2048 --items 16 --policy h2o --budget 25%
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kvpolicy
from kvpolicy.eval.harness import evaluate
from kvpolicy.eval.prompting import encode
from kvpolicy.eval.rows import ItemRows
from kvpolicy.eval.tasks import TASKS, build_suite
from kvpolicy.models import load_model


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--policy", default="namm-bam-smollm2", help="preset or saved policy (default: the shipped NAMM)"
    )
    parser.add_argument("--budget", help="budget override, e.g. 25%%")
    parser.add_argument("--tokens", type=int, default=1024, help="context length of the items")
    parser.add_argument("--items", type=int, default=16, help="items in all (a multiple of --batch)")
    parser.add_argument("--batch", type=int, default=8, help="items per batch on the batched side")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    policy = kvpolicy.build(args.policy, **({} if args.budget is None else {"budget": args.budget}))
    model, tokenizer = load_model(args.model)
    tasks = list(TASKS)
    per_task = -(-args.items // len(tasks))
    items = build_suite(tasks, "test", [args.tokens], list(range(per_task)))[: args.items]
    items.sort(key=lambda item: encode(item, tokenizer).prompt_tokens)  # as `evaluate` batches them
    run = {"metric": "both", "chunk_size": args.chunk_size}
    evaluate(
        policy, items[:1], model, tokenizer, rows=ItemRows(1, "end"), **run
    )  # warm-up: first-call costs hit neither side
    seconds = {"batch 1": 0.0, f"batch {args.batch}": 0.0}
    results: dict[str, list] = {key: [] for key in seconds}
    for start in range(0, len(items), args.batch):
        group = items[start : start + args.batch]
        for key, size in (("batch 1", 1), (f"batch {args.batch}", args.batch)):
            began = time.perf_counter()
            with torch.inference_mode():
                results[key] += evaluate(policy, group, model, tokenizer, rows=ItemRows(size, "end"), **run)
            seconds[key] += time.perf_counter() - began
    one, many = results.values()
    same = sum(a.prediction == b.prediction and abs(a.score - b.score) < 1e-6 for a, b in zip(one, many, strict=True))
    logprob = max(
        (
            abs(a.answer_logprob - b.answer_logprob)
            for a, b in zip(one, many, strict=True)
            if a.answer_logprob is not None
        ),
        default=0.0,
    )
    rates = {key: len(items) / value for key, value in seconds.items()}
    lengths = [r.prompt_tokens for r in one]
    figures = {
        "policy": args.policy,
        "items": len(items),
        "prompt_tokens": [min(lengths), max(lengths)],
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "items_per_second": rates,
        "speedup": rates[f"batch {args.batch}"] / rates["batch 1"],
        "same_prediction_and_score": f"{same}/{len(items)}",
        "max_abs_logprob_difference": logprob,
        "mean_score": {key: sum(r.score for r in value) / len(value) for key, value in results.items()},
    }
    print(
        f"{args.policy}: {len(items)} items of {min(lengths)}-{max(lengths)} tokens, {torch.get_num_threads()} threads"
    )
    for key in seconds:
        print(
            f"  {key:>8}: {seconds[key]:7.1f} s  {rates[key]:.3f} items/s  mean score {figures['mean_score'][key]:.4f}"
        )
    print(f"  batched ÷ one at a time: {figures['speedup']:.2f}× items/s")
    print(f"  same prediction and score: {same}/{len(items)}; max |Δ answer log-prob| {logprob:.2e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
