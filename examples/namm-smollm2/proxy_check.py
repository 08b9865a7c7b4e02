"""Does the cheap fitness rank members as the real task scores do? (validation items only)

Evolution scores members by the teacher-forced likelihood of the gold answer relative to the full
cache (``"metric": "loglik"``): smooth and cheap, but a proxy. Here members are drawn around a
policy's parameters at several step sizes (so they differ in quality), every one of them is
scored on the same validation items both ways — the proxy, and greedy decoding with each task's
own metric — and the Spearman rank correlation between the two fitnesses is printed. Members are
forked from one shared prefill per item, so the check costs about one prefill per item.

    python examples/namm-smollm2/proxy_check.py --policy runs/namm-linear/result.safetensors \\
        --config examples/namm-smollm2/evolve_linear.json --items 4 --members 18
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from kvpolicy import Policy
from kvpolicy.eval.harness import evaluate
from kvpolicy.eval.prompting import encode
from kvpolicy.eval.rows import ForkedRows
from kvpolicy.eval.tasks import make_item
from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.search_space import SearchSpace
from kvpolicy.integrations.hf.shared_prefill import prefill
from kvpolicy.models import load_model


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (ties get their mean rank)."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # mean rank for ties
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def forked(
    policy, item, shared, model, tokenizer, metric, population=None, evict=True
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and kept fractions of one row (or one per member of ``population``) forked from ``shared``."""
    rows = ForkedRows(lambda row: shared, population=population, evict=evict)
    results = evaluate(policy, [item], model, tokenizer, metric=metric, rows=rows)
    return np.array([r.score for r in results]), np.array([r.kept_fraction for r in results])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="policy file whose parameters the members are drawn around")
    parser.add_argument("--config", required=True, help="the evolution config (its search space, tasks, pool)")
    parser.add_argument("--items", type=int, default=4, help="validation items per task")
    parser.add_argument("--members", type=int, default=18)
    parser.add_argument("--sigmas", default="0.25,0.5,1.0", help="step sizes the members are drawn with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the per-member figures here (JSON)")
    args = parser.parse_args()

    config = EvolveConfig.from_file(args.config)
    policy = Policy.load(args.policy)
    space = SearchSpace(policy, config.search, {})
    centre = policy.get_flat()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    rng = torch.Generator().manual_seed(args.seed)
    steps = torch.tensor([sigmas[i % len(sigmas)] for i in range(args.members)]).unsqueeze(1)
    offsets = torch.randn(args.members, space.dim, generator=rng) * steps
    population = centre.expand(args.members, -1).clone()
    population[:, space.index] += offsets
    model, tokenizer = load_model(config.model)
    tasks, length = config.stages[-1].tasks, config.stages[-1].length
    seeds = range(config.train_pool + config.eval_items, config.train_pool + config.eval_items + args.items)
    proxy = {t: np.zeros((args.members, 0)) for t in tasks}
    real = {t: np.zeros((args.members, 0)) for t in tasks}
    full_proxy = {t: [] for t in tasks}
    full_real = {t: [] for t in tasks}
    kept = []
    for task in tasks:
        for seed in seeds:
            item = make_item(task, "train", seed, length)
            encoded = encode(item, tokenizer)
            shared = prefill(policy, model, encoded.prompt_ids, 512)
            full_proxy[task].append(float(forked(policy, item, shared, model, tokenizer, "loglik", evict=False)[0][0]))
            full_real[task].append(float(forked(policy, item, shared, model, tokenizer, "task", evict=False)[0][0]))
            ll, member_kept = forked(policy, item, shared, model, tokenizer, "loglik", population)
            score, _ = forked(policy, item, shared, model, tokenizer, "task", population)
            proxy[task] = np.concatenate([proxy[task], ll[:, None]], 1)
            real[task] = np.concatenate([real[task], score[:, None]], 1)
            kept.append(member_kept)
            print(task, seed, f"full {full_real[task][-1]:.2f}", np.round(score, 2).tolist(), flush=True)

    def fitness(scores: dict, full: dict) -> np.ndarray:  # the evolution's definition, per member
        return np.mean([scores[t].sum(1) / max(sum(full[t]), 1e-9) for t in tasks], axis=0)

    f_proxy, f_real = fitness(proxy, full_proxy), fitness(real, full_real)
    rho = spearman(f_proxy, f_real)
    print(f"\n{args.members} members × {args.items} validation items per task ({', '.join(tasks)}), {length} tokens")
    print(f"Spearman rho(loglik fitness, task fitness) = {rho:.3f}")
    print(
        f"proxy fitness {f_proxy.min():.3f}..{f_proxy.max():.3f}; task fitness {f_real.min():.3f}..{f_real.max():.3f}"
    )
    if args.out:
        record = {
            "rho": rho,
            "proxy": f_proxy.tolist(),
            "task": f_real.tolist(),
            "sigmas": steps.squeeze(1).tolist(),
            "kept": np.mean(kept, 0).tolist(),
        }
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()
