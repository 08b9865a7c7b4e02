"""Plain transformers objects that the upper tiers build without importing transformers: a
`LlamaModel` decoder from config fields (the Decision Transformer's backbone, `kvpolicy.rl`), a
`LlavaForConditionalGeneration` with a CLIP vision tower (the digit-video model, `kvpolicy.vision`)
and the dynamic cache a bare model runs on (the reference a policy's run is compared with)."""

from __future__ import annotations

from typing import Any

import torch


def llama_backbone(**config: Any) -> torch.nn.Module:
    """transformers' `LlamaModel` (the decoder, no language-model head) built from these
    `LlamaConfig` fields, with random weights."""
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(**config))


def llava_model(text: dict[str, Any], vision: dict[str, Any], **llava: Any) -> torch.nn.Module:
    """transformers' `LlavaForConditionalGeneration`: a CLIP vision tower from ``vision``
    (`CLIPVisionConfig` fields), a Llama language model from ``text`` (`LlamaConfig` fields) and
    the `LlavaConfig` fields ``llava``, with random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), **llava)
    return LlavaForConditionalGeneration(config)


def bare_cache(model: torch.nn.Module) -> Any:
    """A fresh `DynamicCache` for ``model``: what the model uses with no policy attached."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
