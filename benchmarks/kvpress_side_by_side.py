"""kvpolicy next to kvpress 0.5.5 on the same prompt, model and budget: wall time and peak memory.

kvpress pins an older transformers (< 5.3), so it runs in a virtual environment of its own,
``--venv`` (default ``~/.cache/kvpolicy/kvpress-venv``), built by ``--build-venv`` with this
process's CPU torch wheel pinned (``torch==<this torch's version>``) and ``kvpress==0.5.5``.
Both sides read the same converted model folder (`kvpolicy.models.model_dir`) and the same
essay prompt (`benchmarks/bench_long_context.py`'s ``prompt_ids``), each in a fresh process per
(tool, press, round), with the peak resident set above the loaded model measured the same way.

- kvpress, as its pipeline runs: the context (the prompt but its last token) in **one** forward
  of the base model under the press, which compresses each layer's cache after that forward;
  then the last prompt token and ``--decode`` greedy tokens (no compression while decoding);
- kvpolicy: the same prompt in ``--chunk``-token chunks (default 512), evicting between chunks
  (``/chunk`` for SnapKV, which as shipped compresses once after the prompt), then the same decode.

    python benchmarks/kvpress_side_by_side.py --build-venv
    nice -n 10 python benchmarks/kvpress_side_by_side.py --tokens 8192 --rounds 1
    python benchmarks/kvpress_side_by_side.py --tokens 2048 --presses streaming_llm --decode 8   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from proc_status import start_peak, status_kib  # noqa: E402 - after the path

DEFAULT_VENV = Path.home() / ".cache" / "kvpolicy" / "kvpress-venv"
LONG_CONTEXT = Path(__file__).with_name("bench_long_context.py")
#: kvpolicy preset (as run here) for each kvpress press
PRESSES = {"streaming_llm": "streaming_llm", "snapkv": "snapkv/chunk", "tova": "tova"}
KVPRESS_CLASSES = {"streaming_llm": "StreamingLLMPress", "snapkv": "SnapKVPress", "tova": "TOVAPress"}


def kvpress_child(spec: dict) -> dict:
    """Run inside the kvpress venv (no kvpolicy there): one press, one round."""

    import kvpress
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    ids = torch.tensor([json.loads(Path(spec["ids_file"]).read_text())])
    press = getattr(kvpress, KVPRESS_CLASSES[spec["press"]])(compression_ratio=1 - spec["keep"])

    def run(prompt: torch.Tensor, decode: int) -> dict:
        cache = DynamicCache()
        context, last = prompt[:, :-1], prompt[:, -1:]
        with torch.inference_mode():
            start = time.perf_counter()
            with press(model):
                model.model(input_ids=context, past_key_values=cache)
            position = torch.tensor([[prompt.shape[1] - 1]])
            logits = model(input_ids=last, past_key_values=cache, position_ids=position, logits_to_keep=1).logits
            prefill = time.perf_counter() - start
            kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
            steps, tokens = [], []
            for i in range(decode):
                token = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token))
                start = time.perf_counter()
                logits = model(input_ids=token, past_key_values=cache, position_ids=position + 1 + i).logits
                steps.append(time.perf_counter() - start)
        return {"prefill_s": prefill, "decode_ms": statistics.median(steps) * 1000, "kv_bytes": kv, "generated": tokens}

    run(ids[:, :256], 2)  # warm-up
    base = start_peak(model)
    result = run(ids, spec["decode"])
    result["peak_above_model_bytes"] = (status_kib("VmHWM") - base) * 1024
    result["versions"] = {
        "kvpress": "0.5.5",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    return result


def build_venv(venv: Path) -> None:
    """The kvpress venv: this torch (CPU wheel, pinned), then kvpress 0.5.5 and what it pins."""
    import torch

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch.__version__}"], check=True)
    subprocess.run([*pip, "kvpress==0.5.5"], check=True)


def _child(python: str, script: Path, flag: str, spec: dict) -> dict | None:
    """One fresh process: ``script flag spec`` under ``python``; its last stdout line is the result."""
    done = subprocess.run([python, str(script), flag, json.dumps(spec)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"{flag} {spec.get('press') or spec.get('variant')}: FAILED\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def kvpolicy_side(
    model: str, tokens: int, press: str, budget: str, chunk: int, *, decode: int, threads: int
) -> dict | None:
    """kvpolicy's run of ``press``'s counterpart: bench_long_context's own fresh-process run."""
    spec = {"model": model, "tokens": tokens, "variant": PRESSES[press], "budget": budget, "chunk": chunk,
            "decode": decode, "threads": threads}  # fmt: skip
    return _child(sys.executable, LONG_CONTEXT, "--child", spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--budget", default="25%", help="share of the prompt kept (default 25%%)")
    parser.add_argument("--presses", default=",".join(PRESSES), help=f"comma-separated: {', '.join(PRESSES)}")
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--build-venv", action="store_true", help="build the kvpress venv and stop")
    parser.add_argument("--kvpress-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kvpress_child:
        print(json.dumps(kvpress_child(json.loads(args.kvpress_child))))
        return
    if args.build_venv:
        build_venv(args.venv)
        return
    python = args.venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no kvpress venv at {args.venv}: run with --build-venv first")
    from kvpolicy.models import load_named_model, model_dir

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_long_context import prompt_ids

    _, tokenizer = load_named_model(args.model)
    ids = prompt_ids(tokenizer, args.tokens)
    keep = float(args.budget.rstrip("%")) / 100
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids[0].tolist()))
        for press in [p for p in args.presses.split(",") if p]:
            for round_index in range(args.rounds):
                common = {"decode": args.decode, "threads": args.threads}
                theirs = _child(
                    str(python),
                    Path(__file__),
                    "--kvpress-child",
                    {
                        **common,
                        "press": press,
                        "keep": keep,
                        "model_dir": str(model_dir(args.model)),
                        "ids_file": str(ids_file),
                    },
                )
                ours = None
                if theirs is not None:
                    ours = kvpolicy_side(args.model, args.tokens, press, args.budget, args.chunk, **common)
                if ours is not None:
                    rows.append((press, round_index, theirs, ours))
                    print(f"{press} round {round_index + 1}: kvpress prefill {theirs['prefill_s']:.1f} s, "
                          f"kvpolicy {ours['prefill_s']:.1f} s", flush=True)  # fmt: skip
    print(
        f"\n{args.model}, {args.tokens:,} tokens, {args.budget} kept, {args.decode} greedy tokens; median of {args.rounds}\n"
    )
    print("| press | tool | prefill s | decode ms/token | KV MiB | peak above model MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for press in dict.fromkeys(r[0] for r in rows):
        for tool, index in (
            ("kvpress 0.5.5 (one forward, then compress)", 2),
            (f"kvpolicy ({args.chunk}-token chunks)", 3),
        ):
            runs = [r[index] for r in rows if r[0] == press]
            med = {
                k: statistics.median(run[k] for run in runs)
                for k in ("prefill_s", "decode_ms", "kv_bytes", "peak_above_model_bytes")
            }
            print(f"| {press} | {tool} | {med['prefill_s']:.1f} | {med['decode_ms']:.1f} | "
                  f"{med['kv_bytes'] / 2**20:.1f} | {med['peak_above_model_bytes'] / 2**20:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
