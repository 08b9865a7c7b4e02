"""More rows in the same memory: a padded batch of long prompts under a memory cap, full cache vs a budget.

For each side (the full cache; ``--policy`` at ``--budget``) and each batch size in ``--rows``
(ascending), a fresh process prefills a left-padded batch of that many essay prompts (each row
a different essay passage, row *i* ``i × 37`` tokens shorter, so the batch is really padded) in
``--chunk``-token chunks aligned to the end, then decodes ``--decode`` greedy tokens per row. It
reports the peak resident set above the loaded model (``VmHWM`` reset after loading: keys,
values, statistics, activations — everything the process holds) and the generated tokens per
second (rows × decode ÷ decode seconds). A side stops growing once a batch's peak passes
``--cap-mib``; the table gives the most rows that fit under the cap and their throughput.

Each run is appended to ``--results`` (JSONL, rewritten atomically after every run): a rerun
skips the runs already there, so a long ladder resumes where it stopped.

    nice -n 10 python benchmarks/bench_rows_in_memory.py --tokens 8192 --cap-mib 4096 --rows 1,2,4,8,16
    python benchmarks/bench_rows_in_memory.py --model tiny:llama --tokens 512 --cap-mib 64 --rows 1,2,4 --decode 4  # quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_long_context import load_results, padded_batch, save_results  # noqa: E402

DEFAULT_RESULTS = "benchmarks/results/rows_in_memory.jsonl"


def child(spec: dict) -> dict:
    """One (side, rows) run in this fresh process."""

    import torch
    from proc_status import start_peak, status_kib

    import kvpolicy
    from kvpolicy.models import load_named_model

    torch.set_num_threads(spec["threads"])
    model, tokenizer = load_named_model(spec["model"])
    rows, tokens = spec["rows"], spec["tokens"]
    ids, mask = padded_batch(tokenizer, rows, tokens)
    policy = kvpolicy.build("full") if spec["side"] == "full" else kvpolicy.build(spec["policy"], budget=spec["budget"])
    with torch.inference_mode(), policy.attach(model) as handle:  # warm-up: every code path once
        tail = min(spec["chunk"], tokens)
        logits = handle.feed(ids[:, -tail:], chunk_size=spec["chunk"], last_only=True)
        handle.feed(logits[:, -1].argmax(-1, keepdim=True), last_only=True)
    base = start_peak(model)
    with torch.inference_mode(), policy.attach(model) as handle:
        start = time.perf_counter()
        logits = handle.feed(ids, chunk_size=spec["chunk"], attention_mask=mask, last_only=True, align_end=True)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(spec["decode"]):
            logits = handle.feed(logits[:, -1].argmax(-1, keepdim=True), last_only=True)
        decode = time.perf_counter() - start
        kv = handle.report().kv_bytes
    return {
        "prefill_s": prefill,
        "tokens_per_s": rows * spec["decode"] / decode,
        "kv_bytes": kv,
        "peak_above_model_bytes": (status_kib("VmHWM") - base) * 1024,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--policy", default="tova")
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--rows", default="1,2,4,8,16", help="batch sizes to try, ascending")
    parser.add_argument("--cap-mib", type=float, default=4096, help="memory cap above the loaded model (MiB)")
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="JSONL of runs, resumed")
    parser.add_argument("--round", type=int, default=0, help="a repeat's number (its runs are records of their own)")
    parser.add_argument(
        "--sides",
        default="full,budget",
        help="which ladders to run: full, budget or both (e.g. to rerun one rung "
        "of each side back to back, under the same load)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    path = Path(args.results)
    records = load_results(path)
    best: dict[str, tuple[int, dict] | None] = {}
    for side in args.sides.split(","):
        if side not in ("full", "budget"):
            raise SystemExit(f"--sides takes full, budget or both; got {side!r}")
        best[side] = None
        for rows in (int(r) for r in args.rows.split(",")):
            spec = {"side": side, "rows": rows, **{k: getattr(args, k) for k in
                    ("model", "tokens", "policy", "budget", "decode", "chunk", "threads", "round")}}  # fmt: skip
            if side == "full":
                spec["policy"] = spec["budget"] = "-"
            result = next((r for r in records if all(r.get(k) == v for k, v in spec.items())), None)
            if result is None:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
                )
                if done.returncode != 0:
                    print(f"{side} × {rows} rows: FAILED\n{done.stderr[-1500:]}", flush=True)
                    break
                result = {**spec, **json.loads(done.stdout.strip().splitlines()[-1])}
                records.append(result)
                save_results(path, records)
            peak = result["peak_above_model_bytes"] / 2**20
            print(f"{side} × {rows} rows: peak +{peak:.0f} MiB, {result['tokens_per_s']:.1f} tokens/s", flush=True)
            if peak > args.cap_mib:
                break
            best[side] = (rows, result)
    label = {"full": "full cache", "budget": f"{args.policy} at {args.budget}"}
    print(
        f"\n{args.model}, {args.tokens:,}-token prompts (left-padded batch), cap {args.cap_mib:.0f} MiB above the model\n"
    )
    print("| cache | rows that fit | peak above model MiB | KV MiB | generated tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for side, fit in best.items():
        if fit is None:
            print(f"| {label[side]} | 0 | – | – | – |")
            continue
        rows, r = fit
        print(f"| {label[side]} | {rows} | {r['peak_above_model_bytes'] / 2**20:.0f} | {r['kv_bytes'] / 2**20:.1f} | "
              f"{r['tokens_per_s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
