"""Training the Decision Transformer on the offline data (teacher forcing).

What the cue task tests is reaching back across the whole episode, but a whole 1,000-step
episode is 3,000 tokens and costs about as much attention as a hundred short windows. So most
updates train on *cut* sequences: the episode's first ``prefix`` steps (they hold the cue) joined
to a window of ``window`` consecutive steps, each token at the position it has in a rollout
(RoPE over the absolute token index, `DecisionTransformer.forward`'s ``timesteps``). Half of the
windows (``onset_fraction``) cover the start of the final phase, where the cue decides the action;
every ``full_every``-th update trains on whole episodes instead, so the model also learns to act
over its full context. The loss is the mean squared error of every action, the final phase's
weighted up (``final_loss_weight``). The run checkpoints atomically every ``checkpoint_every``
updates and resumes from its checkpoint, so a killed run loses at most that much.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
import torch

from kvpolicy.atomic import atomic_path, atomic_write_text
from kvpolicy.errors import InvalidConfigError
from kvpolicy.rl.data import KINDS
from kvpolicy.rl.envs import CueTaskConfig
from kvpolicy.rl.model import DecisionTransformer, DecisionTransformerConfig


@attrs.frozen
class TrainConfig:
    """Optimisation settings (defaults: what `python -m kvpolicy.rl make` trains)."""

    updates: int = 1500
    batch: int = 16  # cut sequences per update
    window: int | None = 64  # steps per window after the prefix; None: whole episodes (full_batch) always
    prefix: int = 32  # first steps of the episode in every cut sequence (the cue is at 20..29)
    onset_fraction: float = 0.5  # share of windows that cover the final phase's first step
    full_every: int = 8  # every this-many updates: whole episodes instead (0: never)
    full_batch: int = 2  # whole episodes per such update
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 1e-4
    final_loss_weight: float = 5.0
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.updates < 1 or self.batch < 1 or self.full_batch < 1 or self.checkpoint_every < 1:
            raise InvalidConfigError("TrainConfig.updates, batch, full_batch and checkpoint_every must be >= 1")
        if self.window is not None and (self.window < 1 or self.prefix < 0):
            raise InvalidConfigError(
                f"TrainConfig.window must be >= 1 and prefix >= 0, got {self.window}, {self.prefix}"
            )
        if not 0.0 <= self.onset_fraction <= 1.0 or self.full_every < 0:
            raise InvalidConfigError("TrainConfig.onset_fraction must be in [0, 1] and full_every >= 0")


def sample_timesteps(
    config: TrainConfig, update: int, steps: int, final_start: int, generator: torch.Generator
) -> torch.Tensor | None:
    """The episode steps ``[batch, length]`` one update trains on, or None for whole episodes.

    A cut sequence is steps ``0 .. prefix-1`` then ``window`` consecutive steps starting at or
    after ``prefix``; with probability ``onset_fraction`` the window holds step ``final_start``.
    """
    if config.window is None or (config.full_every and (update + 1) % config.full_every == 0):
        return None
    prefix = min(config.prefix, steps - 1)
    window = min(config.window, steps - prefix)
    low, high = prefix, steps - window  # window starts, inclusive
    onset_low, onset_high = max(low, final_start - window + 1), min(high, final_start)
    anywhere = torch.randint(low, high + 1, (config.batch,), generator=generator)
    if onset_low <= onset_high:
        at_onset = torch.randint(onset_low, onset_high + 1, (config.batch,), generator=generator)
        pick = torch.rand(config.batch, generator=generator) < config.onset_fraction
        anywhere = torch.where(pick, at_onset, anywhere)
    cut = anywhere.unsqueeze(1) + torch.arange(window)
    return torch.cat([torch.arange(prefix).expand(config.batch, prefix), cut], dim=1)


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """``rewards [episodes, steps]`` → the return still to come at each step (inclusive)."""
    return np.flip(np.cumsum(np.flip(rewards, axis=1), axis=1), axis=1).copy()


def reference_returns(dataset: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean episode return of the random and the expert data: normalised score 0 and 100."""
    returns = dataset["rewards"].sum(axis=1)
    return {kind: float(returns[dataset["kinds"] == KINDS.index(kind)].mean()) for kind in ("random", "expert")}


def normalised(episode_return: float, references: dict[str, float]) -> float:
    """100 · (return − random) ÷ (expert − random)."""
    return 100.0 * (episode_return - references["random"]) / (references["expert"] - references["random"])


