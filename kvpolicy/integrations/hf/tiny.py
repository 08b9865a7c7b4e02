"""Tiny random-weight causal LMs: 2 layers, grouped-query attention, head_dim 16, seeded, sdpa
attention, fp32. One builder per supported family (`tiny_model(family)`), and a byte-level
tokenizer (`byte_tokenizer`) so task prompts run unchanged on them.

The one home of the tiny models: used by the tests, by the testing kit and plugin authors'
tests (``from kvpolicy.integrations.hf.tiny import tiny_model``) and by evolution runs on ``tiny:<family>`` models, which load in milliseconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from kvpolicy.errors import UnknownComponentError

VOCAB = 256
#: the decoder shape every tiny family shares (tests build vision-language wrappers around it too)
TEXT_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(**TEXT_CONFIG)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(**TEXT_CONFIG, sliding_window=None)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(**TEXT_CONFIG, use_sliding_window=False)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM, Qwen3Config(**TEXT_CONFIG, use_sliding_window=False)


def _gemma3():
    """Hybrid: layer 0 slides over an 8-token window, layer 1 attends fully."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        **TEXT_CONFIG, sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16
    )
    return Gemma3ForCausalLM, config


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    common = {k: v for k, v in TEXT_CONFIG.items() if k != "head_dim"}  # Phi-3 derives head_dim = hidden / heads
    return Phi3ForCausalLM, Phi3Config(**common, sliding_window=None)


BUILDERS: dict[str, Callable[[], tuple[type, object]]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma3": _gemma3,
    "phi3": _phi3,
}
FAMILIES = tuple(BUILDERS)


def tiny_model(family: str = "llama", seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A seeded random-weight model of ``family`` in eval mode (fp32)."""
    if family not in BUILDERS:
        raise UnknownComponentError("tiny model family", family, BUILDERS)
    model_cls, config = BUILDERS[family]()
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # random init leaves small weights; scale up so attention is not near-uniform
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                param.mul_(4.0)
    return model.eval()


def random_ids(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """``[batch, tokens]`` token ids avoiding the special ids 0–2."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, tokens), generator=generator)


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.cache
def byte_tokenizer() -> Any:
    """A transformers tokenizer with one token per byte (ids 0–255; the tiny models' vocabulary),
    decoding back to text: a `tokenizers` BPE model with no merges and a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()  # byte value → printable unicode symbol, as GPT-2's byte-level BPE
    vocab = {symbol: byte for byte, symbol in alphabet.items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    fast.chat_template = _CHAT_TEMPLATE
    return fast
