"""Cost of KVzip's repeat pass next to the prefill it follows, measured side by side in one run.

SmolLM2-135M-Instruct on CPU, prompts of essays (``kvpolicy.prompts.haystack``) of each of
``--tokens``. For each length, best of ``--repeats``, on the same attached model:

- prefill: the prompt in one forward call with the ``kvzip`` policy attached and eviction
  deferred (what any policy pays);
- repeat: the repeat pass alone on that cache (`reconstruct_if_due`: repeat prompt + context,
  chunks of 2048 tokens, attention computed in plain torch to take its max);
- eviction: the eviction pass that reads the scores (25% of the prompt kept).

    nice -n 10 python benchmarks/bench_kvzip.py --tokens 2048 4096
"""

from __future__ import annotations

import argparse
import time

import torch


def measure(model, tokenizer, tokens: int, repeats: int) -> dict[str, float]:
    import kvpolicy
    from kvpolicy.integrations.hf.reconstruction import reconstruct_if_due
    from kvpolicy.prompts import haystack

    ids = tokenizer(haystack(tokenizer, tokens + 64), return_tensors="pt")["input_ids"][:, :tokens]
    policy = kvpolicy.build("kvzip", budget=0.25)
    policy.bind_tokenizer(tokenizer)
    best = {"prefill": float("inf"), "repeat": float("inf"), "eviction": float("inf")}
    with torch.inference_mode(), policy.attach(model) as handle:
        for _ in range(repeats):
            handle.reset()
            start = time.perf_counter()
            handle.feed(ids, evict=False, last_only=True)
            prefill = time.perf_counter() - start
            cache = handle.cache
            start = time.perf_counter()
            reconstruct_if_due(handle._attachment, cache)
            repeat = time.perf_counter() - start
            start = time.perf_counter()
            cache.eviction_pass(policy)
            eviction = time.perf_counter() - start
            for key, value in (("prefill", prefill), ("repeat", repeat), ("eviction", eviction)):
                best[key] = min(best[key], value)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from kvpolicy.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'tokens':>6}  {'prefill s':>9}  {'repeat s':>9}  {'repeat/prefill':>14}  {'eviction s':>10}")
    for tokens in args.tokens:
        best = measure(model, tokenizer, tokens, args.repeats)
        ratio = best["repeat"] / best["prefill"]
        print(
            f"{tokens:>6}  {best['prefill']:>9.2f}  {best['repeat']:>9.2f}  {ratio:>13.2f}×  {best['eviction']:>10.3f}"
        )


if __name__ == "__main__":
    main()
