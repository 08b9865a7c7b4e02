"""Cost of the ``span`` pooler in a policy's update, as a ratio of the same update without it.

The update is one layer's eviction pass, ``Policy.plan(view)``: extract → score → pool → select,
the work a policy does between forward calls. Views have SmolLM2-135M's shapes (read from the
converted model's config: 3 KV heads of 64 dims, GQA groups of 3) at each ``--tokens`` length and
carry exactly what the policy's components ask for (keys, attention rows of the newest queries,
accumulated attention); their values are drawn by ``kvpolicy.testing.strategies.make_view``, which
changes no shape or dtype and so none of the work. Every policy is measured without a pooler and
with the span pooler (max over 31 cached tokens, the shipped presets' setting; ``--mode avg`` for
average pooling), interleaved in alternating order, ``--repeats`` times, each on a fresh copy of the view so stateful
extractors start alike. The fastest of the repeats is reported (``--stat median`` for medians):
an update of the cheap policies takes well under a millisecond, and on a shared machine any
one run can be slowed many times over, by other processes, in either variant. ``pool alone``
is the pooler's own time on the scorer's output (without the policy's checks of it), as a share
of the update without it.

``--passes`` measures what a user pays instead: the whole eviction pass as the integration runs
it on the real SmolLM2 (every layer: its view with the statistics the attention pass recorded,
extract → score → pool → select, and the gather that keeps the chosen tokens; the seconds spent
in `EvictingLayer.view`, `Policy.plan` and `EvictingLayer.gather`) while a ``--tokens`` essay
prompt is fed in 512-token chunks at a 25% budget, so every pass evicts; with and without the
pooler, interleaved, ``--repeats`` times, fastest run each. ``pooling`` is the time spent inside
the pooler as a share of the pass that ran it (steadier than the ratio of two noisy totals).

    OMP_NUM_THREADS=1 python benchmarks/bench_span.py                  # 2048 and 4096 tokens
    OMP_NUM_THREADS=1 python benchmarks/bench_span.py --mode avg --repeats 9
    OMP_NUM_THREADS=1 python benchmarks/bench_span.py --passes --tokens 2048,4096 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator

import torch

import kvpolicy
from kvpolicy.models import model_dir
from kvpolicy.testing.strategies import CacheShape, make_view
from kvpolicy.testing.views import copy_view

#: preset → budget override (None: the preset's own); budgets below the cache so selection runs
POLICIES: dict[str, object] = {"h2o": "50%", "snapkv": "25%", "tova": "25%", "namm-bam-smollm2": None}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="2048,4096", help="cached tokens per view, comma-separated")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved repeats per variant (default 30)")
    parser.add_argument("--stat", default="min", choices=("min", "median"), help="statistic over the repeats")
    parser.add_argument("--kernel", type=int, default=31)
    parser.add_argument("--mode", default="max", choices=("max", "avg"))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--passes", action="store_true", help="whole eviction passes on the real SmolLM2")
    return parser.parse_args()


def _smollm2_shape(tokens: int) -> CacheShape:
    config = json.loads((model_dir("smollm2-135m-instruct") / "config.json").read_text())
    kv_heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return CacheShape(
        batch=1,
        kv_heads=kv_heads,
        groups=config["num_attention_heads"] // kv_heads,
        tokens=tokens,
        head_dim=head_dim,
        seen=tokens,
        fresh=tokens,
        dtype=torch.float32,
    )


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _timed_call(function, spent: list[float]):
    """``function``, adding the seconds each call takes to ``spent[0]``."""

    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    return run


@contextlib.contextmanager
def _timing_eviction(policy, spent: list[float]) -> Iterator[None]:
    """Add the seconds spent building views, planning and gathering to ``spent[0]``."""
    from kvpolicy.integrations.hf.cache import EvictingLayer

    originals = {name: getattr(EvictingLayer, name) for name in ("view", "gather")}

    for name, function in originals.items():
        setattr(EvictingLayer, name, _timed_call(function, spent))
    policy.plan = _timed_call(policy.plan, spent)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(EvictingLayer, name, function)
        del policy.plan  # the instance attribute hid the class's method


def passes(args: argparse.Namespace, span: dict) -> None:
    """Eviction-pass seconds of a real prefill, with and without the pooler (see the module doc)."""
    from kvpolicy.models import load_model
    from kvpolicy.prompts import haystack

    model, tokenizer = load_model("smollm2-135m-instruct")
    stat = min if args.stat == "min" else statistics.median
    print("| policy | tokens | eviction passes | without (ms) | with span (ms) | ratio | pooling |")
    print("|---|---|---|---|---|---|---|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        ids = tokenizer(haystack(tokenizer, tokens + 64), return_tensors="pt")["input_ids"][:, :tokens]
        for name in args.policies.split(","):
            variants = {
                "without": kvpolicy.build(name, pooler=None, budget="25%"),
                "with": kvpolicy.build(name, span=span, budget="25%"),
            }
            times: dict[str, list[float]] = {"without": [], "with": [], "share": []}
            pooler = variants["with"].pooler
            for repeat in range(args.repeats):
                for label in ("without", "with") if repeat % 2 else ("with", "without"):
                    spent, pooling = [0.0], [0.0]
                    pooler.pool = _timed_call(type(pooler).pool.__get__(pooler), pooling)
                    with variants[label].attach(model) as handle, _timing_eviction(variants[label], spent):
                        handle.feed(ids, chunk_size=512)
                        count = handle.cache.eviction_passes
                    del pooler.pool
                    times[label].append(spent[0])
                    if label == "with":
                        times["share"].append(pooling[0] / spent[0])
            base, pooled = stat(times["without"]), stat(times["with"])
            print(
                f"| {name} | {tokens} | {count} | {base * 1e3:.1f} | {pooled * 1e3:.1f} | {pooled / base:.3f} "
                f"| {statistics.median(times['share']):.2%} |",
                flush=True,
            )


def main() -> None:
    args = _parse()
    span = {"kernel": args.kernel, "mode": args.mode}
    if args.passes:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); span pooler {args.mode}{args.kernel}")
        passes(args, span)
        return
    stat = min if args.stat == "min" else statistics.median
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); span pooler {args.mode}{args.kernel}; "
        f"{args.stat} of {args.repeats} interleaved repeats"
    )
    print("| policy | tokens | update without (ms) | with span (ms) | ratio | pool alone |")
    print("|---|---|---|---|---|---|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        shape = _smollm2_shape(tokens)
        for name in args.policies.split(","):
            overrides = {} if POLICIES.get(name) is None else {"budget": POLICIES[name]}
            without = kvpolicy.build(name, pooler=None, **overrides)
            with_span = kvpolicy.build(name, span=span, **overrides)
            view = make_view(shape, seed=0, requirements=without.requirements, aligned=True, layer=1, num_layers=30)
            times: dict[str, list[float]] = {"without": [], "with": [], "pool": []}
            scores = without.scorer.score(without.extract(copy_view(view)), view)
            for policy in (without, with_span):  # warm up
                policy.plan(copy_view(view))
            for repeat in range(args.repeats):
                pair = [("without", without), ("with", with_span)]
                for label, policy in pair if repeat % 2 else reversed(pair):  # neither always runs first
                    fresh = copy_view(view)
                    times[label].append(_timed(lambda p=policy, v=fresh: p.plan(v)))
                pooler = with_span.pooler
                times["pool"].append(_timed(lambda p=pooler, s=scores, v=view: p.pool(s, v)))
            base, pooled, pool = (stat(times[k]) for k in ("without", "with", "pool"))
            print(
                f"| {name} | {tokens} | {base * 1e3:.2f} | {pooled * 1e3:.2f} | {pooled / base:.3f} "
                f"| {pool / base:.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
