"""The digit-video model: transformers' own `LlavaForConditionalGeneration`, small and trained here.

A CLIP vision tower reads each 16×16 frame as a 4×4 grid of 4×4-pixel patches (16 image tokens
after the class token is dropped), LLaVA's projector maps them into a 2-layer Llama language model
(grouped-query attention, RoPE) — the same classes a user loads a LLaVA checkpoint into, so a
policy attaches to it as to any vision-language model (``policy.attach(model)``, ``pixel_values``
on the first forward). The vocabulary is the task's (`kvpolicy.vision.task`); no tokenizer or
processor is needed. Weights and shapes are one safetensors file (`save`, `load`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors.torch import load_file, save_file

from kvpolicy.atomic import atomic_path
from kvpolicy.checkpoint import read_tagged_metadata
from kvpolicy.errors import InvalidConfigError
from kvpolicy.integrations.hf.parts import llava_model
from kvpolicy.vision import task

FORMAT = "kvpolicy.vision.digit_video/1"
SHIPPED = Path(__file__).parent / "data" / "digit_video.safetensors"


@attrs.frozen
class DigitVideoConfig:
    """Shapes of the model (defaults: ~0.2 M parameters, under 1 MB in float32)."""

    hidden: int = 64  # language model width
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2

    def __attrs_post_init__(self) -> None:
        for name, value in attrs.asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"DigitVideoConfig.{name} must be a whole number >= 1, got {value!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads or self.vision_hidden % self.vision_heads:
            raise InvalidConfigError("widths must divide by their heads, and heads by kv_heads")


def build(config: DigitVideoConfig = DigitVideoConfig(), seed: int = 0) -> torch.nn.Module:
    """A randomly initialised `LlavaForConditionalGeneration` of ``config`` (sdpa attention, fp32)."""
    text = dict(
        vocab_size=task.VOCAB,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.hidden // config.heads,
        max_position_embeddings=4096,
        pad_token_id=task.PAD,
        bos_token_id=task.BOS,
        eos_token_id=task.EOS,
    )
    vision = dict(
        hidden_size=config.vision_hidden,
        intermediate_size=2 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=task.IMAGE_SIZE,
        patch_size=4,
        num_channels=1,
    )
    torch.manual_seed(seed)
    model = llava_model(
        text,
        vision,
        image_token_id=task.IMAGE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop CLIP's class token: 16 image tokens per frame
        image_seq_length=task.TOKENS_PER_FRAME,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    model.config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id = task.PAD
    return model


def save(model: torch.nn.Module, config: DigitVideoConfig, path: str | Path, metadata: dict[str, Any]) -> None:
    """Weights, shapes and ``metadata`` (how it was trained, its accuracy) as one safetensors file, atomically."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(attrs.asdict(config)), "metadata": json.dumps(metadata)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load(path: str | Path | None = None) -> torch.nn.Module:
    """The model saved at ``path`` (default: the shipped one) in eval mode; its training metadata
    is ``model.kvpolicy_metadata``. Raises `CheckpointError` for a missing or foreign file."""
    path = Path(path) if path is not None else SHIPPED
    meta = read_tagged_metadata(path, FORMAT, "digit-video model", "; train one with python -m kvpolicy.vision train")
    model = build(DigitVideoConfig(**json.loads(meta["config"])))
    model.load_state_dict(load_file(str(path)))
    model.kvpolicy_metadata = json.loads(meta["metadata"])
    return model.eval()
