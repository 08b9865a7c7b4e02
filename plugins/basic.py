"""Basic components and presets: token positions as a feature, scoring by one feature, random
scores (the deliberately bad baseline), the keep-everything ``full`` policy and StreamingLLM.

StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024)
keeps the first few tokens — attention sinks — and a window of the newest ones: here the
``position`` extractor, the ``feature`` scorer (newer = higher) and ``top_k`` with four sinks.
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.types import (
    Budget,
    ComponentBase,
    ComponentRef,
    FeatureWidth,
    LayerView,
    PolicyConfig,
    Protection,
    Schedule,
    non_negative,
)


class PositionExtractor(ComponentBase):
    """One feature per token: its absolute position (newer tokens have larger values)."""

    name = "position"
    plans_layers_together = True  # rows alone, no layer index: `Capabilities`
    num_features = 1

    def extract(self, view: LayerView) -> torch.Tensor:
        return view.positions.to(torch.float32).unsqueeze(-1)


@attrs.frozen
class FeatureScorerConfig:
    """``index``: which feature is the score; ``sign``: +1 keeps large values, -1 keeps small."""

    index: int = attrs.field(default=0, validator=non_negative)
    sign: float = attrs.field(default=1.0, validator=attrs.validators.in_((1.0, -1.0)))


class FeatureScorer(ComponentBase):
    """Score = ±one feature; turns any single-feature extractor into a policy."""

    name = "feature"
    plans_layers_together = True  # rows alone, no layer index: `Capabilities`
    Config = FeatureScorerConfig

    @property
    def input_width(self) -> FeatureWidth:
        return FeatureWidth.at_least(self.config.index + 1)

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        return self.config.sign * self.read_feature(features, self.config.index)


@attrs.frozen
class RandomScorerConfig:
    seed: int = 0


class RandomScorer(ComponentBase):
    """Uniform random scores, reproducible from (seed, layer, tokens seen): a policy that keeps
    random tokens, the floor any real policy must beat."""

    name = "random"
    Config = RandomScorerConfig
    input_width = FeatureWidth.at_least(0)  # reads no feature

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