def _logged_update(line: str) -> int:
    try:
        return int(json.loads(line)["update"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn line: drop it


def _lr_factor(update: int, config: TrainConfig) -> float:
    if update < config.warmup:
        return (update + 1) / config.warmup
    progress = (update - config.warmup) / max(1, config.updates - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    dataset_path: Path,
    out: Path,
    task: CueTaskConfig,
    model_config: DecisionTransformerConfig,
    config: TrainConfig,
    log: Callable[[str], None] = print,
) -> DecisionTransformer:
    """Train (resuming from ``out/train_state.pt`` if present) and save ``out/decision_transformer.safetensors``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with np.load(dataset_path) as data:
        dataset = dict(data)
    states = torch.as_tensor(dataset["states"])
    actions = torch.as_tensor(dataset["actions"])
    rtg = torch.as_tensor(returns_to_go(dataset["rewards"]))
    episodes, steps = rtg.shape
    if model_config.max_timesteps < steps:
        raise InvalidConfigError(f"max_timesteps {model_config.max_timesteps} < the data's {steps} steps per episode")
    references = reference_returns(dataset)
    metadata = {
        "task": task.to_dict(),
        "target_return": references["expert"],
        "reference_returns": references,
        "train": attrs.asdict(config),
        "episodes": {kind: int((dataset["kinds"] == i).sum()) for i, kind in enumerate(KINDS)},
    }
    torch.manual_seed(config.seed)
    model = DecisionTransformer(model_config, metadata)
    flat = dataset["states"].reshape(-1, dataset["states"].shape[-1])
    model.set_state_normalisation(flat.mean(axis=0), flat.std(axis=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    weights = torch.ones(steps)
    weights[task.final_start :] = config.final_loss_weight
    generator = torch.Generator().manual_seed(config.seed)
    start = 0
    state_path = out / "train_state.pt"
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        start = saved["update"]
        log(f"resuming at update {start}")
    history = out / "train_log.jsonl"
    if history.is_file():  # keep the log in step with the checkpoint: drop lines of updates it lost
        lines = [line for line in history.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if _logged_update(line) <= start]
        atomic_write_text(history, "".join(line + "\n" for line in kept))
    model.train()
    began = time.perf_counter()
    for update in range(start, config.updates):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(update, config)
        timesteps = sample_timesteps(config, update, steps, task.final_start, generator)
        if timesteps is None:
            batch = torch.randint(episodes, (config.full_batch,), generator=generator)
            timesteps = torch.arange(steps).expand(config.full_batch, steps)
            predicted = model(rtg[batch], states[batch], actions[batch])
        else:
            batch = torch.randint(episodes, (config.batch,), generator=generator)
            rows = batch.unsqueeze(1)
            predicted = model(rtg[rows, timesteps], states[rows, timesteps], actions[rows, timesteps], timesteps)
        target = actions[batch.unsqueeze(1), timesteps]
        error = ((predicted - target) ** 2).mean(dim=-1)  # [batch, length]
        step_weights = weights[timesteps]
        loss = (error * step_weights).sum() / step_weights.sum()
        in_final = timesteps >= task.final_start
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        final_error = float(error[in_final].mean().detach()) if in_final.any() else float("nan")
        with open(history, "a", encoding="utf-8") as handle:
            handle.write(
                json.dumps(
                    {
                        "update": update + 1,
                        "loss": float(loss.detach()),
                        "final_mse": final_error,
                        "whole": timesteps.shape[1] == steps,
                    }
                )
                + "\n"
            )
        if (update + 1) % config.checkpoint_every == 0 or update + 1 == config.updates:
            with atomic_path(state_path) as tmp:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(),
                        "update": update + 1,
                    },
                    tmp,
                )
            log(
                f"update {update + 1}/{config.updates}: loss {float(loss.detach()):.4f}, final-phase mse {final_error:.4f} "
                f"({time.perf_counter() - began:.0f} s)"
            )
    model.eval()
    model.save(out / "decision_transformer.safetensors")
    atomic_write_text(out / "metadata.json", json.dumps(metadata, indent=2))
    return model


def cue_probe(
    model: DecisionTransformer,
    dataset: dict[str, np.ndarray],
    task: CueTaskConfig,
    *,
    episodes: int = 8,
    prefix: int = 32,
    window: int = 64,
) -> dict[str, float]:
    """How much the model's actions at the final phase's start depend on the cue (teacher forced).

    On the first ``episodes`` expert episodes (cues alternate), a cut sequence — the first
    ``prefix`` steps and ``window`` steps from ``window // 2`` before the final phase — is run
    twice: as recorded, and with the cue zeroed. Returns the mean squared error of the final-phase
    actions in both cases; a model that uses the cue does worse without it.
    """
    expert = np.flatnonzero(dataset["kinds"] == KINDS.index("expert"))[:episodes]
    start = task.final_start - window // 2
    timesteps = torch.cat([torch.arange(prefix), torch.arange(start, start + window)]).expand(len(expert), -1)
    rows = torch.as_tensor(expert).unsqueeze(1)
    states = torch.as_tensor(dataset["states"])[rows, timesteps]
    actions = torch.as_tensor(dataset["actions"])[rows, timesteps]
    rtg = torch.as_tensor(returns_to_go(dataset["rewards"]))[rows, timesteps]
    hidden = states.clone()
    hidden[..., task.cue_index] = 0.0
    final = timesteps[0] >= task.final_start
    errors = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for name, inputs in (("mse_with_cue", states), ("mse_cue_hidden", hidden)):
            predicted = model(rtg, inputs, actions, timesteps)
            errors[name] = float(((predicted - actions) ** 2)[:, final].mean())
    model.train(was_training)
    return errors
