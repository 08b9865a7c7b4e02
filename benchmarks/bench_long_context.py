"""Does eviction pay for itself at long contexts? Full cache vs budgeted policies, 4k–32k tokens.

One command runs every variant on the same essay prompt (`kvpolicy.prompts.haystack`, the essays
the evaluation draws from) fed in ``--chunk``-token chunks (default 512) with only the last
token's logits computed, then ``--decode`` greedy tokens one at a time (default 64):

- ``full``: the keep-all policy (the same chunked prefill; the denominator of every ratio);
- ``streaming_llm``, ``snapkv``, ``snapkv-span``, ``tova`` and the shipped ``namm-bam-smollm2``
  at each ``--budgets`` share of the tokens seen (default 25% and 12.5%), each with its schedule
  as shipped; a policy that compresses once after the prompt (``after_prefill``: SnapKV, the
  NAMM) also runs as ``/chunk``, evicting after every prefill chunk (``every_n`` = chunk), since
  only that can speed the prefill up or lower its peak. ``--variants`` also takes ``name/slackN``
  (e.g. ``tova/slack64``): ``every_step`` with ``N`` tokens of slack, so a decoding step runs a
  pass once every ``N`` steps (not the same tokens kept as per-step TOVA: a choice, not a fix),
  and ``name/alone``: as shipped, but every layer's eviction pass planned on its own (the path
  before layers were planned together, `kvpolicy.integrations.hf.stacked_pass`; the same tokens kept).

Each (variant, round) runs in a fresh subprocess, so one variant's memory peak cannot hide
another's: the peak is the resident-set high-water mark (``VmHWM``, reset after the model is
loaded and warmed up) minus the resident set at that moment. Reported per variant: prefill
seconds, decode ms/token (median over the steps), KV bytes stored after the decode, attention
statistics held at most (rows, received attention and per-token state, just before a pass),
peak memory above the loaded model, seconds inside eviction passes, and how many of the greedy
tokens agree with the full cache's (a cheap sign of what the budget costs, not a task score).

Results are appended to ``--results`` (JSONL, rewritten atomically after every run): a rerun
skips what is there, so a long run resumes where it stopped. Rounds are interleaved (round 1 of
every variant, then round 2, …); speed ratios are ``full ÷ variant`` within a round (above 1 =
faster), size ratios ``variant ÷ full``; the table gives medians over rounds and the spread.

    nice -n 10 python benchmarks/bench_long_context.py                       # everything (hours)
    nice -n 10 python benchmarks/bench_long_context.py --models smollm2-135m-instruct:8192 --rounds 2
    python benchmarks/bench_long_context.py --models smollm2-135m-instruct:2048 --rounds 1 \\
        --variants full,tova,snapkv/chunk --budgets 25% --decode 8              # quick
    python benchmarks/bench_long_context.py --table-only                     # print what is stored
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from proc_status import start_peak, status_kib  # noqa: E402 - after the path

DEFAULT_MODELS = "qwen2.5-coder-0.5b-instruct:8192,16384,32768;smollm2-135m-instruct:4096,8192"
POLICIES = ("streaming_llm", "snapkv", "snapkv/chunk", "snapkv-span", "snapkv-span/chunk", "tova")
NAMM = ("namm-bam-smollm2", "namm-bam-smollm2/chunk")
DEFAULT_VARIANTS = ",".join(("full", *POLICIES, *NAMM))
DEFAULT_RESULTS = "benchmarks/results/long_context.jsonl"


# ----------------------------------------------------------------------------- one run (child)


def build_variant(variant: str, budget: str, chunk: int):
    """The policy of ``variant`` at ``budget`` of the tokens seen: ``name`` as shipped,
    ``name/chunk`` evicting after every prefill chunk, ``name/slackN`` evicting every step once
    the cache is ``N`` tokens over budget (a pass every ``N`` decoding steps instead of every one),
    ``name/alone`` as shipped with each layer planned on its own (`run_child` sets that)."""
    import kvpolicy
    from kvpolicy.types import Schedule

    name, _, how = variant.partition("/")
    if name == "full":
        return kvpolicy.build("full")
    overrides = {"budget": budget}
    if how == "chunk":
        overrides["schedule"] = Schedule("every_n", every=chunk)
    elif how == "alone":
        pass  # as shipped; `run_child` plans its layers one by one
    elif how.startswith("slack") and how[5:].isdigit():
        overrides["schedule"] = Schedule("every_step", slack=int(how[5:]))
    elif how:
        raise SystemExit(f"unknown variant {variant!r}: a preset, preset/chunk, preset/slackN or preset/alone")
    return kvpolicy.build(name, **overrides)


def describe_schedule(policy) -> str:
    schedule = policy.schedule
    text = schedule.kind + (f" {schedule.every}" if schedule.kind == "every_n" else "")
    return text + (f", slack {schedule.slack}" if schedule.slack and schedule.kind == "every_step" else "")


def statistics_bytes(cache) -> int:
    """Bytes of attention statistics and per-token state the layers hold now."""
    total = 0
    for layer in cache.layers:
        window = getattr(layer, "window", None)
        total += window.nbytes if window is not None else 0
        tensors = [getattr(layer, "accumulated", None), *getattr(layer, "state", {}).values()]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def prompt_ids(tokenizer, tokens: int):
    from kvpolicy.prompts import haystack

    ids = tokenizer(haystack(tokenizer, tokens + tokens // 8 + 256), return_tensors="pt")["input_ids"][:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"the essays gave {ids.shape[1]} tokens, fewer than {tokens}")
    return ids


def padded_batch(tokenizer, rows: int, tokens: int):
    """``(ids, attention_mask)`` of a left-padded batch of essay prompts: row *i* a different
    passage, ``37 · i`` tokens shorter, so the batch is really padded."""
    import torch

    from kvpolicy.prompts import haystack

    ids = torch.full((rows, tokens), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((rows, tokens), dtype=torch.long)
    for row in range(rows):
        length = tokens - 37 * row
        text = haystack(tokenizer, length + length // 8 + 256, offset=row)
        row_ids = tokenizer(text, return_tensors="pt")["input_ids"][0, :length]
        ids[row, tokens - row_ids.shape[0] :], mask[row, tokens - row_ids.shape[0] :] = row_ids, 1
    return ids, mask


def _instrument(cache, totals: dict[str, float]) -> None:
    """Count the seconds inside eviction passes and the statistics held just before each pass."""
    original = cache.eviction_pass

    def timed_pass(policy) -> None:
        totals["held"] = max(totals["held"], statistics_bytes(cache))
        start = time.perf_counter()
        original(policy)
        totals["pass_s"] += time.perf_counter() - start

    cache.eviction_pass = timed_pass


def _generate(model, policy, ids, chunk: int, decode: int, together: bool = True) -> dict:
    import torch

    totals = {"held": 0, "pass_s": 0.0}
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.reset()
        handle.cache.plan_layers_together = together
        _instrument(handle.cache, totals)
        start = time.perf_counter()
        logits = handle.feed(ids, chunk_size=chunk, last_only=True)
        prefill = time.perf_counter() - start
        prefill_passes = totals["pass_s"]
        kv_prefill = handle.report().kv_bytes
        resident_prefill = status_kib("VmRSS")
        tokens, steps = [], []
        for _ in range(decode):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            start = time.perf_counter()
            logits = handle.feed(token, last_only=True)
            steps.append(time.perf_counter() - start)
        totals["held"] = max(totals["held"], statistics_bytes(handle.cache))
        report = handle.report()
        resident_end = status_kib("VmRSS")
    return {
        "prefill_s": prefill,
        "decode_ms": statistics.median(steps) * 1000 if steps else None,
        "decode_steps_ms": [round(s * 1000, 3) for s in steps],
        "kv_bytes_prefill": kv_prefill,
        "kv_bytes": report.kv_bytes,
        "full_kv_bytes": report.full_kv_bytes,
        "statistics_bytes": totals["held"],
        "pass_s": totals["pass_s"],
        "pass_prefill_s": prefill_passes,
        "eviction_passes": handle.cache.eviction_passes,
        "release_memory": getattr(handle.cache, "release_memory", False),
        "generated": tokens,
        "resident_prefill_kib": resident_prefill,  # VmRSS after the prefill (absolute; run_child subtracts the base)
        "resident_end_kib": resident_end,
    }


def run_child(spec: dict) -> dict:
    """One variant, one round, in this (fresh) process."""

    import torch

    from kvpolicy.models import load_named_model

    torch.set_num_threads(spec["threads"])
    model, tokenizer = load_named_model(spec["model"])
    ids = prompt_ids(tokenizer, spec["tokens"])
    policy = build_variant(spec["variant"], spec["budget"], spec["chunk"])
    together = not spec["variant"].endswith("/alone")
    _generate(model, policy, ids[:, : min(2 * spec["chunk"], spec["tokens"])], spec["chunk"], 2, together)  # warm-up
    base = start_peak(model)
    result = _generate(model, policy, ids, spec["chunk"], spec["decode"], together)
    result["peak_above_model_bytes"] = (status_kib("VmHWM") - base) * 1024
    # what stays resident once the prompt is in (and after decoding): the cache, plus what the allocator kept
    result["resident_after_prefill_bytes"] = (result.pop("resident_prefill_kib") - base) * 1024
    result["resident_after_decode_bytes"] = (result.pop("resident_end_kib") - base) * 1024
    result["schedule"] = describe_schedule(policy)
    result["threads"] = torch.get_num_threads()
    result["heap_trimmed"] = True  # the base is measured after start_peak's trim (records before: not)
    result["weights_resident"] = True  # ... and with every weight page read first (records before: not)
    return result


# ----------------------------------------------------------------------------- the driver


def _key(record: dict) -> tuple:
    return (record["model"], record["tokens"], record["variant"], record["budget"], record["round"], record["decode"])


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_results(path: Path, records: list[dict]) -> None:
    from kvpolicy.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def parse_models(text: str) -> list[tuple[str, list[int]]]:
    """``name:4096,8192;name2:8192`` → ``[(name, [4096, 8192]), (name2, [8192])]``."""
    plan = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, lengths = part.rpartition(":")
        if not name or not lengths:
            raise SystemExit(f"--models wants name:length[,length...]; got {part!r}")
        plan.append((name, [int(n) for n in lengths.split(",")]))
    return plan


def planned_runs(args: argparse.Namespace) -> list[dict]:
    """Every (size, round, variant, budget) to run, rounds interleaved within a size."""
    variants = [v for v in args.variants.split(",") if v]
    budgets = [b for b in args.budgets.split(",") if b]
    runs = []
    for model, lengths in parse_models(args.models):
        for tokens in lengths:
            for round_index in range(args.rounds):
                for variant in variants:
                    for budget in ["-"] if variant == "full" else budgets:
                        common = {"model": model, "tokens": tokens, "variant": variant, "budget": budget}
                        runs.append({**common, "round": round_index, "decode": args.decode})
    return runs


def run_all(args: argparse.Namespace, path: Path) -> list[dict]:
    records = load_results(path)
    done = {_key(r) for r in records}
    for run in planned_runs(args):
        if _key(run) in done:
            continue
        spec = {**run, "chunk": args.chunk, "threads": args.threads}
        label = f"{run['model']} {run['tokens']} {run['variant']} {run['budget']} round {run['round'] + 1}"
        child = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
        )
        if child.returncode != 0:
            print(f"{label}: FAILED\n{child.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        records.append({**spec, **result})
        save_results(path, records)
        print(
            f"{label}: prefill {result['prefill_s']:.1f} s, decode {result['decode_ms'] or 0:.0f} ms/token, "
            f"peak +{result['peak_above_model_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    return records


# ----------------------------------------------------------------------------- the table


def _median_spread(values: list[float]) -> tuple[float, float]:
    middle = statistics.median(values)
    return middle, (max(values) - min(values)) / 2 / middle if middle else 0.0


def summarize(records: list[dict], model: str, tokens: int, decode: int) -> list[dict]:
    """One row per (variant, budget): medians over rounds and within-round ratios to ``full``."""
    mine = [r for r in records if r["model"] == model and r["tokens"] == tokens and r["decode"] == decode]
    full = {r["round"]: r for r in mine if r["variant"] == "full"}
    rows = []
    for variant, budget in dict.fromkeys((r["variant"], r["budget"]) for r in mine):
        runs = [r for r in mine if (r["variant"], r["budget"]) == (variant, budget)]
        paired = [(r, full[r["round"]]) for r in runs if r["round"] in full]

        def ratio(field: str, speed: bool, paired=paired) -> float | None:
            values = [(f[field] / r[field]) if speed else (r[field] / f[field]) for r, f in paired if r[field]]
            return statistics.median(values) if values else None

        def agreement(run: dict, reference: dict) -> int:
            same = 0
            for a, b in zip(run["generated"], reference["generated"], strict=False):
                if a != b:
                    break
                same += 1
            return same

        row = {"variant": variant, "budget": budget, "schedule": runs[0]["schedule"], "rounds": len(runs)}
        for field in ("prefill_s", "decode_ms", "kv_bytes", "statistics_bytes", "peak_above_model_bytes", "pass_s"):
            values = [r[field] for r in runs if r[field] is not None]
            row[field], row[field + "_spread"] = _median_spread(values) if values else (None, None)
        resident = [
            r["resident_after_prefill_bytes"] for r in runs if r.get("resident_after_prefill_bytes") is not None
        ]
        row["resident_after_prefill_bytes"] = statistics.median(resident) if resident else None
        row["prefill_speedup"] = ratio("prefill_s", True)
        row["decode_speedup"] = ratio("decode_ms", True)
        row["kv_ratio"] = ratio("kv_bytes", False)
        row["peak_ratio"] = ratio("peak_above_model_bytes", False)
        row["agree"] = statistics.median(agreement(r, f) for r, f in paired) if paired else None
        rows.append(row)
    return rows


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def format_table(rows: list[dict], model: str, tokens: int, decode: int) -> str:
    mib = 2**20
    lines = [
        f"\n{model}, {tokens:,} tokens, {decode} greedy tokens decoded; medians over rounds "
        "(± half the range); speed ratios full ÷ variant, size ratios variant ÷ full\n",
        "| variant | budget | schedule | prefill s | prefill speed-up | decode ms/token | decode speed-up "
        "| KV MiB | KV × | statistics held MiB | peak above model MiB | peak × | eviction passes s | greedy agreement "
        "| resident after prefill MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            r["variant"],
            r["budget"],
            r["schedule"],
            f"{_fmt(r['prefill_s'], '.1f')} ±{_fmt(r['prefill_s_spread'], '.0%')}",
            _fmt(r["prefill_speedup"], ".2f") + "×",
            f"{_fmt(r['decode_ms'], '.1f')} ±{_fmt(r['decode_ms_spread'], '.0%')}",
            _fmt(r["decode_speedup"], ".2f") + "×",
            _fmt(r["kv_bytes"] / mib, ".1f"),
            _fmt(r["kv_ratio"], ".3f"),
            _fmt(r["statistics_bytes"] / mib, ".1f"),
            _fmt(r["peak_above_model_bytes"] / mib, ".0f"),
            _fmt(r["peak_ratio"], ".2f"),
            _fmt(r["pass_s"], ".2f"),
            f"{_fmt(r['agree'], '.0f')}/{decode}",
            _fmt(None if r["resident_after_prefill_bytes"] is None else r["resident_after_prefill_bytes"] / mib, ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_tables(args: argparse.Namespace, records: list[dict]) -> None:
    for model, lengths in parse_models(args.models):
        for tokens in lengths:
            rows = summarize(records, model, tokens, args.decode)
            if rows:
                print(format_table(rows, model, tokens, args.decode), flush=True)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="name:length[,length];name:... (default: all)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated: full, preset, preset/chunk")
    parser.add_argument("--budgets", default="25%,12.5%", help="shares of the tokens seen (default 25%%,12.5%%)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--decode", type=int, default=64, help="greedy tokens decoded (default 64)")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (default 512)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help=f"JSONL of results (default {DEFAULT_RESULTS})")
    parser.add_argument("--table-only", action="store_true", help="print the tables of what is stored, run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    path = Path(args.results)
    records = load_results(path) if args.table_only else run_all(args, path)
    print_tables(args, records)


if __name__ == "__main__":
    main()
