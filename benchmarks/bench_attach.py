"""Cost of the attach machinery and what eviction saves, measured side by side in one run.

SmolLM2-135M-Instruct on CPU, a prompt of ``--tokens`` tokens of essays:

1. prefill and decode time, plain transformers vs a keep-all policy attached (target ≤ 1.05×);
2. KV bytes and peak memory of the process, full cache vs a 25% budget (StreamingLLM), with and
   without chunked prefill (eviction between chunks lowers the peak).

Peak memory is the resident-set high-water mark (``VmHWM``) of a fresh subprocess per
configuration, reset after the model is loaded (``/proc/self/clear_refs``), so it measures the
prefill alone and one configuration's peak cannot hide another's. Linux only.

    python benchmarks/bench_attach.py --tokens 4096
    python benchmarks/bench_attach.py --tokens 1024 --decode 16   # quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from proc_status import start_peak, status_kib  # noqa: E402 - after the path


def _prompt(tokenizer, tokens: int) -> torch.Tensor:
    from kvpolicy.prompts import haystack

    ids = tokenizer(haystack(tokenizer, tokens + 64), return_tensors="pt")["input_ids"][:, :tokens]
    return ids


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def speed(tokens: int, decode: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` prefill and decode seconds, plain vs keep-all attached, interleaved."""
    import kvpolicy
    from kvpolicy.models import load_model

    model, tokenizer = load_model()
    ids = _prompt(tokenizer, tokens)
    step = torch.tensor([[tokenizer.eos_token_id or 0]])
    keyword = (
        "cache" if "cache" in __import__("inspect").signature(type(model).forward).parameters else "past_key_values"
    )

    def plain_prefill():
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{keyword: cache})
        return cache

    def plain_decode():
        cache = plain_prefill()
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(decode):
                pos = torch.tensor([[tokens + i]])
                model(input_ids=step, position_ids=pos, use_cache=True, **{keyword: cache})
        return time.perf_counter() - start

    results: dict[str, list[float]] = {
        k: [] for k in ("plain_prefill", "attached_prefill", "plain_decode", "attached_decode")
    }
    with kvpolicy.build("full").attach(model) as handle:
        pass  # warm the registry and imports
    for _ in range(repeats):
        results["plain_prefill"].append(_timed(plain_prefill, 1))
        with kvpolicy.build("full").attach(model) as handle:
            start = time.perf_counter()
            handle.reset()
            handle.feed(ids)
            results["attached_prefill"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(decode):
                handle.feed(step)
            results["attached_decode"].append(time.perf_counter() - start)
        results["plain_decode"].append(plain_decode())
    return {k: min(v) for k, v in results.items()}


def memory_child(tokens: int, budget: str | None, chunk: int | None) -> None:
    """Run in a subprocess: prefill with a policy, print KV bytes and the peak RSS as JSON."""
    import kvpolicy
    from kvpolicy.models import load_model

    model, tokenizer = load_model()
    ids = _prompt(tokenizer, tokens)
    base = start_peak(model)  # after loading
    policy = kvpolicy.build("full") if budget is None else kvpolicy.build("streaming_llm", budget=budget)
    with policy.attach(model) as handle:
        handle.feed(ids, chunk_size=chunk)
        report = handle.report()
    peak = status_kib("VmHWM")
    print(
        json.dumps(
            {"kv_bytes": report.kv_bytes, "full_kv_bytes": report.full_kv_bytes, "peak_kib": peak, "base_kib": base}
        )
    )


def memory(tokens: int, chunk: int) -> dict[str, dict]:
    configs = {"full": (None, None), "25%": ("25%", None), f"25% chunked {chunk}": ("25%", chunk)}
    out = {}
    for label, (budget, chunk_size) in configs.items():
        argv = [sys.executable, __file__, "--child", "--tokens", str(tokens)]
        if budget:
            argv += ["--budget", budget]
        if chunk_size:
            argv += ["--chunk", str(chunk_size)]
        lines = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().splitlines()
        out[label] = json.loads(lines[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk of the chunked run (default 512)")
    parser.add_argument("--budget", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:
        memory_child(args.tokens, args.budget, args.chunk)
        return
    timing = speed(args.tokens, args.decode, args.repeats)
    print(f"SmolLM2-135M fp32, CPU, {args.tokens}-token prompt, {args.decode} decode steps, best of {args.repeats}")
    for phase in ("prefill", "decode"):
        plain, attached = timing[f"plain_{phase}"], timing[f"attached_{phase}"]
        print(
            f"  {phase:8s} plain {plain:7.2f} s   keep-all attached {attached:7.2f} s   ratio {attached / plain:.3f}x"
        )
    mem = memory(args.tokens, args.chunk or 512)
    full = mem["full"]
    print("memory (peak RSS of a fresh process; KV bytes measured from the stored tensors)")
    for label, m in mem.items():
        print(
            f"  {label:18s} KV {m['kv_bytes'] / 2**20:7.1f} MiB ({m['kv_bytes'] / full['kv_bytes']:.3f}x)   "
            f"peak {m['peak_kib'] / 1024:7.0f} MiB ({m['peak_kib'] / full['peak_kib']:.3f}x)   "
            f"peak above model {(m['peak_kib'] - m['base_kib']) / 1024:6.0f} MiB"
        )


if __name__ == "__main__":
    main()
