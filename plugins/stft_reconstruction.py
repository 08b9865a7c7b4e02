"""The ``stft_reconstruction`` extractor: NAMM's features plus KVzip's query-agnostic signal.

Under the ``context-first`` protocol (the context is compressed before its question exists) the
newest queries' votes of ``stft_votes`` see only the end of the context, and a NAMM evolved on
them stays far below KVzip (docs/learned_eviction.md). KVzip's signal — how much attention each
cached token receives while the model repeats the context (`kvpolicy_plugins.kvzip`) — does not
depend on the question. This extractor gives a learned scorer both: every ``stft_votes`` feature
(same config fields), then ``log(reconstruction attention + reconstruction_eps)`` and that log
max-pooled over each width of ``reconstruction_kernels`` (pooled exactly as the votes are).

With the shipped NAMM's widths (votes and reconstruction both pooled over 7, 15, 31 and 63
cached tokens) that is 30 + 5 = 35 features. A BAM whose read-out is one-hot on the unpooled
log reconstruction attention (`kvzip_readout`), with KVzip's selector, schedule and protection
(`kvzip_equivalent_config`), ranks tokens as KVzip does (the logarithm keeps the order): the
start from which ``examples/namm-context-first/kvzip.json`` evolves what to add to that signal.

Like ``reconstruction_attention`` it needs the repeat pass (``reconstruction`` and ``token_ids``
requirements, schedule ``after_prefill``) and writes its repeat prompt with the model's
tokenizer (`RepeatsContext`); like ``stft_votes`` it needs the newest ``period`` attention rows
and carries calibrated spectrogram statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

import kvpolicy
from kvpolicy import hookimpl
from kvpolicy.types import Budget, ComponentRef, LayerView, PolicyConfig, Protection, Requirements, Schedule, positive
from kvpolicy_plugins.kvzip import ReconstructionConfig, RepeatsContext
from kvpolicy_plugins.namm import EVOLVED_VOTES_KERNELS
from kvpolicy_plugins.stft import StftVotesConfig, StftVotesExtractor, check_kernels, max_pooled_columns


@attrs.frozen
class StftReconstructionConfig(StftVotesConfig, ReconstructionConfig):
    """`StftVotesConfig` and KVzip's repeat prompt (`ReconstructionConfig`: filled by
    `Policy.bind_tokenizer` when empty), plus ``reconstruction_eps``, added before the logarithm,
    and ``reconstruction_kernels``: odd span widths over which the log reconstruction attention
    is also max-pooled, one extra feature each."""

    reconstruction_eps: float = attrs.field(default=1e-6, validator=positive)
    reconstruction_kernels: tuple[int, ...] = attrs.field(default=(), converter=tuple)

    @reconstruction_kernels.validator
    def _check_reconstruction_kernels(self, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
        check_kernels(attribute.name, value)

    @property
    def votes_features(self) -> int:
        """How many ``stft_votes`` features come first."""
        return StftVotesConfig.num_features.fget(self)

    @property
    def reconstruction_index(self) -> int:
        """Index of the unpooled log reconstruction attention among the features."""
        return self.votes_features

    @property
    def num_features(self) -> int:
        return self.votes_features + 1 + len(self.reconstruction_kernels)


class StftReconstructionExtractor(RepeatsContext, StftVotesExtractor):
    """``stft_votes`` features, then ``log(reconstruction attention + eps)`` and its max-pools."""

    name = "stft_reconstruction"
    Config = StftReconstructionConfig

    @property
    def requirements(self) -> Requirements:
        return super().requirements | Requirements(token_ids=True, reconstruction=True)

    def extract(self, view: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, tokens, num_features]``: the votes' features, then the log
        reconstruction attention and its pools over ``reconstruction_kernels``, in that order."""
        view.require("reconstruction_attention", by=self.label)
        votes_features = super().extract(view)
        received = view.reconstruction_attention.to(device=votes_features.device, dtype=torch.float32)
        received = torch.log(received + self.config.reconstruction_eps)
        pooled = max_pooled_columns(received, self.config.reconstruction_kernels, view.positions)
        return torch.cat([votes_features, received.unsqueeze(-1), *pooled], dim=-1)


#: the budget the context-first runs compare at (12.5% of the cache)
START_BUDGET = Budget(ratio=0.125)


