"""Four questions of different lengths as one left-padded batch through a policy on SmolLM2.

Each row is numbered, scheduled and budgeted on its own tokens; the script prints every row's
answer and cache report, then reruns each row alone (one prefill call, as the batch's) and says
for how many tokens its answer is the same. A batched float32 kernel rounds differently from a
batch of one, so a policy whose ranking has near-ties can keep another token; ``--float64``
removes that.

    python examples/padded_batch.py                       # h2o at 25%
    python examples/padded_batch.py --float64
    python examples/padded_batch.py --policy namm-bam-smollm2
"""

from __future__ import annotations

import argparse

import torch

import kvpolicy
from kvpolicy.data import essays
from kvpolicy.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="h2o")
    parser.add_argument("--budget", default="25%", help="budget override ('' for the preset's own)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--float64", action="store_true", help="run the model in float64")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m-instruct")
    if args.float64:
        model = model.double()
    policy = kvpolicy.build(args.policy, **({"budget": args.budget} if args.budget else {}))
    words = essays()[0][1].split()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": " ".join(words[:n]) + "\n\nIn one sentence, what is this text about?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for n in (700, 300, 120, 450)
    ]
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # some tokenizers have none
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        result = policy.generate(model, batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"{policy!r}\nbatch: {result.report.summary()}\n")
    for row in range(len(prompts)):
        length = int(batch["attention_mask"][row].sum())
        alone_ids = batch["input_ids"][row : row + 1, -length:]
        with torch.inference_mode():
            alone = policy.generate(model, alone_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        answer = tokenizer.decode(result.new_tokens[row], skip_special_tokens=True).strip()
        mine, theirs = result.new_tokens[row, : alone.new_tokens.shape[1]], alone.new_tokens[0]
        differ = (mine != theirs).nonzero()
        same = f"all {len(theirs)} tokens" if not len(differ) else f"the first {int(differ[0])} of {len(theirs)} tokens"
        print(f"row {row}: {length} prompt tokens, {alone.report.summary()}")
        print(f"  answer: {answer!r}\n  same as the row run alone: {same}")


if __name__ == "__main__":
    main()
