"""Keep distinctive keys: a token whose key points where the head's keys already point on
average adds little to what attention can retrieve, so it is the first to go.

This is an illustration of the plugin API, in the spirit of key-similarity pruning; it is not
a published method.
"""

from __future__ import annotations

import attrs
import torch

import kvpolicy
from kvpolicy.types import ComponentBase, ComponentRef, LayerView, PolicyConfig, Protection, Requirements, Schedule


@attrs.frozen
class KeyDiversityConfig:
    """``eps``: guards the cosine against zero-norm keys."""

    eps: float = attrs.field(default=1e-6, validator=attrs.validators.gt(0))


class KeyDiversityExtractor(ComponentBase):
    """One feature per token: ``1 − cos(key, mean key of its head)``, in [0, 2]."""

    name = "key_diversity"
    Config = KeyDiversityConfig
    requirements = Requirements(keys=True)
    num_features = 1

    def extract(self, view: LayerView) -> torch.Tensor:
        keys = view.keys.float()  # [batch, kv_heads, tokens, head_dim]
        mean = keys.mean(dim=2, keepdim=True)
        cosine = torch.nn.functional.cosine_similarity(keys, mean, dim=-1, eps=self.config.eps)
        return (1.0 - cosine).unsqueeze(-1)


@kvpolicy.hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("key_diversity", KeyDiversityExtractor)


@kvpolicy.hookimpl
def kvpolicy_register_presets(register) -> None:
    register(
        "key-diversity",
        PolicyConfig(
            extractor=ComponentRef("key_diversity"),
            scorer=ComponentRef("feature"),
            selector=ComponentRef("top_k"),
            schedule=Schedule("every_step", slack=64),
            protect=Protection(sinks=4),
            budget=kvpolicy.Budget(tokens=256),
        ),
        description="keep the most distinctive keys (example plugin)",
    )
