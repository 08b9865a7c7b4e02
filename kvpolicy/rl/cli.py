"""``python -m kvpolicy.rl``: make the data and the model, evaluate policies, or a smoke run.

python -m kvpolicy.rl make --out runs/dt            # ARS controllers, data, training (resumable)
python -m kvpolicy.rl evaluate --out runs/dt-eval   # every policy on the shipped model (resumable)
python -m kvpolicy.rl probe --out runs/dt           # does the model use the cue? (teacher forced)
python -m kvpolicy.rl smoke --out /tmp/dt-smoke     # the whole pipeline, tiny, in seconds
(``--env hopper`` on make / forget / smoke: the cue task on Hopper instead of HalfCheetah)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import attrs
import torch

from kvpolicy.atomic import atomic_write_text
from kvpolicy.errors import KVPolicyError
from kvpolicy.rl import require_rl_extra

#: the Decision Transformer shipped with kvpolicy (made by ``python -m kvpolicy.rl make``)
SHIPPED_MODEL = Path(__file__).parent / "data" / "decision_transformer.safetensors"
#: the one trained on the cue task's Hopper (``make --env hopper``)
SHIPPED_HOPPER_MODEL = Path(__file__).parent / "data" / "decision_transformer_hopper.safetensors"


def model_config(env: str = "halfcheetah", **shape):
    """The Decision Transformer's shapes for body ``env``: its state (with cue and flag) and action
    sizes, the rest `DecisionTransformerConfig`'s defaults or ``shape``."""
    from kvpolicy.rl.env_specs import env_spec
    from kvpolicy.rl.model import DecisionTransformerConfig

    spec = env_spec(env)
    return DecisionTransformerConfig(state_dim=spec.base_obs + 2, act_dim=spec.actions, **shape)


def smoke_configs(env: str = "halfcheetah"):
    """Tiny task, data, model and training: the pipeline end to end in seconds (CI)."""
    from kvpolicy.rl.controllers import ArsConfig
    from kvpolicy.rl.data import DataConfig
    from kvpolicy.rl.envs import CueTaskConfig
    from kvpolicy.rl.train import TrainConfig

    task = CueTaskConfig(env=env, horizon=60, cue_start=3, cue_steps=3, final_steps=15)
    data = DataConfig(
        task=task,
        forward=ArsConfig(iterations=2, directions=2, top=1, episode_steps=60, seed=0),
        backward=ArsConfig(iterations=2, directions=2, top=1, episode_steps=15, seed=1),
        warmup=10,
        medium_fraction=0.5,
        episodes={"random": 2, "medium": 2, "expert": 2},
        min_main_return=None,  # two ARS iterations do not run yet
    )
    model = model_config(env, hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32, max_timesteps=64)
    train = TrainConfig(
        updates=3, batch=2, window=8, prefix=4, full_every=2, full_batch=1, warmup=1, checkpoint_every=2
    )
    return data, model, train


