"""NAMM presets — Neural Attention Memory Models (Cetin et al., "An Evolved Universal Transformer
Memory", arXiv 2410.13166), assembled from the ``stft`` extractor, a learned scorer and the
``threshold`` selector:

- ``namm-bam``: spectrogram features → BAM (counter-causal attention, 4,172 parameters) →
  evict every token scoring below 0; every layer runs an eviction pass each 512 tokens; no budget.
- ``namm-mlp``: the same with the per-token MLP scorer (the paper's ablation).

Both start with zero parameters (nothing is evicted); `kvpolicy.calibrate` collects the
spectrogram's normalisation statistics with that zero policy, as the paper does before evolution.

- ``namm-bam-smollm2``: a NAMM for SmolLM2 shipped with its evolved parameters and calibration
  (``data/namm-bam-smollm2.safetensors``, made by ``examples/namm-smollm2/``): spectrogram, the
  newest queries' votes and those votes max-pooled over spans of 7, 15, 31 and 63 cached tokens →
  BAM → top-k, once after the prompt. Its parameters are the best validation mean of a CMA-ES
  run over BAM's read-out at 12.5% of the cache (docs/learned_eviction.md); the preset keeps 25%,
  ``budget=`` changes the ratio.
"""

from __future__ import annotations

from pathlib import Path

from kvpolicy import hookimpl
from kvpolicy.types import Budget, ComponentRef, PolicyConfig, Protection, Schedule

PASS_EVERY = 512
#: weights of the shipped NAMM for SmolLM2 (package data: the best validation mean of its CMA-ES run)
EVOLVED_SMOLLM2 = Path(__file__).parent / "data" / "namm-bam-smollm2.safetensors"


def namm_config(scorer: str) -> PolicyConfig:
    """stft → ``scorer`` → threshold, updating every 512 tokens, no budget."""
    return PolicyConfig(
        extractor=ComponentRef("stft"),
        scorer=ComponentRef(scorer),
        selector=ComponentRef("threshold"),
        schedule=Schedule("every_n", every=PASS_EVERY),
    )


#: span widths over which the shipped NAMM's extractor also max-pools the votes (one feature each)
EVOLVED_VOTES_KERNELS = (7, 15, 31, 63)


def evolved_config() -> PolicyConfig:
    """The shipped NAMM's pipeline (its parameters come from `EVOLVED_SMOLLM2`): stft_votes with
    the votes also max-pooled over 7, 15, 31 and 63 cached tokens (30 features) → BAM → top_k at
    25%, once after the prompt, the 32 newest tokens protected. No pooler: the scorer weighs the
    span widths itself (evolution gave most weight to 31, some to 15, and a little to the
    spectrogram)."""
    return PolicyConfig(
        extractor=ComponentRef("stft_votes", {"votes_kernels": list(EVOLVED_VOTES_KERNELS)}),
        scorer=ComponentRef("bam", {"features": 30}),
        selector=ComponentRef("top_k"),
        schedule=Schedule("after_prefill"),
        protect=Protection(recent=32),
        budget=Budget(ratio=0.25),
    )


@hookimpl
def kvpolicy_register_presets(register) -> None:
    register(
        "namm-bam",
        namm_config("bam"),
        description=(
            "NAMM with BAM: STFT features, counter-causal attention scorer, threshold (Cetin et al. 2024); "
            "no parameters shipped (zero scores keep everything): evolve or load some"
        ),
    )
    register(
        "namm-mlp",
        namm_config("mlp"),
        description=(
            "NAMM with a per-token MLP scorer (ablation of Cetin et al. 2024); "
            "no parameters shipped (zero scores keep everything): evolve or load some"
        ),
    )
    register(
        "namm-bam-smollm2",
        evolved_config(),
        description=(
            "NAMM for SmolLM2, top-k 25%: searched = BAM's linear read-out over spectrogram + span-pooled "
            "votes (30 weights, CMA-ES, 10 generations, question-aware items); fixed = BAM's attention "
            "(zero: unused), features, selector, schedule"
        ),
        weights=EVOLVED_SMOLLM2,
    )
