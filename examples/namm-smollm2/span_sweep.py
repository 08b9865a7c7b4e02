"""Choose the span-pooling kernel of the evolved NAMM before evolution, on validation items only.

The starting point of the evolution (`evolve_linear.json`: a linear read-out whose only weight is
on the newest queries' log votes) is scored with each kernel on validation items — ``train``
split seeds past the evolution's pool, never trained on, never the ``test`` split — at 25% of
the cache. Every variant is forked from one shared prefill per item, so the sweep costs about one
prefill per item. Prints, per kernel, the teacher-forced answer likelihood relative to the full
cache and the task score (greedy), per task.

    python examples/namm-smollm2/span_sweep.py --items 6 --kernels 1,5,15,31
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kvpolicy
from kvpolicy.eval.harness import evaluate
from kvpolicy.eval.prompting import encode
from kvpolicy.eval.rows import ForkedRows
from kvpolicy.eval.tasks import make_item
from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.search_space import SearchSpace
from kvpolicy.integrations.hf.shared_prefill import prefill
from kvpolicy.models import load_model

HERE = Path(__file__).parent


def forked_score(policy, item, shared, model, tokenizer, metric, evict=True) -> float:
    """The score of one row forked from ``shared`` (``evict=False``: its full cache)."""
    rows = ForkedRows(lambda row: shared, evict=evict)
    return evaluate(policy, [item], model, tokenizer, metric=metric, rows=rows)[0].score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "evolve_linear.json"))
    parser.add_argument("--items", type=int, default=6, help="validation items per task")
    parser.add_argument("--kernels", default="1,5,15,31")
    parser.add_argument("--mode", default="max", choices=("max", "avg"))
    parser.add_argument("--calibration", help="policy file whose calibrated buffers to use (default: uncalibrated)")
    args = parser.parse_args()

    config = EvolveConfig.from_file(args.config)
    policy = kvpolicy.build(config.policy)
    if args.calibration:
        from kvpolicy import Policy

        policy.load_buffers(Policy.load(args.calibration).buffers(), args.calibration)
    policy.set_flat(SearchSpace(policy, config.search, config.start).start)
    model, tokenizer = load_model(config.model)
    tasks = config.stages[-1].tasks
    length = config.stages[-1].length
    kernels = [int(k) for k in args.kernels.split(",")]
    seeds = range(config.train_pool, config.train_pool + args.items)  # the evolution's validation items
    table: dict[int, dict[str, list[tuple[float, float, float]]]] = {k: {t: [] for t in tasks} for k in kernels}
    for task in tasks:
        for seed in seeds:
            item = make_item(task, "train", seed, length)
            encoded = encode(item, tokenizer)
            shared = prefill(policy, model, encoded.prompt_ids, 512)
            full = forked_score(policy, item, shared, model, tokenizer, "loglik", evict=False)
            full_task = forked_score(policy, item, shared, model, tokenizer, "task", evict=False)
            for kernel in kernels:
                policy.pooler = policy.registry.create("pooler", "span", {"kernel": kernel, "mode": args.mode})
                ll = forked_score(policy, item, shared, model, tokenizer, "loglik")
                score = forked_score(policy, item, shared, model, tokenizer, "task")
                table[kernel][task].append((float(ll / full), float(score), float(full_task)))
            print(task, seed, {k: table[k][task][-1] for k in kernels}, flush=True)
    print(f"\n| span ({args.mode}) | " + " | ".join(f"{t} loglik/full, task (full)" for t in tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for kernel in kernels:
        cells = []
        for task in tasks:
            rows = torch.tensor(table[kernel][task])
            cells.append(f"{rows[:, 0].mean():.3f}, {rows[:, 1].mean():.2f} ({rows[:, 2].mean():.2f})")
        print(f"| {kernel} | " + " | ".join(cells) + " |")
    print(json.dumps({str(k): v for k, v in table.items()}))


if __name__ == "__main__":
    main()
