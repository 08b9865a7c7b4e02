"""``kvpolicy run``: generate with a policy on a real shipped model and report the cache kept.

By default SmolLM2-135M-Instruct answers a question whose answer (a needle) is hidden in ~2,000
tokens of Paul Graham essays; it prints the answer, whether the needle was found, how much of the
cache the policy kept and how long it took — next to the full cache with ``--compare-full``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from kvpolicy.errors import InvalidConfigError, UnknownComponentError
from kvpolicy.types import Budget


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="shipped model name (kvpolicy.models.MODELS)")
    parser.add_argument(
        "--policy",
        default="streaming_llm",
        help="preset name, a JSON file of a PolicyConfig, or a saved policy .safetensors (default: streaming_llm)",
    )
    parser.add_argument("--budget", default=None, help="tokens kept per head: 512, a ratio 0.25, or 25%%")
    parser.add_argument("--sinks", type=int, default=None, help="attention-sink tokens never evicted")
    parser.add_argument("--recent", type=int, default=None, help="newest tokens never evicted")
    parser.add_argument("--prompt-file", type=Path, default=None, help="use this text as the prompt (no needle check)")
    parser.add_argument("--context-tokens", type=int, default=2000, help="haystack length of the needle prompt")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in the haystack, 0..1")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk-size", type=int, default=None, help="prefill in chunks, evicting between them")
    parser.add_argument("--compare-full", action="store_true", help="also run the full cache and print both")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse values argparse can read but kvpolicy cannot use, before any model is loaded."""
    from kvpolicy.models import MODELS

    if args.model not in MODELS:
        raise UnknownComponentError("shipped model", args.model, MODELS)
    if args.max_new_tokens < 1:
        raise InvalidConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.prefill_chunk_size is not None and args.prefill_chunk_size < 1:
        raise InvalidConfigError(
            f"--prefill-chunk-size must be at least 1 token (leave it out to prefill in one pass), "
            f"got {args.prefill_chunk_size}"
        )
    if args.context_tokens < 1:
        raise InvalidConfigError(f"--context-tokens must be at least 1, got {args.context_tokens}")
    if not (math.isfinite(args.depth) and 0.0 <= args.depth <= 1.0):
        raise InvalidConfigError(f"--depth must be between 0 and 1, got {args.depth}")
    for option in ("sinks", "recent"):
        value = getattr(args, option)
        if value is not None and value < 0:
            raise InvalidConfigError(f"--{option} must be >= 0, got {value}")
    if args.prompt_file is not None and not args.prompt_file.is_file():
        raise InvalidConfigError(f"prompt file {args.prompt_file} does not exist")


def prepare(args: argparse.Namespace):
    """Check every argument and build the policy: everything ``run`` does before loading a model,
    so a bad value ends in a named error in milliseconds, not after a model load."""
    check_arguments(args)
    return resolve_policy(args)


def resolve_policy(args: argparse.Namespace):
    """A Policy from a preset name, a PolicyConfig JSON file or a saved .safetensors policy (whose
    learned parameters and buffers it keeps), with the command line's budget and protection."""
    import kvpolicy

    overrides = {k: v for k, v in (("sinks", args.sinks), ("recent", args.recent)) if v is not None}
    if args.budget is not None:
        overrides["budget"] = Budget.parse(args.budget)
    return kvpolicy.build(str(args.policy), **overrides)


def _inputs(tokenizer, text_or_messages, chat: bool) -> dict[str, torch.Tensor]:
    if chat and getattr(tokenizer, "chat_template", None):
        return dict(
            tokenizer.apply_chat_template(
                text_or_messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        )
    text = text_or_messages if isinstance(text_or_messages, str) else text_or_messages[-1]["content"]
    return dict(tokenizer(text, return_tensors="pt"))


def _run_one(model, tokenizer, policy, inputs, args) -> tuple[str, object, float]:
    start = time.perf_counter()
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if args.prefill_chunk_size is not None:
        kwargs["prefill_chunk_size"] = args.prefill_chunk_size
    result = policy.generate(model, inputs, **kwargs)
    seconds = time.perf_counter() - start
    return tokenizer.decode(result.new_tokens[0], skip_special_tokens=True).strip(), result.report, seconds


def run(args: argparse.Namespace) -> int:
    import kvpolicy
    from kvpolicy.models import MODELS, load_model
    from kvpolicy.prompts import needle_prompt

    policy = prepare(args)
    model, tokenizer = load_model(args.model)
    policy.bind_tokenizer(tokenizer)
    chat = MODELS[args.model].chat
    needle = None
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidConfigError(f"prompt file {args.prompt_file} is not UTF-8 text: {exc}") from exc
        inputs = _inputs(tokenizer, [{"role": "user", "content": text}] if chat else text, chat)
    else:
        needle = needle_prompt(tokenizer, args.context_tokens, args.depth)
        inputs = _inputs(tokenizer, needle.messages() if chat else needle.plain(), chat)
    prompt_tokens = inputs["input_ids"].shape[1]
    where = f", needle at {needle.depth:.0%} depth" if needle else ""
    print(f"model {args.model}; prompt {prompt_tokens} tokens{where}")

    runs = [("policy", policy)]
    if args.compare_full:
        runs.append(("full cache", kvpolicy.build("full")))
    for label, each in runs:
        answer, report, seconds = _run_one(model, tokenizer, each, inputs, args)
        print(f"\n[{label}] {each!r}")
        print(f"  answer: {answer}")
        if needle is not None:
            print(f"  needle found: {'yes' if needle.found(answer) else 'no'}")
        print(f"  cache: {report.summary()}")
        for note in report.notes:
            print(f"  note: {note}")
        print(f"  time: {seconds:.1f} s ({prompt_tokens} prompt tokens, up to {args.max_new_tokens} new)")
    return 0