def _make(args: argparse.Namespace) -> int:
    from kvpolicy.rl.data import data_config, make_dataset
    from kvpolicy.rl.train import TrainConfig, train

    out = Path(args.out)
    if args.smoke:
        data, shapes, train_config = smoke_configs(args.env)
    else:
        data, shapes, train_config = data_config(args.env), model_config(args.env), TrainConfig()
        if args.updates is not None:
            train_config = attrs.evolve(train_config, updates=args.updates)
    began = time.perf_counter()
    dataset = make_dataset(data, out, log=print)
    print(f"data ready: {dataset} ({time.perf_counter() - began:.0f} s)", flush=True)
    train(dataset, out, data.task, shapes, train_config, log=lambda s: print(s, flush=True))
    print(f"model: {out / 'decision_transformer.safetensors'} ({time.perf_counter() - began:.0f} s in all)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from kvpolicy.rl.control_eval import ControlVariant, default_variants, evaluate_control, markdown_table, plot
    from kvpolicy.rl.model import DecisionTransformer
    from kvpolicy.rl.rollout import task_config

    model = DecisionTransformer.load(args.model)
    variants = [ControlVariant.parse(p) for p in args.policy] if args.policy else default_variants()
    out = Path(args.out)
    batch = {"batch": args.batch} if args.batch is not None else {}
    summary = evaluate_control(
        model, variants, args.seeds, out, steps=args.steps, log=lambda s: print(s, flush=True), **batch
    )
    table = markdown_table(summary, task_config(model).final_start)
    atomic_write_text(out / "summary.md", table)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    plot(summary, out / "return_vs_cache.png", "Decision Transformer on the cue task")
    print(table)
    return 0


def _forget(args: argparse.Namespace) -> int:
    """The expert controller with and without its memory of the cue: what forgetting costs."""
    import numpy as np

    from kvpolicy.rl.controllers import CueController
    from kvpolicy.rl.data import collect, data_config, final_phase_returns, make_controllers

    config = data_config(args.env)
    expert = make_controllers(config, Path(args.out) / "controllers.npz")["expert"]
    references = _references(args, config.task.env)
    for follow in (True, False):
        controller = CueController(expert.forward, expert.backward, follow_cue=follow)
        data = collect(config.task, controller, args.episodes, seed=777, min_main_return=config.min_main_return)
        returns = data["rewards"].sum(axis=1)
        finals = final_phase_returns(config.task, data["rewards"])
        right = int((finals > 0).sum())
        if references is None:
            score = f"return {returns.mean():.1f} ± {returns.std(ddof=1) / np.sqrt(len(returns)):.1f}"
        else:
            scores = 100.0 * (returns - references["random"]) / (references["expert"] - references["random"])
            score = f"normalised {scores.mean():.1f} ± {scores.std(ddof=1) / np.sqrt(len(scores)):.1f}"
        print(
            f"expert, {'remembers' if follow else 'ignores'} the cue: {score}, final phase right {right}/{len(returns)}"
            + ("" if references is not None else f" (final-phase return {finals.mean():.1f})"),
            flush=True,
        )
    return 0


def _references(args: argparse.Namespace, env: str) -> dict[str, float] | None:
    """Random and expert reference returns for ``env``: those of ``--model`` (default: the model
    shipped for ``env``) if it was trained on ``env``, else those of ``--out``'s data set, else None."""
    import numpy as np

    from kvpolicy.rl.model import DecisionTransformer
    from kvpolicy.rl.train import reference_returns

    model = args.model or (SHIPPED_HOPPER_MODEL if env == "hopper" else SHIPPED_MODEL)
    if Path(model).is_file():
        metadata = DecisionTransformer.load(model).metadata
        if metadata["task"].get("env", "halfcheetah") == env:
            return metadata["reference_returns"]
    path = Path(args.out) / "dataset.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        return reference_returns(dict(data))


def _probe(args: argparse.Namespace) -> int:
    """Teacher forced on the expert data: the final phase's first actions with and without the cue."""
    import numpy as np

    from kvpolicy.rl.model import DecisionTransformer
    from kvpolicy.rl.rollout import task_config
    from kvpolicy.rl.train import cue_probe

    model = DecisionTransformer.load(args.model)
    path = Path(args.out) / "dataset.npz"
    if not path.is_file():
        raise KVPolicyError(f"no data set at {path}: run `python -m kvpolicy.rl make --out {args.out}` first")
    with np.load(path) as data:
        errors = cue_probe(model, dict(data), task_config(model), episodes=args.episodes)
    print(
        f"final phase's first actions, mean squared error: with the cue {errors['mse_with_cue']:.4f}, "
        f"cue hidden {errors['mse_cue_hidden']:.4f}"
    )
    return 0


def _env_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", default="halfcheetah", help="the cue task's body: halfcheetah (default) or hopper")


def _smoke(args: argparse.Namespace) -> int:
    args.smoke = True
    _make(args)
    args.model = str(Path(args.out) / "decision_transformer.safetensors")
    args.policy = ["full", "full:hide-cue", "h2o@16", "tova@16", "namm-bam-smollm2@25%"]
    args.seeds = 2
    args.batch = 2
    args.steps = None
    return _evaluate(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpolicy.rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="train controllers, generate data, train the Decision Transformer")
    make.add_argument("--out", required=True)
    make.add_argument("--smoke", action="store_true", help="tiny everything (seconds)")
    make.add_argument("--updates", type=int, help="training updates (default: TrainConfig's)")
    _env_option(make)
    make.set_defaults(run=_make)
    ev = sub.add_parser("evaluate", help="normalised return against cache kept for every policy")
    ev.add_argument("--out", required=True)
    ev.add_argument("--model", default=str(SHIPPED_MODEL))
    ev.add_argument(
        "--policy",
        action="append",
        help="preset, preset@budget (256, 25%%), either + ':hide-cue' (the model never sees the cue); repeat; "
        "default: all",
    )
    ev.add_argument(
        "--seeds", "--episodes", dest="seeds", type=int, default=4, help="episodes per policy (cues alternate)"
    )
    ev.add_argument(
        "--batch", type=int, help="episodes run together as one batch (default: control_eval.DEFAULT_BATCH, 10)"
    )
    ev.add_argument("--steps", type=int, help="cut episodes short (debugging)")
    ev.set_defaults(run=_evaluate)
    forget = sub.add_parser("forget", help="the expert controller with and without its memory of the cue")
    forget.add_argument("--out", required=True, help="the folder of `make` (its controllers.npz)")
    forget.add_argument("--model", help="whose reference returns normalise (default: the model shipped for --env)")
    forget.add_argument("--episodes", type=int, default=8)
    _env_option(forget)
    forget.set_defaults(run=_forget)
    probe = sub.add_parser("probe", help="does the model use the cue? (teacher forced, seconds)")
    probe.add_argument("--out", required=True, help="the folder of `make` (its dataset.npz)")
    probe.add_argument("--model", default=str(SHIPPED_MODEL))
    probe.add_argument("--episodes", type=int, default=16, help="expert episodes (cues alternate)")
    probe.set_defaults(run=_probe)
    smoke = sub.add_parser("smoke", help="make + evaluate, tiny, in seconds")
    smoke.add_argument("--out", required=True)
    _env_option(smoke)
    smoke.set_defaults(run=_smoke)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        require_rl_extra()
        return int(args.run(args) or 0)
    except KVPolicyError as exc:
        print(f"kvpolicy.rl: error: {exc}", file=sys.stderr)
        return 2
