"""Where to start the self-sized memory's bias: quantiles of KVzip's score on train items.

`threshold.json` evolves BAM's read-out and bias ``b_s`` with NAMM's ``threshold`` selector,
starting from KVzip's ranking (read-out one-hot on the log reconstruction attention). A token
is kept when ``log(r) + b_s >= 0``, so a bias of ``-q`` keeps the tokens above the score's
quantile ``q``: this prints those quantiles, over every (layer, KV head, unprotected token) of
``multikey-shared`` train items (context-first: the context alone), so the start keeps a chosen
share of the cache. ``threshold.json`` starts at ``b_s = 5.15``, the 0.80 quantile's negative:
about 20 % of the cache, between the 12.5 % and 25 % of the fixed-budget tables.

    python examples/namm-context-first/threshold_start.py --seeds 0 4 --length 4096

``--save BIAS PATH`` writes that start, untrained, at another bias: KVzip's score with one
global threshold for every layer and KV head — the control that says how much of an evolved
self-sized memory's result comes from sizing each head by KVzip's score alone (the `kvzip`
preset shares a fixed budget within each layer).

    python examples/namm-context-first/threshold_start.py --save 3.9 kvzip-threshold-3.9.safetensors
"""

from __future__ import annotations

import argparse

import torch

import kvpolicy
from kvpolicy.eval.prompting import encode
from kvpolicy.eval.tasks import make_item
from kvpolicy.integrations.hf.transfer import model_record
from kvpolicy.models import load_model
from kvpolicy_plugins.selectors import TopKSelector
from kvpolicy_plugins.stft_reconstruction import kvzip_equivalent, self_sized_start

QUANTILES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9)


class RecordingTopK(TopKSelector):
    """KVzip's selection, recording the scores of the tokens it may evict."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def select(self, scores, protected, budget, view):
        self.seen.append(scores.float()[~protected].flatten())
        return super().select(scores, protected, budget, view)


def save_start(bias: float, path: str) -> None:
    """`threshold.json`'s start (`self_sized_start`) at ``b_s = bias``, signed and saved for
    `kvpolicy compare --policy PATH`."""
    policy = self_sized_start(bias)
    policy.save(path, made_for=model_record(load_model("smollm2-135m-instruct")[0]))
    print(f"wrote {path}: KVzip's score, threshold per KV head at b_s = {bias}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--save", nargs=2, metavar=("BIAS", "PATH"), help="write the untrained start at BIAS and stop")
    args = parser.parse_args()
    if args.save:
        save_start(float(args.save[0]), args.save[1])
        return
    model, tokenizer = load_model("smollm2-135m-instruct")
    start = kvzip_equivalent("12.5%")
    recorder = RecordingTopK(start.selector.config)
    policy = kvpolicy.Policy(
        start.extractor, start.scorer, recorder, schedule=start.schedule, protect=start.protect, budget=start.budget
    )
    policy.bind_tokenizer(tokenizer)
    for seed in args.seeds:
        encoded = encode(make_item("multikey-shared", "train", seed, args.length), tokenizer)
        with torch.inference_mode():
            policy.generate(model, encoded.prompt_ids, context_end=encoded.context_tokens, max_new_tokens=1)
    scores = torch.cat(recorder.seen)
    sample = scores[torch.randperm(len(scores), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    print(f"{len(scores)} scores from {len(args.seeds)} items at {args.length} tokens")
    for q in QUANTILES:
        print(
            f"quantile {q:.3f}: {float(torch.quantile(sample, q)):+.3f}  (b_s = {-float(torch.quantile(sample, q)):.2f} keeps ≈ {1 - q:.1%})"
        )


if __name__ == "__main__":
    main()
