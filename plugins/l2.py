"""L2-norm eviction (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", EMNLP 2024).

Keys with a LOW L2 norm tend to receive high attention, so the cache keeps the tokens whose
cached (post-RoPE) keys have the lowest norm. Needs only the keys: no attention statistics, so
it works with any attention kernel and costs a norm and a top-k per eviction pass.

Components: extractor ``key_norm`` → scorer ``feature`` with sign −1 (score = −norm) → selector
``top_k``.

The paper leaves the first layers uncompressed, where key norm and attention correlate poorly;
the authors' released code (``l2compress``) shows ``skip_layers=[0, 1]`` in its README usage
(the function's own default skips none; one of their needle scripts for a 32-layer Llama also
skips layer 12). The preset follows the README: ``skip_layers=(0, 1)``.
The preset evicts whenever the cache exceeds the budget by 64 tokens (``every_step`` with slack
64): the tokens kept at each eviction are exactly the lowest-norm ones; the slack only lets the
cache run up to 64 tokens over budget between evictions, so the gather is not paid every step.
``build("l2", schedule=Schedule("every_step"))`` evicts at every step instead.
"""

from __future__ import annotations

import torch

from kvpolicy import hookimpl
from kvpolicy.types import (
    Budget,
    ComponentBase,
    ComponentRef,
    LayerView,
    PolicyConfig,
    Protection,
    Requirements,
    Schedule,
)

#: Layers the paper's code never compresses.
PAPER_SKIP_LAYERS: tuple[int, ...] = (0, 1)


class KeyNormExtractor(ComponentBase):
    """One feature per token: the L2 norm of its cached key, per KV head."""

    name = "key_norm"
    requirements = Requirements(keys=True)
    num_features = 1

    def extract(self, view: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, tokens, 1]`` key norms (float32)."""
        view.require("keys", by=self.label)
        return torch.linalg.vector_norm(view.keys.float(), dim=-1).unsqueeze(-1)


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("key_norm", KeyNormExtractor)


#: L2's scorer: minus the key norm (feature 0), so the lowest-norm keys score highest
L2_SCORER = {"index": 0, "sign": -1.0}


@hookimpl
def kvpolicy_register_presets(register) -> None:
    l2 = PolicyConfig(
        extractor=ComponentRef("key_norm"),
        scorer=ComponentRef("feature", L2_SCORER),
        selector=ComponentRef("top_k"),
        schedule=Schedule("every_step", slack=64),
        protect=Protection(),
        budget=Budget(tokens=512),
        skip_layers=PAPER_SKIP_LAYERS,
    )
    register(
        "l2",
        l2,
        description="L2 norm: keep the keys with the lowest norm, first two layers uncompressed (Devoto et al. 2024)",
    )
    register(
        "l2-span",
        l2.with_span(31),
        description="L2 norm with its scores max-pooled over 31 cached tokens (spans kept; not the paper's)",
    )  # lift: docs/span_pooling.md
