"""Answering digit-video questions through an evicting cache, and reading which frames it kept.

A batch of videos is prefilled as a user streams a video into a vision-language model: chunks of
``chunk_frames`` frames, each one forward call of the attached `LlavaForConditionalGeneration`
with the chunk's token ids and its frames' ``pixel_values`` on the handle's cache, the policy's
eviction pass between calls (its schedule decides when; ``after_prefill`` fires after the last
chunk). The compressed video is then sealed and the question appended: the answer is the digit
token with the highest logit. So the policy decides what the model remembers of the video before
it knows the question — the setting of the paper's video evaluation.

What the cache holds after the video is read directly from it: for every evicting layer and KV
head, which positions survived, hence the share of each frame's 16 image tokens kept
(`kept_per_frame`) and of the video's tokens (`kept_fraction`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from kvpolicy.errors import InvalidConfigError
from kvpolicy.integrations.hf.generate import cache_keyword
from kvpolicy.vision import task

DEFAULT_CHUNK_FRAMES = 8  # 128 image tokens a forward call


@attrs.frozen(eq=False)
class BatchAnswers:
    """One batch of videos through one policy: per video the predicted digit, the share of the
    video's cache kept (over evicting layers and heads; 1.0 with nothing evicted) and the share of
    each frame's image tokens kept ``[videos, frames]``."""

    predicted: tuple[int, ...]
    kept_fraction: tuple[float, ...]
    kept_per_frame: torch.Tensor
    evicting_layers: tuple[int, ...]


def _chunks(frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_frames, frames)) for start in range(0, frames, chunk_frames)]


def _kept_positions(cache: Any, layers: Sequence[int], videos: int, video_tokens: int) -> torch.Tensor:
    """``[videos, video_tokens]``: the share of (layer, KV head) pairs whose cache holds each position."""
    shares = [cache.layers[index].held_share(0, video_tokens) for index in layers]
    return torch.stack(shares).mean(0) if shares else torch.zeros(videos, video_tokens)


@torch.no_grad()
def answer_batch(
    model: torch.nn.Module, policy: Any, videos: Sequence[task.DigitVideo], chunk_frames: int = DEFAULT_CHUNK_FRAMES
) -> BatchAnswers:
    """Stream ``videos`` (same length) into ``model`` with ``policy`` attached, then ask each its question."""
    frames = videos[0].frames
    if any(video.frames != frames for video in videos):
        raise InvalidConfigError("videos of one batch must have the same number of frames")
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise InvalidConfigError(f"chunk_frames must be a whole number >= 1, got {chunk_frames!r}")
    ids = torch.cat([video.video_ids() for video in videos])
    pixels = torch.stack([video.pixel_values for video in videos])  # [videos, frames, 1, 16, 16]
    keyword = cache_keyword(model)
    with policy.attach(model) as handle:
        cache = handle.cache
        cache.prompt_end = ids.shape[1]  # the video is the prompt: after_prefill fires after its last chunk
        for start, stop in _chunks(frames, chunk_frames):
            first = 0 if start == 0 else 1 + start * task.TOKENS_PER_FRAME
            last = 1 + stop * task.TOKENS_PER_FRAME
            chunk_pixels = pixels[:, start:stop].flatten(0, 1)
            model(input_ids=ids[:, first:last], pixel_values=chunk_pixels, use_cache=True, **{keyword: cache})
        layers = handle.report().evicting_layers
        managed = layers or tuple(i for i, layer in enumerate(cache.layers) if hasattr(layer, "positions"))
        kept = _kept_positions(cache, managed, len(videos), ids.shape[1])
        handle.seal()
        question = torch.cat([video.question_ids() for video in videos])
        logits = model(input_ids=question, use_cache=True, **{keyword: cache}).logits[:, -1]
    predicted = logits[:, task.DIGIT0 : task.DIGIT0 + 10].argmax(-1)
    per_frame = kept[:, 1:].reshape(len(videos), frames, task.TOKENS_PER_FRAME).mean(-1)
    return BatchAnswers(
        predicted=tuple(int(p) for p in predicted),
        kept_fraction=tuple(float(k) for k in kept.mean(-1)),
        kept_per_frame=per_frame,
        evicting_layers=tuple(layers),
    )


@torch.no_grad()
def bare_answers(model: torch.nn.Module, videos: Sequence[task.DigitVideo]) -> list[int]:
    """The model's answers with no policy: the whole prompt in one forward call."""
    answers = []
    for video in videos:
        logits = model(input_ids=video.input_ids(), pixel_values=video.pixel_values).logits[0, -1]
        answers.append(int(logits[task.DIGIT0 : task.DIGIT0 + 10].argmax()))
    return answers


def ablation(model: torch.nn.Module, items: int = 200, seed: int = 1) -> dict[str, float]:
    """Does the task need the asked frame? Accuracy of the bare model on ``items`` held-out videos
    as they are, with the asked frame blanked, and with another frame blanked (the control); and of
    the full cache streamed chunk by chunk through an attached keep-all policy."""
    import kvpolicy

    videos = task.test_videos(items, seed=seed)
    others = [(video.asked + 1 + (i % (video.frames - 1))) % video.frames for i, video in enumerate(videos)]
    answers = [video.answer for video in videos]

    def accuracy(predicted: Sequence[int]) -> float:
        return sum(p == a for p, a in zip(predicted, answers, strict=True)) / items

    bare = bare_answers(model, videos)
    streamed: list[int] = []
    for start in range(0, items, 25):
        streamed += answer_batch(model, kvpolicy.build("full"), videos[start : start + 25]).predicted
    return {
        "items": items,
        "bare": accuracy(bare),
        "full_cache_streamed": accuracy(streamed),
        "streamed_equals_bare": sum(s == b for s, b in zip(streamed, bare, strict=True)) / items,
        "asked_frame_blanked": accuracy(bare_answers(model, [v.without_frame(v.asked) for v in videos])),
        "other_frame_blanked": accuracy(
            bare_answers(model, [v.without_frame(o) for v, o in zip(videos, others, strict=True)])
        ),
        "chance": 0.1,
    }


def ablation_table(model_path: Any = None, items: int = 200) -> str:
    from kvpolicy.vision import model as vision_model

    torch.set_num_threads(1)
    result = ablation(vision_model.load(model_path), items)
    rows = [
        ("bare model, whole prompt in one forward", result["bare"]),
        ("full cache, streamed 8 frames a forward (keep-all policy attached)", result["full_cache_streamed"]),
        ("asked frame blanked", result["asked_frame_blanked"]),
        ("another frame blanked (control)", result["other_frame_blanked"]),
        ("chance", result["chance"]),
    ]
    lines = [f"{items} held-out videos of {task.DEFAULT_FRAMES} frames", "", "| run | accuracy |", "|---|---|"]
    lines += [f"| {name} | {100 * value:.1f}% |" for name, value in rows]
    lines.append(f"\nstreamed and bare answers agree on {100 * result['streamed_equals_bare']:.1f}% of videos")
    return "\n".join(lines)
