"""Span pooling: each token's score pooled over its neighbouring cached tokens before selection.

Token-level top-k keeps scattered tokens, but what a model later reads back is a span (a
sentence, a number with its key). Max-pooling a policy's scores over ``kernel`` neighbours keeps
a token whenever a neighbour is worth keeping, so whole spans survive; average pooling smooths
instead. SnapKV (Li et al. 2024) pools its votes this way inside its scorer; as a pooler the step
composes with any scorer: ``kvpolicy.build("h2o", budget="25%", pooler=("span", {"kernel": 15}))``
or the shorthand ``span=15``.

Neighbours are neighbours in *cached order* — the index along ``tokens`` — not in absolute
position: after an eviction, adjacent cached tokens may be far apart in the text.

Components: pooler ``span``.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import InvalidConfigError
from kvpolicy.selection import MAX_KERNEL, padding_mask, pool_neighbours
from kvpolicy.types import ComponentBase, LayerView

SpanMode = Literal["max", "avg"]


@attrs.frozen
class SpanPoolerConfig:
    """``kernel``: odd number of neighbouring cached tokens pooled (1 leaves scores unchanged);
    ``mode``: ``max`` (a token is kept if any neighbour is worth keeping) or ``avg``. The default,
    max over 31, is what the ``snapkv-span`` and ``namm-bam-smollm2`` presets use."""

    kernel: int = attrs.field(default=31)
    mode: SpanMode = attrs.field(default="max")

    @kernel.validator
    def _odd(self, attribute: attrs.Attribute, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
            raise InvalidConfigError(
                f"SpanPoolerConfig.kernel must be an odd whole number (1, 3, 5, ...), got {value!r}"
            )
        if value > MAX_KERNEL:
            raise InvalidConfigError(
                f"SpanPoolerConfig.kernel {value} is wider than any cache kvpolicy drives (at most {MAX_KERNEL} "
                "tokens); a kernel of 2·tokens − 1 already pools over every cached token"
            )

    @mode.validator
    def _mode(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in ("max", "avg"):
            raise InvalidConfigError(f"SpanPoolerConfig.mode must be 'max' or 'avg', got {value!r}")

    def __str__(self) -> str:  # how `Policy`'s repr shows it: span=max31
        return f"{self.mode}{self.kernel}"


class SpanPooler(ComponentBase):
    """Max- or average-pools scores over ``kernel`` neighbouring cached tokens of the same head
    (it reads scores and positions only: no requirements)."""

    name = "span"
    plans_layers_together = True  # rows alone, no layer index: `Capabilities`
    Config = SpanPoolerConfig

    def pool(self, scores: torch.Tensor, view: LayerView) -> torch.Tensor:
        """``scores [batch, kv_heads, tokens]`` pooled; padded slots (position < 0) stay -inf."""
        if self.config.kernel == 1:
            return scores
        # the mask only when some head holds padding (`padding_mask`): masking costs more than pooling
        return pool_neighbours(scores, self.config.kernel, self.config.mode, padding_mask(view.positions))


@hookimpl
def kvpolicy_register_poolers(register) -> None:
    register("span", SpanPooler)
