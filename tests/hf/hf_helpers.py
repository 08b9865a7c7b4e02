"""Small policies and checks shared by the integration tests (real components, no mocks)."""

from __future__ import annotations

from typing import ClassVar

import torch

import kvpolicy
from kvpolicy.types import EmptyConfig, LayerView, Requirements, Schedule


def streaming(budget: int, slack: int = 0) -> kvpolicy.Policy:
    """StreamingLLM evicting at every step above ``budget + slack``."""
    return kvpolicy.build("streaming_llm", budget=budget, schedule=Schedule("every_step", slack=slack))


class RecordingExtractor:
    """Position feature plus a record of every view it was shown (declares ``requirements``)."""

    name: ClassVar[str] = "recording"
    Config = EmptyConfig

    def __init__(self, requirements: Requirements | None = None) -> None:
        self.config = EmptyConfig()
        self._requirements = requirements or Requirements()
        self.views: list[LayerView] = []
        self.prefill_state: list[int] = []

    @property
    def requirements(self) -> Requirements:
        return self._requirements

    def extract(self, view: LayerView) -> torch.Tensor:
        self.views.append(view)
        return view.positions.to(torch.float32).unsqueeze(-1)


class AccumulatedScorer:
    """H2O-style: keep the tokens that received the most attention (needs accumulated attention)."""

    name: ClassVar[str] = "accumulated"
    Config = EmptyConfig

    def __init__(self) -> None:
        self.config = EmptyConfig()

    @property
    def requirements(self) -> Requirements:
        return Requirements(accumulated_attention=True)

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        return view.accumulated_attention


class RandomScorer:
    """Random scores that differ per head, so heads keep different tokens (seeded)."""

    name: ClassVar[str] = "random_heads"
    Config = EmptyConfig

    def __init__(self, seed: int = 0) -> None:
        self.config = EmptyConfig()
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def requirements(self) -> Requirements:
        return Requirements()

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        return torch.rand(features.shape[:3], generator=self.generator)


def greedy_loop(handle, prompt: torch.Tensor, new_tokens: int, chunk_size: int | None = None) -> torch.Tensor:
    """A hand-written greedy decoding loop on the handle's cache: prompt + ``new_tokens`` ids."""
    handle.reset()
    logits = handle.feed(prompt, chunk_size=chunk_size)
    tokens = [prompt]
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = handle.feed(nxt)
    return torch.cat(tokens, dim=1)[:, : prompt.shape[1] + new_tokens]
