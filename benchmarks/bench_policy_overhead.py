"""Cost of each policy per forward call, as a ratio of a keep-all forward, on SmolLM2.

Side by side in one run, on the same ``--tokens``-token essay prompt fed in ``--chunk``-token
prefill chunks (default 512), every variant once per round, rounds interleaved (``--rounds``)
so that load from other processes hits them alike. Each ratio is taken within a round (variant ÷
keep-all of the same round, so a slow spell of the machine cancels) and the median over rounds
is reported:

- ``bare``: plain transformers, no policy attached (its ratio is keep-all's cost);
- ``full``: the keep-all policy attached — the denominator of every other ratio;
- the reference policies and NAMM: prefill = every chunk's forward plus the update after it
  (attention statistics included); decode = median wall time of a one-token forward plus the
  update after it.

So that the policy's work is measured and not a smaller cache, every budgeted policy gets a
budget equal to the prompt (``every_step`` greedy ones run with ``--slack``, default 64, so a
decode step pays the statistics and the scoring schedule, not a gather of the whole cache per
step). SnapKV updates once, after the prefill. FastGen runs with ``recovery=1.0`` so every head
profiles as "full" and keeps everything, while still scoring every 16 tokens. NAMM-BAM and
NAMM-MLP run with zero parameters (they evict nothing) and update after every 512-token chunk.

``--kernels torch`` runs every variant without kvpolicy's native CPU kernels (`kvpolicy.native`),
on the torch path they are tested against: the two runs side by side show what the kernels buy.

``statistics held`` is the largest amount of attention statistics the layers held at once (the
rows of the newest queries and the received attention, all layers, just before an update):
bounded by chunk × tokens per layer. ``--statistics recompute`` measures the reference path
(output from the model's kernel, statistics from a second pass: `kvpolicy.testing.recompute`)
instead of the in-pass one.

    python benchmarks/bench_policy_overhead.py --tokens 2048
    python benchmarks/bench_policy_overhead.py --tokens 4096
    python benchmarks/bench_policy_overhead.py --tokens 1024 --steps 2 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import kvpolicy
from kvpolicy import native
from kvpolicy.integrations.hf.adapter import HFAdapter
from kvpolicy.integrations.hf.attach import cache_keyword
from kvpolicy.models import load_model
from kvpolicy.prompts import haystack
from kvpolicy.testing.recompute import attach_recomputing
from kvpolicy.types import Schedule

POLICIES = ("full", "l2", "streaming_llm", "tova", "snapkv", "h2o", "fastgen", "namm-bam", "namm-mlp")
#: target ratios (prefill, decode) to keep-all; ``bare`` is keep-all's own ratio to plain transformers
TARGETS = {
    "bare": (1.05, 1.05),
    "l2": (1.05, 1.05),
    "streaming_llm": (1.05, 1.05),
    "tova": (1.05, 1.05),
    "snapkv": (1.05, 1.05),
    "h2o": (1.15, 1.10),
    "fastgen": (1.15, 1.10),
    "namm-mlp": (1.15, None),
}
NAMM_BAM_TARGET = {2048: 1.25, 4096: 1.35}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length (default 2048)")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (default 512)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per round (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all variants (default 3)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated presets ('full' always runs)")
    parser.add_argument("--slack", type=int, default=64, help="tokens a greedy policy may run over budget")
    parser.add_argument("--statistics", default="in_pass", choices=("in_pass", "recompute"))
    parser.add_argument(
        "--kernels",
        default="native",
        choices=("native", "torch"),
        help="native: kvpolicy's CPU kernels where they apply (default); torch: the torch path only",
    )
    return parser.parse_args()


def _policy(name: str, tokens: int, slack: int) -> kvpolicy.Policy:
    if name in ("full", "namm-bam", "namm-mlp"):
        return kvpolicy.build(name)
    if name == "fastgen":
        return kvpolicy.build("fastgen", scorer={"recovery": 1.0})
    if name == "snapkv":
        return kvpolicy.build("snapkv", budget=tokens)
    return kvpolicy.build(name, budget=tokens, schedule=Schedule("every_step", slack=slack))


def _held(cache) -> int:
    """Bytes of attention statistics the layers hold now."""
    total = 0
    for layer in cache.layers:
        window = getattr(layer, "window", None)
        total += window.nbytes if window is not None else 0
        for name in ("accumulated",):
            tensor = getattr(layer, name, None)
            total += tensor.numel() * tensor.element_size() if tensor is not None else 0
    return total


def _measure_policy(policy, model, prompt, follow, chunk: int, mode: str) -> tuple[float, list[float], int]:
    """Seconds of the chunked prefill (eviction passes included), of each decode step, and the most
    statistics held at once."""
    held = 0
    attachment = attach_recomputing(model, policy) if mode == "recompute" else HFAdapter(model).attach(policy)
    with torch.inference_mode(), attachment as handle:
        handle.reset()
        start = time.perf_counter()
        for part in prompt.split(chunk, dim=1):
            handle.feed(part, evict=False)
            held = max(held, _held(handle.cache))
            handle.cache.eviction_pass(handle.policy)
        prefill = time.perf_counter() - start
        steps = []
        for index in range(follow.shape[1]):
            start = time.perf_counter()
            handle.feed(follow[:, index : index + 1])
            steps.append(time.perf_counter() - start)
        report = handle.report()
    if report.seen != prompt.shape[1] + follow.shape[1]:
        raise SystemExit(f"{policy!r} saw {report.seen} tokens, expected {prompt.shape[1] + follow.shape[1]}")
    return prefill, steps, held


def _measure_bare(model, prompt, follow, chunk: int) -> tuple[float, list[float], int]:
    """The same loop in plain transformers (a `DynamicCache`, no policy attached)."""
    from transformers import DynamicCache

    keyword = cache_keyword(model)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        start = time.perf_counter()
        for part in prompt.split(chunk, dim=1):
            model(input_ids=part, use_cache=True, **{keyword: cache})
        prefill = time.perf_counter() - start
        steps = []
        for index in range(follow.shape[1]):
            start = time.perf_counter()
            model(input_ids=follow[:, index : index + 1], use_cache=True, **{keyword: cache})
            steps.append(time.perf_counter() - start)
    return prefill, steps, 0


def _target(name: str, tokens: int) -> tuple[float | None, float | None]:
    if name == "namm-bam":
        return NAMM_BAM_TARGET.get(tokens), None
    return TARGETS.get(name, (None, None))


def _cell(ratio: float, target: float | None) -> str:
    if target is None:
        return f"{ratio:.2f}×"
    return f"{ratio:.2f}× (≤ {target:.2f}{'' if ratio <= target else ', missed'})"


def main() -> None:
    args = _parse()
    if args.kernels == "torch":  # for the whole run: every variant on the torch path
        os.environ[native.ENV] = "off"
    names = ["bare", "full"] + [n for n in args.policies.split(",") if n and n != "full"]
    model, tokenizer = load_model("smollm2-135m-instruct")
    ids = tokenizer(haystack(tokenizer, args.tokens + args.steps + 64), return_tensors="pt")["input_ids"]
    if ids.shape[1] < args.tokens + args.steps:
        raise SystemExit(f"the haystack gives {ids.shape[1]} tokens; ask for fewer than {args.tokens + args.steps}")
    prompt, follow = ids[:, : args.tokens], ids[:, args.tokens : args.tokens + args.steps]
    policies = {name: _policy(name, args.tokens, args.slack) for name in names if name != "bare"}

    def run(name: str, prompt: torch.Tensor, follow: torch.Tensor) -> tuple[float, list[float], int]:
        if name == "bare":
            return _measure_bare(model, prompt, follow, args.chunk)
        return _measure_policy(policies[name], model, prompt, follow, args.chunk, args.statistics)

    for name in names:  # warm-up: every code path once, on a short prompt
        run(name, prompt[:, : min(64, args.tokens)], follow[:, :1])
    prefill: dict[str, list[float]] = {n: [] for n in names}
    decode: dict[str, list[float]] = {n: [] for n in names}
    held: dict[str, int] = {}
    for round_index in range(args.rounds):
        for name in names:
            seconds, steps, peak = run(name, prompt, follow)
            prefill[name].append(seconds)
            decode[name].extend(steps)
            held[name] = peak
            print(
                f"round {round_index + 1} {name:>14}: prefill {seconds:.2f} s, decode median "
                f"{statistics.median(steps) * 1000:.0f} ms",
                flush=True,
            )
    base_prefill = statistics.median(prefill["full"])
    base_decode = statistics.median(decode["full"])
    steps = args.steps

    def ratio(series: dict[str, list[float]], name: str, per_round: int) -> float:
        """Median over rounds of the variant's median ÷ keep-all's median in the same round."""
        ratios = []
        for index in range(args.rounds):
            own = series[name][index * per_round : (index + 1) * per_round]
            base = series["full"][index * per_round : (index + 1) * per_round]
            ratios.append(statistics.median(own) / statistics.median(base))
        return statistics.median(ratios)

    print(
        f"\nSmolLM2-135M-Instruct fp32, {args.tokens}-token prompt in {args.chunk}-token chunks, "
        f"{torch.get_num_threads()} threads, slack {args.slack}, statistics {args.statistics}, kernels {args.kernels}; keep-all: prefill "
        f"{base_prefill:.2f} s, decode step {base_decode * 1000:.0f} ms\n"
    )
    print("| variant | prefill ratio | decode-step ratio | statistics held |")
    print("|---|---|---|---:|")
    for name in [n for n in names if n != "full"]:
        target_p, target_d = _target(name, args.tokens)
        ratio_p, ratio_d = ratio(prefill, name, 1), ratio(decode, name, steps)
        label = "bare transformers (keep-all ÷ bare)" if name == "bare" else name
        if name == "bare":  # keep-all's cost over plain transformers
            ratio_p, ratio_d = 1 / ratio_p, 1 / ratio_d
        print(f"| {label} | {_cell(ratio_p, target_p)} | {_cell(ratio_d, target_d)} | {held[name] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
