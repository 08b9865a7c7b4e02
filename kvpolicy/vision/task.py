"""The digit-video task: many frames of handwritten digits, then a question about one frame.

Frames are built from scikit-learn's bundled 8×8 digit images (``sklearn.datasets.load_digits``:
1,797 images shipped inside the package, nothing downloaded). A frame is 16×16: its top half
writes a two-digit number (the frame's *key*, e.g. 73), its bottom-left quarter one more digit
(the frame's *value*), its bottom-right quarter is blank. A video is ``frames`` frames with
distinct keys; the question names one frame by a property of its content — the number in its top
half — and asks for its value: ``<bos> <img>×16 <img>×16 … [Q] [73]`` → the value's digit token.
Nothing but the question singles out the asked frame (no marker in the pixels or between frames),
and the video is redundant: every value digit appears in about a tenth of the frames, every key
digit in a fifth of the keys, so keeping a few frames — or frames showing the right digits
elsewhere — answers only by chance. With 96 frames the video is 1,537 tokens, 1,536 of them image
tokens (16 per frame: a 4×4 grid of 4×4-pixel patches).

Training and evaluation draw their digit images from disjoint parts of the digits
(`digit_images`), so an evaluated video shows handwriting the model never saw.
"""

from __future__ import annotations

import functools
import importlib.util

import attrs
import numpy as np
import torch

from kvpolicy.errors import InvalidConfigError, ModelUnavailableError

PAD, BOS, EOS = 0, 1, 2
DIGIT0 = 3  # the answer tokens: digit d is token DIGIT0 + d
QUESTION, IMAGE = 13, 14
KEY0 = 15  # the two-digit number n is token KEY0 + n
KEYS = 100
VOCAB = KEY0 + KEYS
IMAGE_SIZE = 16
TOKENS_PER_FRAME = 16  # a 4×4 grid of 4×4-pixel patches
DEFAULT_FRAMES = 96
MAX_FRAMES = KEYS  # keys are distinct within a video
TRAIN_FRACTION = 0.7
_SPLIT_SEED = 0
_BLANK = -1.0  # a blank pixel after `preprocess`


class VisionExtraMissingError(ModelUnavailableError, ImportError):
    """The ``vision`` extra (scikit-learn, whose bundled digits make the frames) is not installed."""


def require_vision_extra() -> None:
    """Raise `VisionExtraMissingError` naming the install command unless scikit-learn imports."""
    if importlib.util.find_spec("sklearn") is None:
        raise VisionExtraMissingError(
            'kvpolicy.vision needs scikit-learn for its digit images: pip install "kvpolicy[vision]"'
        )


def preprocess(images: np.ndarray) -> torch.Tensor:
    """8×8 digit images with values 0–16 → ``[n, 8, 8]`` float32 in [-1, 1] (0 is blank)."""
    array = np.asarray(images, dtype=np.float32)
    if array.ndim != 3 or array.shape[1:] != (8, 8):
        raise InvalidConfigError(f"digit images are [n, 8, 8]; got {array.shape}")
    return torch.from_numpy(array / 8.0 - 1.0)


@functools.cache
def digit_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [n, 8, 8], digits [n])`` of the ``"train"`` or ``"test"`` split: a fixed
    permutation of scikit-learn's digits, its first 70 % for training and the rest for evaluation."""
    if split not in ("train", "test"):
        raise InvalidConfigError(f"split must be 'train' or 'test', got {split!r}")
    require_vision_extra()
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(digits.target))
    cut = int(TRAIN_FRACTION * len(order))
    chosen = order[:cut] if split == "train" else order[cut:]
    return preprocess(digits.images[chosen]), torch.as_tensor(digits.target[chosen], dtype=torch.long)


def _by_digit(split: str) -> list[np.ndarray]:
    digits = digit_images(split)[1].numpy()
    return [np.flatnonzero(digits == d) for d in range(10)]


_BY_DIGIT = functools.cache(_by_digit)


def render_frame(rng: np.random.Generator, split: str, key: int, value: int) -> torch.Tensor:
    """``[1, 16, 16]``: the key's two digits on top, the value bottom-left, each a random image of that digit."""
    images = digit_images(split)[0]
    by_digit = _BY_DIGIT(split)
    frame = torch.full((1, IMAGE_SIZE, IMAGE_SIZE), _BLANK)
    for digit, (row, column) in zip((key // 10, key % 10, value), ((0, 0), (0, 8), (8, 0)), strict=True):
        frame[0, row : row + 8, column : column + 8] = images[int(rng.choice(by_digit[digit]))]
    return frame


@attrs.frozen(eq=False)
class DigitVideo:
    """One item: ``pixel_values [frames, 1, 16, 16]``, each frame's key and value, the asked frame."""

    pixel_values: torch.Tensor
    keys: tuple[int, ...]
    values: tuple[int, ...]
    asked: int

    @property
    def frames(self) -> int:
        return len(self.keys)

    @property
    def answer(self) -> int:
        return self.values[self.asked]

    def video_ids(self) -> torch.Tensor:
        """``<bos>`` and every frame's image tokens: ``[1, 1 + frames × 16]``."""
        return video_ids(self.frames)

    def question_ids(self) -> torch.Tensor:
        """``[Q] [key]``: ``[1, 2]``; the next token is the answer."""
        return torch.tensor([[QUESTION, KEY0 + self.keys[self.asked]]])

    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.video_ids(), self.question_ids()], dim=1)

    def without_frame(self, frame: int) -> DigitVideo:
        """The same video with frame ``frame`` blank: the question's key is nowhere to be seen."""
        pixels = self.pixel_values.clone()
        pixels[frame] = _BLANK
        return attrs.evolve(self, pixel_values=pixels)


def video_ids(frames: int) -> torch.Tensor:
    check_frames(frames)
    return torch.tensor([[BOS] + [IMAGE] * (frames * TOKENS_PER_FRAME)])


def frame_of_position(position: int) -> int | None:
    """The frame whose image token sits at ``position`` of the prompt (None: ``<bos>``)."""
    return None if position < 1 else (position - 1) // TOKENS_PER_FRAME


def check_frames(frames: int) -> None:
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
        raise InvalidConfigError(f"frames must be a whole number in 1..{MAX_FRAMES}, got {frames!r}")


def draw_video(
    rng: np.random.Generator, split: str, frames: int = DEFAULT_FRAMES, asked: int | None = None
) -> DigitVideo:
    """A video of ``frames`` frames with distinct random keys and random values, drawn from
    ``split``'s images, asking about frame ``asked`` (random if None)."""
    check_frames(frames)
    keys = tuple(int(k) for k in rng.choice(KEYS, size=frames, replace=False))
    values = tuple(int(v) for v in rng.integers(0, 10, size=frames))
    frame = int(rng.integers(0, frames)) if asked is None else asked
    if not 0 <= frame < frames:
        raise InvalidConfigError(f"asked frame {frame} is not in 0..{frames - 1}")
    pixels = torch.stack([render_frame(rng, split, k, v) for k, v in zip(keys, values, strict=True)])
    return DigitVideo(pixels, keys, values, frame)


def test_videos(items: int, frames: int = DEFAULT_FRAMES, seed: int = 1) -> list[DigitVideo]:
    """The evaluation items: ``items`` videos of held-out images, the same for every policy."""
    rng = np.random.default_rng(seed)
    return [draw_video(rng, "test", frames) for _ in range(items)]
