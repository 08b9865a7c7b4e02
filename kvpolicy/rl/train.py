"""Training the Decision Transformer on the offline data (teacher forcing, whole episodes).

Every batch is whole 1,000-step episodes — 3,000 tokens — because what the cue task tests is
reaching back across the whole episode; cropped windows would never hold the cue and the final
phase together. The loss is the mean squared error of every action, the final phase's weighted
up (``final_loss_weight``): it is a fifth of the steps but the only part where the cue decides
the action. The run checkpoints atomically every ``checkpoint_every`` updates and resumes from
its checkpoint, so a killed run loses at most that much.
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
    """Optimisation settings (defaults: the shipped model)."""

    updates: int = 100
    batch: int = 4
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 1e-4
    final_loss_weight: float = 5.0
    grad_clip: float = 1.0
    checkpoint_every: int = 25
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.updates < 1 or self.batch < 1 or self.checkpoint_every < 1:
            raise InvalidConfigError("TrainConfig.updates, batch and checkpoint_every must be >= 1")


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
    weights = weights / weights.mean()
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
        batch = torch.randint(episodes, (config.batch,), generator=generator)
        predicted = model(rtg[batch], states[batch], actions[batch])
        error = ((predicted - actions[batch]) ** 2).mean(dim=-1)  # [batch, steps]
        loss = (error * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        final_error = float(error[:, task.final_start :].mean().detach())
        with open(history, "a", encoding="utf-8") as handle:
            handle.write(
                json.dumps({"update": update + 1, "loss": float(loss.detach()), "final_mse": final_error}) + "\n"
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
