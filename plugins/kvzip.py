"""KVzip (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
2025, arXiv 2505.23416).

A cached token matters as much as the model needs it to *reproduce the context*. After the
prompt, the integration runs a repeat pass (`Requirements(reconstruction=True)`,
`kvpolicy.integrations.hf.reconstruction`): a repeat prompt and the context again, teacher-forced
in chunks on a copy of the cache; every cached token scores the most attention any repeat query
(of any query head of its GQA group) gave it. The lowest-scored tokens are evicted once, with the
layer's heads sharing its budget (head-wise, non-uniform across heads). The scores do not depend
on any later question: one compressed cache serves every query. The cost is a second prefill.

Simplified from the paper and the authors' code (and kvpress's ``KVzipPress``):

- the budget is shared by the heads of one layer (``top_k`` with ``shared_across_heads``, as
  Ada-KV), not ranked over all layers at once: kvpolicy's eviction passes run layer by layer;
- the whole cached prompt is repeated, chat-template header included (the authors skip it);
- the repeat prompt is fixed English text ("Repeat the previous context exactly.", later chunks
  "Repeat the part of the previous context exactly, starting with" and the last 8 tokens of the
  chunk before), followed by the chat template's assistant opening when the tokenizer has a
  template ("\\n" otherwise); chunks of 2048 context tokens (the authors' default);
- attention over the *whole* cache, so the softmax is the model's own (kvpress restricts the
  keys to the sinks, the chunk and the repeat: a different normalisation);
- the first 4 tokens are protected as sinks (the authors' ``n_sink``), no recent window; no
  KVzip+ normalisation.

Components: extractor ``reconstruction_attention`` → scorer ``feature`` → selector ``top_k``
(``shared_across_heads``), schedule ``after_prefill``.

``kvzip-threshold`` is the same score with the ``threshold`` selector (``per_head``): one bar for
every layer and head (`GLOBAL_THRESHOLD`), so each layer and head keeps as much as KVzip's score
says — closer to the authors' selection over the whole cache, at the price of a cache size that
depends on the context instead of a budget.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import MissingTokenizerError
from kvpolicy.types import (
    Budget,
    ComponentBase,
    ComponentRef,
    LayerView,
    PolicyConfig,
    Protection,
    RepeatPrompt,
    Requirements,
    Schedule,
    non_negative_int,
    positive_int,
)

#: what the model is asked before the first chunk is repeated, and before each later one
FIRST_INSTRUCTION = "\n\nRepeat the previous context exactly."
LATER_INSTRUCTION = "\n\nRepeat the part of the previous context exactly, starting with"


def _ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=False))


def assistant_opening(tokenizer: Any) -> str:
    """The text a chat template puts between the end of a user turn's content and the
    assistant's answer ("\\n" without a template, as the authors' code does)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n"
    marker = "\n" + "#" * 13  # text no template produces itself
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "dummy context" + marker}], add_generation_prompt=True, tokenize=False
    )
    return text.split(marker, 1)[1]


@attrs.frozen(slots=False)
class ReconstructionConfig:
    """The repeat prompt as token ids (filled by `Policy.bind_tokenizer` when empty; saved with
    the policy): ``first_ids`` before the first chunk, ``later_ids`` (+ the last ``overlap``
    tokens of the chunk before) before each later one, ``suffix_ids`` before the chunk's tokens;
    ``chunk_size`` context tokens per repeat forward call. Not slotted, so the config of an
    extractor that also reads other signals can inherit these fields beside its other base's."""

    first_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    later_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    suffix_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    chunk_size: int = attrs.field(default=2048, validator=positive_int)
    overlap: int = attrs.field(default=8, validator=non_negative_int)


class RepeatsContext:
    """How a component whose config holds `ReconstructionConfig`'s fields repeats the context
    (`Reconstructing`) and writes that repeat prompt with the model's tokenizer
    (`TokenizerAware`): shared by every extractor reading the reconstruction attention."""

    name: str
    config: Any

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Write the repeat prompt with the model's tokenizer unless it was configured already
        (called by `Policy.bind_tokenizer`; `kvpolicy run`, `eval` and `compare` do)."""
        if self.config.first_ids:
            return
        self.config = attrs.evolve(
            self.config,
            first_ids=_ids(tokenizer, FIRST_INSTRUCTION),
            later_ids=_ids(tokenizer, LATER_INSTRUCTION),
            suffix_ids=_ids(tokenizer, assistant_opening(tokenizer)),
        )

    def repeat_prompt(self) -> RepeatPrompt:
        if not self.config.first_ids:
            raise MissingTokenizerError(
                "KVzip writes a repeat prompt with the model's tokenizer: call policy.bind_tokenizer(tokenizer) "
                f"before running it (or give {self.name} first_ids / later_ids explicitly)"
            )
        config = self.config
        return RepeatPrompt(config.first_ids, config.later_ids, config.suffix_ids, config.chunk_size, config.overlap)


class ReconstructionAttentionExtractor(RepeatsContext, ComponentBase):
    """One feature per token: the most attention it received while the context was repeated."""

    name = "reconstruction_attention"
    Config = ReconstructionConfig
    requirements = Requirements(token_ids=True, reconstruction=True)
    num_features = 1

    def extract(self, view: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, tokens, 1]`` the max attention received during the repeat."""
        view.require("reconstruction_attention", by=self.label)
        return view.reconstruction_attention.float().unsqueeze(-1)


#: ``kvzip-threshold``'s bar on the reconstruction attention: ``exp(-3.85) - 1e-6``, so that it keeps
#: exactly what ``log(attention + 1e-6) >= -3.85`` keeps — the untrained start of the self-sized
#: NAMM at the bias chosen on validation items to keep about as much as the evolved one
#: (docs/learned_eviction.md). One bar for all layers and heads sizes each of them by KVzip's own
#: score, as the authors' global selection does, where ``kvzip`` gives every layer the same share.
GLOBAL_THRESHOLD = math.exp(-3.85) - 1e-6


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("reconstruction_attention", ReconstructionAttentionExtractor)


@hookimpl
def kvpolicy_register_presets(register) -> None:
    kvzip = PolicyConfig(
        extractor=ComponentRef("reconstruction_attention"),
        scorer=ComponentRef("feature"),
        selector=ComponentRef("top_k", {"shared_across_heads": True, "min_per_head": 0}),
        schedule=Schedule("after_prefill"),
        protect=Protection(sinks=4),
        budget=Budget(tokens=512),
    )
    register(
        "kvzip",
        kvzip,
        description="KVzip: max attention received while the model repeats the context, heads share the "
        "layer's budget, once after prefill (Kim et al. 2025)",
    )
    register(
        "kvzip-threshold",
        attrs.evolve(
            kvzip,
            selector=ComponentRef("threshold", {"threshold": GLOBAL_THRESHOLD, "per_head": True}),
            budget=Budget(),
        ),
        description="KVzip's score with one threshold for every layer and KV head (self-sized): a token stays "
        "when some repeat query gave it >= 2.1% of its attention; ~11% of SmolLM2's cache on multikey-shared 4k",
    )
