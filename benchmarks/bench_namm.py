"""What a NAMM costs during prefill, measured side by side in one run.

SmolLM2-135M-Instruct on CPU, a ``--tokens`` prompt of essays fed in chunks of ``--every`` tokens
(so NAMM updates after every chunk, as in the paper: every 512 tokens), best of ``--repeats``
interleaved runs of:

- ``keep-all``: the ``full`` preset attached (same chunks, no statistics, no updates);
- ``namm-bam zero``: NAMM-BAM with zero parameters — nothing is evicted, so this is pure overhead
  (attention statistics computed in the attention pass);
- ``namm-bam zero, torch path``: the same without kvpolicy's native CPU kernels
  (`kvpolicy.native.disabled`): in-pass statistics and spectrogram as plain torch operations;
- ``namm-bam zero, recompute``: the same with the reference statistics path (output from the
  model's kernel, statistics from a second pass: `kvpolicy.testing.recompute`);
- ``namm-bam member``: one random member of a first CMA-ES generation (σ 0.065, the paper's
  initial step), which does evict and so also makes the model's attention cheaper.

The policy time is split by timers around the pieces of one update: attention statistics (the
integration builds the `LayerView`: assembling the rows computed in the attention pass, or, on
the recompute path, computing them), STFT (extractor), scorer (BAM), selection, and gather (the
cache keeps the chosen tokens). The in-pass statistics themselves run inside the forward and
are not in this split: they are the difference between the policy's total and keep-all's.

Both wall-clock and CPU seconds (``time.process_time``, all threads of this process) are
recorded; on a machine shared with other jobs the CPU seconds are the steadier measure of the
work each policy does, and the ratios are reported for both. The split uses CPU seconds too.

    python benchmarks/bench_namm.py --tokens 4096            # the reference measurement
    python benchmarks/bench_namm.py --tokens 1024 --repeats 1  # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

PIECES = ("attention statistics", "stft", "scorer", "selection", "gather")


@contextlib.contextmanager
def timed_pieces(policy, totals: dict[str, float]) -> Iterator[None]:
    """Accumulate seconds spent in each piece of a policy update into ``totals``."""
    from kvpolicy.integrations.hf import eviction
    from kvpolicy.integrations.hf.cache import EvictingLayer

    def wrap(owner, attribute: str, piece: str):
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                totals[piece] += time.process_time() - start

        setattr(owner, attribute, timed)
        return owner, attribute, original

    patched = [
        wrap(eviction, "layer_view", "attention statistics"),
        wrap(EvictingLayer, "gather", "gather"),
        wrap(policy.extractor, "extract", "stft"),
        wrap(policy.scorer, "score", "scorer"),
        wrap(policy.selector, "select", "selection"),
    ]
    try:
        yield
    finally:
        for owner, attribute, original in reversed(patched):
            if owner is EvictingLayer or owner is eviction:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)  # the instance attribute hid the class's method


def prefill(model, policy, ids: torch.Tensor, chunk: int, statistics: str = "in_pass", kernels: bool = True) -> dict:
    """Wall and CPU seconds to feed ``ids`` in chunks with ``policy`` attached, its report and the split."""
    from kvpolicy import native
    from kvpolicy.integrations.hf.adapter import HFAdapter
    from kvpolicy.testing.recompute import attach_recomputing

    pieces: dict[str, float] = defaultdict(float)
    path = contextlib.nullcontext() if kernels else native.disabled()
    attachment = attach_recomputing(model, policy) if statistics == "recompute" else HFAdapter(model).attach(policy)
    with attachment as handle, timed_pieces(policy, pieces), path:
        wall, cpu = time.perf_counter(), time.process_time()
        handle.feed(ids, chunk_size=chunk)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        report = handle.report()
    return {"wall": wall, "cpu": cpu, "report": report, "pieces": dict(pieces)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--every", type=int, default=512, help="update period = prefill chunk")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_namm.json")
    args = parser.parse_args()

    import kvpolicy
    from kvpolicy.atomic import atomic_write_text
    from kvpolicy.models import load_model
    from kvpolicy.prompts import haystack

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model()
    ids = tokenizer(haystack(tokenizer, args.tokens + 64), return_tensors="pt")["input_ids"][:, : args.tokens]
    zero = kvpolicy.build("namm-bam", every=args.every)
    member = kvpolicy.build("namm-bam", every=args.every)
    member.set_flat(torch.randn(member.num_params, generator=torch.Generator().manual_seed(0)) * 0.065)
    policies = {  # name: (policy, statistics path, native kernels)
        "keep-all": (kvpolicy.build("full"), "in_pass", True),
        "namm-bam zero": (zero, "in_pass", True),
        "namm-bam zero, torch path": (kvpolicy.build("namm-bam", every=args.every), "in_pass", False),
        "namm-bam zero, recompute": (kvpolicy.build("namm-bam", every=args.every), "recompute", True),
        "namm-bam member": (member, "in_pass", True),
    }

    prefill(model, policies["keep-all"][0], ids[:, : args.every], args.every)  # warm up
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, (policy, statistics, kernels) in policies.items():  # interleaved: load hits all alike
            run = prefill(model, policy, ids, args.every, statistics, kernels)
            if name not in best or run["cpu"] < best[name]["cpu"]:
                best[name] = run
            print(f"  {name:26s} wall {run['wall']:7.2f} s  cpu {run['cpu']:7.2f} s", flush=True)

    threads = torch.get_num_threads()
    results = {"tokens": int(ids.shape[1]), "every": args.every, "repeats": args.repeats, "threads": threads}
    results["policies"] = {}
    base = best["keep-all"]
    print(f"\nprefill of {ids.shape[1]} tokens in chunks of {args.every}, {threads} thread(s), best of {args.repeats}:")
    for name, run in best.items():
        report, pieces = run["report"], run["pieces"]
        row = {
            "wall_seconds": run["wall"],
            "cpu_seconds": run["cpu"],
            "wall_ratio_vs_keep_all": run["wall"] / base["wall"],
            "cpu_ratio_vs_keep_all": run["cpu"] / base["cpu"],
            "kept_fraction": report.kept_fraction,
            "updates": report.eviction_passes,
            "policy_wall_seconds": report.policy_seconds,
            "pieces_cpu_seconds": pieces,
        }
        results["policies"][name] = row
        print(
            f"{name:26s} cpu {run['cpu']:7.2f} s ({row['cpu_ratio_vs_keep_all']:4.2f}x)  "
            f"wall {run['wall']:7.2f} s ({row['wall_ratio_vs_keep_all']:4.2f}x)  kept {report.kept_fraction:6.1%}"
        )
        if pieces:
            split = ", ".join(f"{p} {pieces.get(p, 0.0):.2f}" for p in PIECES)
            print(f"{'':26s} policy cpu seconds: {split}")
    atomic_write_text(args.out, json.dumps(results, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
