"""Training the digit-video model on a CPU in minutes: ``python -m kvpolicy.vision train``.

A training sequence is a video followed by several questions with their answers
(``… [Q] [ka] va [Q] [kb] vb …``); the loss is the cross-entropy of each answer, read at the key
token before it. A video of one frame teaches the tower to read the value, two frames to tell
keys apart; the videos then grow towards the evaluated 96 frames as the loss falls (`Curriculum`). The run
stops after ``minutes`` of wall time with the learning rate on a cosine over that time, then
measures full-cache accuracy on held-out videos (`kvpolicy.vision.task.test_videos`) and saves
the weights with how they were made (`kvpolicy.vision.model.save`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpolicy.vision import model as vision_model
from kvpolicy.vision import task

QUESTIONS_PER_VIDEO = 8


def training_batch(
    rng: np.random.Generator, batch: int, frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [batch, tokens], pixel_values [batch × frames, 1, 16, 16], targets [batch, tokens])``;
    targets are -100 except at each answer."""
    ids, pixels, targets = [], [], []
    for _ in range(batch):
        video = task.draw_video(rng, "train", frames)
        tokens = task.video_ids(frames)[0].tolist()
        target = [-100] * len(tokens)
        for asked in rng.integers(0, frames, size=QUESTIONS_PER_VIDEO):
            answer = task.DIGIT0 + video.values[int(asked)]
            tokens += [task.QUESTION, task.KEY0 + video.keys[int(asked)], answer]
            target += [-100, -100, answer]
        ids.append(tokens)
        targets.append(target)
        pixels.append(video.pixel_values)
    return torch.tensor(ids), torch.cat(pixels), torch.tensor(targets)


def _batch_for(frames: int) -> int:
    """About 256 frames a batch: short videos come in large batches."""
    return max(2, min(32, 256 // frames))


class Curriculum:
    """The longest video of a step grows by a quarter whenever the mean answer loss of the last
    ``window`` steps falls under ``threshold``: a video of one or two frames teaches the tower to
    read the value and tell keys apart, longer ones to find one frame among many. Each step draws
    its length between half the longest and the longest."""

    def __init__(self, threshold: float = 0.5, window: int = 25) -> None:
        self.longest, self.threshold, self.window = 2, threshold, window
        self._losses: list[float] = []

    def draw(self, rng: np.random.Generator) -> int:
        return int(rng.integers(max(1, self.longest // 2), self.longest + 1))

    def record(self, loss: float) -> None:
        self._losses.append(loss)
        if len(self._losses) >= self.window:
            if np.mean(self._losses) < self.threshold and self.longest < task.DEFAULT_FRAMES:
                self.longest = min(task.DEFAULT_FRAMES, math.ceil(self.longest * 1.25))
            self._losses = []


@torch.no_grad()
def full_cache_accuracy(model: torch.nn.Module, items: int, frames: int = task.DEFAULT_FRAMES) -> float:
    """Share of held-out videos whose asked digit is the model's top digit token (whole prompt, one forward)."""
    correct = 0
    for video in task.test_videos(items, frames):
        logits = model(input_ids=video.input_ids(), pixel_values=video.pixel_values).logits[0, -1]
        correct += int(int(logits[task.DIGIT0 : task.DIGIT0 + 10].argmax()) == video.answer)
    return correct / items


def train(
    minutes: float = 14.0,
    seed: int = 0,
    lr: float = 3e-3,
    eval_items: int = 200,
    out: str | Path = vision_model.SHIPPED,
    log: Any = print,
) -> dict[str, Any]:
    """Train for ``minutes`` of wall time, save to ``out``; returns the saved metadata."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = vision_model.DigitVideoConfig()
    model = vision_model.build(config, seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start = time.monotonic()
    budget = minutes * 60.0
    step, recent = 0, []
    curriculum = Curriculum()
    while (elapsed := time.monotonic() - start) < budget:
        progress = elapsed / budget
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * progress))
        frames = curriculum.draw(rng)
        ids, pixels, targets = training_batch(rng, _batch_for(frames), frames)
        logits = model(input_ids=ids, pixel_values=pixels).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-20:]
        curriculum.record(loss.item())
        step += 1
        if step % 25 == 0:
            log(f"step {step}  {elapsed / 60:.1f} min  longest {curriculum.longest}  loss {np.mean(recent):.3f}")
    model.eval()
    accuracy = full_cache_accuracy(model, eval_items)
    metadata = {
        "steps": step,
        "longest_video_trained": curriculum.longest,
        "minutes": round((time.monotonic() - start) / 60, 2),
        "seed": seed,
        "lr": lr,
        "full_cache_accuracy": accuracy,
        "eval_items": eval_items,
        "frames": task.DEFAULT_FRAMES,
        "command": f"python -m kvpolicy.vision train --minutes {minutes} --seed {seed}",
    }
    vision_model.save(model, config, out, metadata)
    log(
        f"saved {out}: full-cache accuracy {accuracy:.3f} on {eval_items} held-out videos of {task.DEFAULT_FRAMES} frames"
    )
    return metadata
