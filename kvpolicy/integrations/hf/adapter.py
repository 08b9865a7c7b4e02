"""The model adapter: which transformers models kvpolicy drives, and `generate` in one call."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from kvpolicy.errors import ShapeError, UnsupportedModelError
from kvpolicy.integrations.hf.attach import Attachment, GenerationResult
from kvpolicy.integrations.hf.attention import AttentionRoute, make_attention_function

#: ``config.model_type`` → family name, for every family tested with kvpolicy
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3",
}


#: vision-language wrappers (``*ForConditionalGeneration``) kvpolicy drives when their language
#: model is of a supported family: the policy manages the language model's cache, image tokens
#: included; the vision tower keeps its own attention (it has no cache)
MULTIMODAL_FAMILIES: dict[str, str] = {
    "llava": "LLaVA",
    "llava_next": "LLaVA-NeXT",
    "llava_next_video": "LLaVA-NeXT-Video",
    "gemma3": "Gemma 3",
}

#: vision-language families that cannot be driven, and why
UNSUPPORTED_MULTIMODAL: dict[str, str] = {
    kind: (
        "it numbers tokens with 3-D multimodal RoPE (M-RoPE: each image token's time, row and column), while "
        "kvpolicy gives every token one absolute position, the one it keeps after eviction; its image tokens "
        "would be rotated to the wrong positions (text-only use: load its language model alone)"
    )
    for kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
}


def supported_list() -> str:
    return ", ".join(f"{name} ({key})" for key, name in SUPPORTED_FAMILIES.items())


class HFAdapter:
    """Attaches policies to one transformers model of a supported family: a causal LM, its base
    model (e.g. `LlamaModel`) driven with ``inputs_embeds`` — a Decision Transformer or any model
    that embeds its own inputs — or a vision-language wrapper around a supported language model
    (`MULTIMODAL_FAMILIES`, e.g. `LlavaForConditionalGeneration` given ``pixel_values``).
    `generate` needs a model with a language-model head."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)

    def _multimodal_family(self) -> str:
        """The family of a vision-language wrapper whose language model kvpolicy supports."""
        text = self.model.config.get_text_config(decoder=True)
        text_type = getattr(text, "model_type", None)
        if text_type not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}'s language model (model_type {text_type!r}) is not supported; "
                f"supported families: {supported_list()}"
            )
        language_model = getattr(getattr(self.model, "model", None), "language_model", None)
        if not hasattr(language_model, "layers"):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no language model with decoder layers at model.language_model"
            )
        return f"{MULTIMODAL_FAMILIES[self.model_type]} ({SUPPORTED_FAMILIES[text_type]} language model)"

    def _check(self, *, generating: bool = False) -> str:
        if self.model_type in UNSUPPORTED_MULTIMODAL:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} (model_type {self.model_type!r}) is not supported: "
                f"{UNSUPPORTED_MULTIMODAL[self.model_type]}"
            )
        if self.model_type in MULTIMODAL_FAMILIES:
            family = self._multimodal_family()
            if generating and not hasattr(self.model, "lm_head"):
                raise UnsupportedModelError(
                    f"{type(self.model).__name__} has no language-model head, so it cannot generate; attach it and "
                    "drive it with handle.feed, or generate with the *ForConditionalGeneration model"
                )
            return family
        if self.model_type not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} (model_type {self.model_type!r}) is not supported; "
                f"supported families: {supported_list()}"
            )
        if not hasattr(self.model, "layers") and not hasattr(getattr(self.model, "model", None), "layers"):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no decoder layers; attach to the *ForCausalLM model or its base "
                "model (e.g. LlamaModel)"
            )
        if generating and (not hasattr(self.model, "generate") or not hasattr(self.model, "lm_head")):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} is not a causal LM with a head, so it cannot generate; attach it and "
                "drive it with handle.feed_embeds, or generate with the *ForCausalLM model"
            )
        return SUPPORTED_FAMILIES[self.model_type]

    def attach(
        self, policy: Any, attention: Callable[[AttentionRoute], Callable[..., Any]] | None = None
    ) -> Attachment:
        """An `Attachment` of ``policy`` to the model; ``attention`` makes the attention function
        it registers (default: kvpolicy's, `attention.make_attention_function`)."""
        family = self._check()
        if self.model_type in MULTIMODAL_FAMILIES and policy.requirements.reconstruction:
            raise UnsupportedModelError(
                f"{policy!r} scores tokens by repeating the context as token ids (KVzip's repeat pass); in "
                f"{type(self.model).__name__} an image token's id is a placeholder, its content is in the pixels, "
                "so the repeat would show the model placeholders instead of the images"
            )
        return Attachment(self.model, policy, family, attention or make_attention_function)

    def generate(self, policy: Any, inputs: Any, **generate_kwargs: Any) -> GenerationResult:
        """Generate with ``policy`` attached; ``inputs`` is a tokenizer output or ``input_ids``.

        ``context_end=n`` (an int, or one per row of a padded batch, counted on the row's own
        tokens) runs the ``context-first`` protocol: tokens ``[0, n)`` are prefilled and
        compressed (in chunks of ``prefill_chunk_size``), then the rest is appended to the sealed
        cache, so no eviction pass sees it (`kvpolicy.integrations.hf.context_first`)."""
        if isinstance(inputs, torch.Tensor):
            inputs = {"input_ids": inputs if inputs.dim() == 2 else inputs.unsqueeze(0)}
        elif isinstance(inputs, Mapping):
            inputs = dict(inputs)
        else:
            raise ShapeError(
                f"inputs must be a tokenizer output (mapping) or input_ids tensor, got {type(inputs).__name__}"
            )
        if "input_ids" not in inputs:
            raise ShapeError(f"inputs lack input_ids; got keys {sorted(inputs)}")
        prompt = inputs["input_ids"]
        self._check(generating=True)
        with self.attach(policy) as handle:
            output = self.model.generate(**inputs, **generate_kwargs)
            report = handle.report()
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        return GenerationResult(sequences=sequences, new_tokens=sequences[:, prompt.shape[1] :], report=report)
