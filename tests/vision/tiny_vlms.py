"""Tiny random vision-language models of four transformers classes, built from configs here (no
hub), each with the inputs its ``generate`` takes: token ids with image placeholders and pixels."""

from __future__ import annotations

import torch

from kvpolicy.integrations.hf.tiny import TEXT_CONFIG

IMAGE, VIDEO, BEGIN, END = 299, 298, 297, 296
_TEXT = {**TEXT_CONFIG, "vocab_size": 300}  # room for the image placeholder ids above
_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_channels=3)


def _prompt(placeholders: list[int], seed: int) -> torch.Tensor:
    text = torch.randint(3, 290, (12,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([text[:5], torch.tensor(placeholders), text[5:]])[None]


def llava(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Two 8×8 images, 16 tokens each (CLIP, 2×2 patches, class token dropped)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_CLIP, image_size=8, patch_size=2),
        text_config=LlamaConfig(**_TEXT),
        image_token_id=IMAGE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    inputs = {"input_ids": _prompt([IMAGE] * 32, seed), "pixel_values": torch.randn(2, 3, 8, 8)}
    return _build(LlavaForConditionalGeneration, config, seed), inputs


def llava_next_video(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """One video of three 8×8 frames, pooled to 4 tokens a frame."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**_CLIP, image_size=8, patch_size=2),
        text_config=LlamaConfig(**_TEXT),
        video_token_id=VIDEO,
        image_token_id=IMAGE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        spatial_pool_stride=2,
        image_grid_pinpoints=[[8, 8]],
    )
    inputs = {"input_ids": _prompt([VIDEO] * 12, seed), "pixel_values_videos": torch.randn(1, 3, 3, 8, 8)}
    return _build(LlavaNextVideoForConditionalGeneration, config, seed), inputs


def gemma3(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """One 16×16 image pooled to 4 tokens (SigLIP), bidirectional within the image; layer 0 slides."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        **_TEXT, sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(**_CLIP, image_size=16, patch_size=4),
        mm_tokens_per_image=4,
        image_token_index=IMAGE,
        boi_token_index=BEGIN,
        eoi_token_index=END,
    )
    ids = _prompt([BEGIN] + [IMAGE] * 4 + [END], seed)
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 16, 16), "token_type_ids": (ids == IMAGE).long()}
    return _build(Gemma3ForConditionalGeneration, config, seed), inputs


def qwen2_vl(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """One 16×16 image as a 4×4 patch grid merged to 2×2 tokens (M-RoPE)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {k: v for k, v in _TEXT.items() if k != "head_dim"}
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2)
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        vision_start_token_id=BEGIN,
        vision_end_token_id=END,
    )
    ids = _prompt([BEGIN] + [IMAGE] * 4 + [END], seed)
    inputs = {
        "input_ids": ids,
        "pixel_values": torch.randn(16, 3 * 2 * 4 * 4),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    }
    return _build(Qwen2VLForConditionalGeneration, config, seed), inputs


def _build(model_class: type, config, seed: int) -> torch.nn.Module:
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = 0
    return model


BUILDERS = {"llava": llava, "llava_next_video": llava_next_video, "gemma3": gemma3, "qwen2_vl": qwen2_vl}
