"""``python -m kvpolicy.vision``: train the digit-video model, or evaluate every preset on it.

python -m kvpolicy.vision train --minutes 14            # writes the shipped weights (kvpolicy/vision/data)
python -m kvpolicy.vision check --items 200             # full cache vs the asked frame hidden
python -m kvpolicy.vision curves --out docs/vision      # every preset at several budgets (records + table)
"""

from __future__ import annotations

import argparse
import json
import sys

from kvpolicy.errors import KVPolicyError
from kvpolicy.vision import require_vision_extra


def _train(args: argparse.Namespace) -> int:
    import torch

    from kvpolicy.vision.train import train

    torch.set_num_threads(args.threads)
    metadata = train(minutes=args.minutes, seed=args.seed, eval_items=args.items, out=args.out)
    print(json.dumps(metadata, indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    from kvpolicy.vision.evaluate import ablation_table

    print(ablation_table(items=args.items))
    return 0


def _curves(args: argparse.Namespace) -> int:
    from kvpolicy.vision.curves import run_curves

    run_curves(args.out, items=args.items, budgets=tuple(args.budgets), presets=args.presets)
    return 0


def parser() -> argparse.ArgumentParser:
    from kvpolicy.vision.model import SHIPPED

    top = argparse.ArgumentParser(prog="python -m kvpolicy.vision", description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the digit-video model on this CPU")
    train.add_argument("--minutes", type=float, default=14.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--items", type=int, default=200, help="held-out videos for the final accuracy")
    train.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared CPU)")
    train.add_argument("--out", default=str(SHIPPED))
    train.set_defaults(run=_train)
    check = commands.add_parser("check", help="full cache, and the asked frame hidden or swapped")
    check.add_argument("--items", type=int, default=200)
    check.set_defaults(run=_check)
    curves = commands.add_parser("curves", help="accuracy vs cache kept for every preset")
    curves.add_argument("--out", default="docs/vision")
    curves.add_argument("--items", type=int, default=200)
    curves.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.125, 0.25, 0.5])
    curves.add_argument("--presets", nargs="*", default=None, help="default: every registered preset")
    curves.set_defaults(run=_curves)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        require_vision_extra()
        return args.run(args)
    except KVPolicyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
