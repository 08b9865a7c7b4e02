"""A padded batch's decoding step, attention through sdpa with a mask (before) and through
kvpolicy's own kernel (now), side by side in one process.

A layer holding padded slots (a left-padded batch; heads that keep different tokens) cannot use
the model's own attention with transformers' mask. It used to build a boolean mask, repeat every
key and value over its GQA group and call sdpa (`attention.masked_attention`); it now runs
`attention.valid_attention` (`in_pass.attend`: one matrix per KV head, padded slots skipped, no
mask tensor; the native kernel for float32 on the CPU). Both states prefill and decode the same
left-padded batch of essay prompts (row *i* 37·*i* tokens shorter); printed: decode ms/step
(median over ``--decode`` greedy steps) per state and round, the speed-up, and whether both states
generated the same tokens.

    nice -n 10 python benchmarks/bench_padded_decode.py --tokens 8192 --rows 2 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import kvpolicy
from kvpolicy.integrations.hf import attention
from kvpolicy.models import load_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_long_context import padded_batch  # noqa: E402

NOW = attention.valid_attention


def _before(query, key, value, valid, scaling, softcap):
    return attention.masked_attention(torch.nn.Module(), query, key, value, valid, scaling, softcap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--policy", default="full", help="a preset (default: the full cache)")
    parser.add_argument("--budget", default="25%", help="its budget (ignored for the full cache)")
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m-instruct")
    ids, mask = padded_batch(tokenizer, args.rows, args.tokens)
    build = (lambda: kvpolicy.build("full")) if args.policy == "full" else (
        lambda: kvpolicy.build(args.policy, budget=args.budget))  # fmt: skip
    steps: dict[str, list[float]] = {}
    generated: dict[str, list[list[int]]] = {}
    for round_index in range(args.rounds):
        for state, function in (("before", _before), ("now", NOW)):
            attention.valid_attention = function
            with torch.inference_mode(), build().attach(model) as handle:
                logits = handle.feed(ids, chunk_size=512, attention_mask=mask, last_only=True, align_end=True)
                times, tokens = [], []
                for _ in range(args.decode):
                    token = logits[:, -1].argmax(-1, keepdim=True)
                    tokens.append(token[:, 0].tolist())
                    start = time.perf_counter()
                    logits = handle.feed(token, last_only=True)
                    times.append(time.perf_counter() - start)
            steps.setdefault(state, []).append(statistics.median(times) * 1000)
            generated[state] = tokens
            print(f"round {round_index + 1} {state}: decode {steps[state][-1]:.1f} ms/step", flush=True)
    attention.valid_attention = NOW
    before, now = statistics.median(steps["before"]), statistics.median(steps["now"])
    print(f"\n{args.policy}, {args.rows} rows × {args.tokens:,} tokens (left-padded), {args.threads} threads")
    print(f"before {before:.1f} ms/step, now {now:.1f} ms/step: {before / now:.2f}x")
    print(f"same tokens generated: {generated['before'] == generated['now']}")


if __name__ == "__main__":
    main()
