"""Basic components and presets: token positions as a feature, scoring by one feature, random
scores (the deliberately bad baseline), the keep-everything ``full`` policy and StreamingLLM.

StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024)
keeps the first few tokens — attention sinks — and a window of the newest ones: here the
``position`` extractor, the ``feature`` scorer (newer = higher) and ``top_k`` with four sinks.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import ShapeError
from kvpolicy.types import (
    Budget,
    ComponentRef,
    EmptyConfig,
    FeatureWidth,
    LayerView,
    PolicyConfig,
    Protection,
    Requirements,
    Schedule,
    non_negative,
)


class PositionExtractor:
    """One feature per token: its absolute position (newer tokens have larger values)."""

    name: ClassVar[str] = "position"
    Config = EmptyConfig

    def __init__(self, config: EmptyConfig | None = None) -> None:
        self.config = config or EmptyConfig()

    @property
    def requirements(self) -> Requirements:
        return Requirements()

    @property
    def num_features(self) -> int:
        return 1

    def extract(self, view: LayerView) -> torch.Tensor:
        return view.positions.to(torch.float32).unsqueeze(-1)


@attrs.frozen
class FeatureScorerConfig:
    """``index``: which feature is the score; ``sign``: +1 keeps large values, -1 keeps small."""

    index: int = attrs.field(default=0, validator=non_negative)
    sign: float = attrs.field(default=1.0, validator=attrs.validators.in_((1.0, -1.0)))


class FeatureScorer:
    """Score = ±one feature; turns any single-feature extractor into a policy."""

    name: ClassVar[str] = "feature"
    Config = FeatureScorerConfig

    def __init__(self, config: FeatureScorerConfig | None = None) -> None:
        self.config = config or FeatureScorerConfig()

    @property
    def requirements(self) -> Requirements:
        return Requirements()

    @property
    def input_width(self) -> FeatureWidth:
        return FeatureWidth.at_least(self.config.index + 1)

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        if self.config.index >= features.shape[-1]:
            raise ShapeError(
                f"feature scorer reads feature {self.config.index}, but features have {features.shape[-1]}"
            )
        return self.config.sign * features[..., self.config.index].float()


@attrs.frozen
class RandomScorerConfig:
    seed: int = 0


class RandomScorer:
    """Uniform random scores, reproducible from (seed, layer, tokens seen): a policy that keeps
    random tokens, the floor any real policy must beat."""

    name: ClassVar[str] = "random"
    Config = RandomScorerConfig

    def __init__(self, config: RandomScorerConfig | None = None) -> None:
        self.config = config or RandomScorerConfig()

    @property
    def requirements(self) -> Requirements:
        return Requirements()

    @property
    def input_width(self) -> FeatureWidth:
        return FeatureWidth.at_least(0)  # reads no feature

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        # One draw per (head, token), shared by every batch row, so a row's scores do not depend
        # on its place in the batch.
        generator = torch.Generator().manual_seed(hash((self.config.seed, view.layer, view.seen)) & 0x7FFF_FFFF)
        batch, heads, tokens = features.shape[:3]
        scores = torch.rand((heads, tokens), generator=generator)
        return scores.expand(batch, heads, tokens).to(features.device)


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("position", PositionExtractor)


@hookimpl
def kvpolicy_register_scorers(register) -> None:
    register("feature", FeatureScorer)
    register("random", RandomScorer)


@hookimpl
def kvpolicy_register_presets(register) -> None:
    register(
        "full",
        PolicyConfig(
            extractor=ComponentRef("position"),
            scorer=ComponentRef("feature"),
            selector=ComponentRef("threshold"),
            schedule=Schedule("never"),
        ),
        description="keep every token (the reference every other policy is compared with)",
    )
    register(
        "streaming_llm",
        PolicyConfig(
            extractor=ComponentRef("position"),
            scorer=ComponentRef("feature"),
            selector=ComponentRef("top_k"),
            schedule=Schedule("every_step", slack=64),
            protect=Protection(sinks=4),
            budget=Budget(tokens=512),
        ),
        description="StreamingLLM: 4 attention sinks + the newest tokens (Xiao et al. 2024)",
    )
    register(
        "random",
        PolicyConfig(
            extractor=ComponentRef("position"),
            scorer=ComponentRef("random"),
            selector=ComponentRef("top_k"),
            schedule=Schedule("every_step", slack=64),
            protect=Protection(),
            budget=Budget(tokens=512),
        ),
        description="evict random tokens (a deliberately bad baseline)",
    )
