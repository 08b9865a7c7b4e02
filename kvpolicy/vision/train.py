"""Training the digit-video model on a CPU in minutes: ``python -m kvpolicy.vision train``.

Two stages, as LLaVA is made from a trained vision encoder. Stage 1 (`pretrain_tower`, 8 % of the
time): the CLIP tower alone learns to read a frame's three digits at every image token, through a
linear probe that is dropped afterwards. Stage 2: the tower frozen, the projector and the language model learn the
task. A training sequence is a video followed by several questions with their answers
(``… [Q] [ka] va [Q] [kb] vb …``); the loss is the cross-entropy of each answer, read at the key
token before it. Videos start at two frames and grow towards the evaluated 96 as the loss falls
(`Curriculum`). The run stops after ``minutes`` of wall time, the learning rate on a cosine over
it, then measures full-cache accuracy on held-out videos (`kvpolicy.vision.task.test_videos`) and
saves the weights with how they were made (`kvpolicy.vision.model.save`).
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

QUESTIONS_PER_VIDEO = 24  # answers per video: the video's cost dominates a step, questions are cheap
TOWER_SHARE = 0.08  # of the time: stage 1, the vision tower alone


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
    """The longest video of a step grows by half whenever the mean answer loss of the last
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
                self.longest = min(task.DEFAULT_FRAMES, math.ceil(self.longest * 1.5))
            self._losses = []


def frame_batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [size, 1, 16, 16], digits [size, 3])``: random frames and their key's two digits and value."""
    keys = rng.integers(0, task.KEYS, size=size)
    values = rng.integers(0, 10, size=size)
    pixels = torch.stack([task.render_frame(rng, "train", int(k), int(v)) for k, v in zip(keys, values, strict=True)])
    return pixels, torch.as_tensor(np.stack([keys // 10, keys % 10, values], axis=1))


def pretrain_tower(
    model: torch.nn.Module, seconds: float, rng: np.random.Generator, lr: float, log: Any = print
) -> float:
    """Stage 1, as a vision-language model starts from a trained vision encoder: the CLIP tower
    learns to read a frame's three digits (a linear probe on each image token, dropped
    afterwards; every image token reads the whole frame, so the language model can match a key on
    any of them). Returns the probe's accuracy on its last batches."""
    tower = model.model.vision_tower
    probe = torch.nn.Linear(tower.config.hidden_size, 30)
    optimizer = torch.optim.AdamW([*tower.parameters(), *probe.parameters()], lr=lr, weight_decay=0.01)
    start, step, recent = time.monotonic(), 0, []
    while time.monotonic() - start < seconds:
        pixels, digits = frame_batch(rng, 128)
        tokens = tower(pixel_values=pixels).last_hidden_state[:, 1:]  # the image tokens the LLaVA reads
        logits = probe(tokens).view(*tokens.shape[:2], 3, 10)  # every token reads the whole frame
        every = digits[:, None].expand(-1, tokens.shape[1], -1)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), every.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recent = (recent + [float((logits.argmax(-1) == every).float().mean())])[-20:]
        step += 1
        if step % 50 == 0:
            log(f"tower step {step}  loss {loss.item():.3f}  digits read {np.mean(recent):.3f}")
    return float(np.mean(recent))


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
    tower_accuracy = pretrain_tower(model, TOWER_SHARE * minutes * 60.0, rng, lr, log)
    # Stage 2, as LLaVA trains: the tower stays frozen, the projector and language model learn the task.
    trained = [p for name, p in model.named_parameters() if not name.startswith("model.vision_tower.")]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    start = time.monotonic()
    budget = (1 - TOWER_SHARE) * minutes * 60.0
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
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
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
        "tower_digits_read": round(tower_accuracy, 3),
        "minutes": minutes,
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