def kvzip_equivalent_config(
    kernels: tuple[int, ...] = EVOLVED_VOTES_KERNELS, budget: Budget = START_BUDGET
) -> PolicyConfig:
    """``stft_reconstruction`` (votes and reconstruction pooled over ``kernels``) → BAM → KVzip's
    selection: ``top_k`` shared by a layer's heads, once after the prompt, 4 sinks, no recent
    window. With `kvzip_readout` as BAM's read-out it keeps what KVzip keeps."""
    extractor = {"votes_kernels": list(kernels), "reconstruction_kernels": list(kernels)}
    features = StftReconstructionConfig(votes_kernels=kernels, reconstruction_kernels=kernels).num_features
    return PolicyConfig(
        extractor=ComponentRef("stft_reconstruction", extractor),
        scorer=ComponentRef("bam", {"features": features}),
        selector=ComponentRef("top_k", {"shared_across_heads": True, "min_per_head": 0}),
        schedule=Schedule("after_prefill"),
        protect=Protection(sinks=4, recent=0),
        budget=budget,
    )


def kvzip_readout(config: StftReconstructionConfig) -> list[float]:
    """BAM's ``w_s`` one-hot on the unpooled log reconstruction attention: with the rest of BAM
    at zero, every token scores ``log(reconstruction attention + eps)``, KVzip's order."""
    readout = [0.0] * config.num_features
    readout[config.reconstruction_index] = 1.0
    return readout


def kvzip_equivalent(budget: Any = "12.5%", kernels: tuple[int, ...] = EVOLVED_VOTES_KERNELS) -> kvpolicy.Policy:
    """The policy of `kvzip_equivalent_config` with `kvzip_readout` as BAM's read-out (all other
    BAM weights zero): the KVzip-equivalent start of a NAMM evolved over these features."""
    return _with_kvzip_readout(kvpolicy.build(kvzip_equivalent_config(kernels), budget=budget))


def self_sized_start(bias: float, kernels: tuple[int, ...] = EVOLVED_VOTES_KERNELS) -> kvpolicy.Policy:
    """The policy of `self_sized_config` with `kvzip_readout` and BAM's bias ``b_s = bias``: a
    token stays when ``log(reconstruction attention + eps) >= -bias`` — KVzip's score with one
    bar for every layer and head, the start of ``examples/namm-context-first/threshold.json``."""
    return _with_kvzip_readout(kvpolicy.build(self_sized_config(kernels)), bias)


def _with_kvzip_readout(policy: kvpolicy.Policy, bias: float = 0.0) -> kvpolicy.Policy:
    """``policy`` with BAM's read-out `kvzip_readout`, its bias ``bias`` and every other weight zero."""
    scorer = policy.scorer
    flat = torch.zeros(scorer.num_params)
    offset = 0
    for name, size in zip(scorer.params.shapes, scorer.params.sizes, strict=True):
        if name == "w_s":
            flat[offset : offset + size] = torch.tensor(kvzip_readout(policy.extractor.config))
        elif name == "b_s":
            flat[offset] = bias
        offset += size
    scorer.set_flat(flat)
    return policy


#: the self-sized NAMM for SmolLM2 (package data: the best held-out mean of
#: ``examples/namm-context-first/threshold.json``, generation 28 of 40)
SELF_SIZED_SMOLLM2 = Path(__file__).parent / "data" / "namm-threshold-smollm2.safetensors"


def self_sized_config(kernels: tuple[int, ...] = EVOLVED_VOTES_KERNELS) -> PolicyConfig:
    """`kvzip_equivalent_config` with NAMM's ``threshold`` selector per KV head and no budget:
    every layer and head keeps the tokens BAM scores ≥ 0, so the memory sizes itself."""
    return attrs.evolve(
        kvzip_equivalent_config(kernels),
        selector=ComponentRef("threshold", {"per_head": True}),
        budget=Budget(),
    )


@hookimpl
def kvpolicy_register_presets(register) -> None:
    register(
        "namm-threshold-smollm2",
        self_sized_config(),
        description=(
            "self-sized NAMM for SmolLM2, context-first: searched = BAM's read-out and bias over spectrogram, "
            "pooled votes and KVzip's reconstruction attention (36 numbers, CMA-ES, 40 generations, multikey-shared "
            "4k, fitness + cache saved); fixed = BAM's attention (zero: unused), features, per-head threshold; "
            "keeps ~10% of the cache there"
        ),
        weights=SELF_SIZED_SMOLLM2,
    )


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register(
        "stft_reconstruction",
        StftReconstructionExtractor,
        description="stft_votes features + log KVzip reconstruction attention and its span max-pools, 27+ features",
    )
