"""A decoding step before and after the cheaper eviction pass and the in-place store, side by side.

One process, one prompt (essays, ``--tokens``, 512-token chunks); the full cache and TOVA at
``--budget`` in three states:

- ``before``: the pieces the pass replaced swapped back in (`gather` along the token dimension
  instead of `index_select` on whole token rows; ranking + sorting every kept token instead of
  finding the few dropped ones), and no store (below);
- ``copying``: today's pass, but every append and pass copies the layer into new tensors, as
  transformers' ``torch.cat`` does (the layer's store never writable);
- ``now``: keys and values written in place in the layer's store (`kvpolicy.integrations.hf.layer`).

The full cache runs ``copying`` and ``now``. Prints decode ms/token (median over ``--decode``
greedy steps) per variant and round, the ratios to the full cache in the same state, and
whether every state of a policy generated the same tokens (they must: they keep the same ones).

    nice -n 10 python benchmarks/bench_decode_step.py --tokens 8192 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import kvpolicy_plugins.selectors as selectors
from kvpolicy.integrations.hf import layer, layer_view
from kvpolicy.models import load_model
from kvpolicy.selection import sorted_selection

sys.path.insert(0, str(Path(__file__).parent))
from bench_long_context import build_variant, prompt_ids  # noqa: E402

AFTER = (layer.gather_tokens, selectors._top_k)
WRITABLE = layer.EvictingLayer._writable_store
STATES = {"full": ("copying", "now"), "tova": ("before", "copying", "now")}


def _gather_before(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return tensor.gather(2, layer.expand_index(indices, tensor))


def _top_k_before(keyed: torch.Tensor, k: int):
    return sorted_selection(keyed.topk(min(k, keyed.shape[-1]), dim=-1).indices)


def _never_writable(self, *args):  # every append and pass copies into new tensors
    return None


def _use(state: str) -> None:
    gather, top_k = (_gather_before, _top_k_before) if state == "before" else AFTER
    layer.gather_tokens = layer_view.gather_tokens = gather
    selectors._top_k = top_k
    layer.EvictingLayer._writable_store = WRITABLE if state == "now" else _never_writable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m-instruct")
    ids = prompt_ids(tokenizer, args.tokens)
    decode: dict[str, list[float]] = {}
    generated: dict[str, list[int]] = {}
    for round_index in range(args.rounds):
        for name, states in STATES.items():
            for state in states:
                label = f"{name} {state}"
                _use(state)
                policy = build_variant(name, args.budget, 512)
                with torch.inference_mode(), policy.attach(model) as handle:
                    logits = handle.feed(ids, chunk_size=512, last_only=True)
                    steps, tokens = [], []
                    for _ in range(args.decode):
                        token = logits[:, -1].argmax(-1, keepdim=True)
                        tokens.append(int(token))
                        start = time.perf_counter()
                        logits = handle.feed(token, last_only=True)
                        steps.append(time.perf_counter() - start)
                decode.setdefault(label, []).append(statistics.median(steps) * 1000)
                generated[label] = tokens
                print(f"round {round_index + 1} {label}: decode {decode[label][-1]:.1f} ms/token", flush=True)
    _use("now")
    for label, values in decode.items():
        state = label.split()[1]
        full = statistics.median(decode["full " + ("now" if state == "now" else "copying")])
        print(f"{label}: {statistics.median(values):.1f} ms/token, {full / statistics.median(values):.2f}x the speed "
              f"of the full cache {'now' if state == 'now' else 'copying'}")  # fmt: skip
    for name, states in STATES.items():
        same = all(generated[f"{name} {state}"] == generated[f"{name} {states[0]}"] for state in states)
        print(f"{name}: every state generated the same tokens: {same}")


if __name__ == "__main__":
    main()
