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


def supported_list() -> str:
    return ", ".join(f"{name} ({key})" for key, name in SUPPORTED_FAMILIES.items())


class HFAdapter:
    """Attaches policies to one transformers model of a supported family: a causal LM, or its
    base model (e.g. `LlamaModel`) driven with ``inputs_embeds`` — a Decision Transformer or any
    model that embeds its own inputs. `generate` needs the causal LM."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)

    def _check(self, *, generating: bool = False) -> str:
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
        return Attachment(self.model, policy, self._check(), attention or make_attention_function)

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
