"""The attention function and mask function kvpolicy registers while a policy is attached.

Both are registered under the attachment's own name (``kvpolicy_<n>``) in transformers'
`AttentionInterface` and `AttentionMaskInterface` when a policy attaches, and removed when it
detaches; transformers' own entries are never touched. The mask function is the model's original
one (sdpa or eager): without a mask function under the new name, transformers builds no causal
mask at all and multi-token chunks over a cache would silently attend to the wrong tokens.

The attention function computes the output with the model's original implementation whenever
the layer's cache lines up with the mask transformers built (always, while nothing has been
evicted, so a keep-all policy gives identical logits). A layer whose physical length differs from
the mask's (layers evict differently) or that has padded slots gets its own mask: every valid
cached token plus the new tokens causally. On top of the output it records only the statistics
the policy declared (`kvpolicy.types.Requirements`), computed in the same pass
(`kvpolicy.integrations.hf.in_pass`) and kept by the cache of the forward call
(`EvictingCache.record_in_pass`); a key-only policy costs nothing extra. The test kit's reference
(`kvpolicy.testing.recompute`) records them from a second pass over the scores instead.

What the two functions read is an `AttentionRoute`, which the attachment owns and points at the
cache of each forward call: this module knows nothing of the attachment.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from kvpolicy.errors import AttachError, UnsupportedModelError
from kvpolicy.integrations.hf import in_pass
from kvpolicy.integrations.hf.cache import EvictingCache, EvictingLayer

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


@attrs.define
class AttentionRoute:
    """What the attention and mask functions registered under ``name`` read: the model's own
    ``implementation`` (``sdpa`` / ``eager``) they wrap and the ``cache`` of the forward call in
    flight (None outside one, or for a cache the policy does not own: then attention is the
    model's own). ``repeat``, while the context is being repeated for a policy reading
    reconstruction attention, attends the managed layers instead and keeps what they received
    (`kvpolicy.integrations.hf.reconstruction.RepeatRecord`)."""

    name: str
    implementation: str
    cache: EvictingCache | None = None
    repeat: Any = None


def register_functions(name: str, attention: Callable[..., Any], mask: Callable[..., Any]) -> None:
    """Register an attention and a mask function under ``name`` in transformers' interfaces."""
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)


def unregister_functions(name: str) -> None:
    """Remove what `register_functions` registered under ``name`` (transformers' own entries stay)."""
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def is_registered(name: str) -> bool:
    return name in AttentionInterface._global_mapping or name in AttentionMaskInterface._global_mapping


def original_attention(implementation: str, module: torch.nn.Module) -> Callable[..., Any]:
    """The function transformers would call for ``implementation`` in ``module``'s model."""
    if implementation == "eager":
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise UnsupportedModelError(f"{type(module).__name__} has no eager_attention_forward to fall back on")
        return function
    return ALL_ATTENTION_FUNCTIONS[implementation]


def original_mask(implementation: str) -> Callable[..., Any]:
    return ALL_MASK_ATTENTION_FUNCTIONS[implementation]


def _repeat_heads(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def visibility(past: int, new: int, valid: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[batch or 1, kv_heads or 1, new, past + new]`` bool: which tokens each new query may see
    (every valid cached token, and the valid new tokens causally). ``valid [batch, kv_heads, ≥
    past + new]`` marks padded slots, new ones included; a padded query sees itself only, so its
    softmax has a finite row (its output is never read)."""
    causal = torch.ones(new, new, dtype=torch.bool, device=device).tril()
    seen_past = torch.ones(new, past, dtype=torch.bool, device=device)
    mask = torch.cat([seen_past, causal], dim=1)[None, None]
    if valid is not None:
        past_valid = valid[:, :, None, :past].expand(-1, -1, new, -1)
        new_valid = valid[:, :, None, past : past + new]
        own = torch.eye(new, dtype=torch.bool, device=device)
        block = causal & (new_valid | own) if new_valid.shape[-1] == new else causal.expand(*valid.shape[:2], -1, -1)
        mask = torch.cat([past_valid, block], 3)
    return mask


def valid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """What `masked_attention` computes, through kvpolicy's own kernel (`in_pass.attend`, no
    statistics): each GQA group attended as one matrix per KV head, so keys and values are never
    repeated, and no mask tensor is built (the native kernel for float32 on the CPU). Through sdpa
    with a mask and repeated keys, a padded batch's full cache decoded several times slower."""
    if valid is not None:
        valid = valid[:, :, : key.shape[2]]
    output, _, _ = in_pass.attend(query, key, value, valid=valid, scaling=scaling, softcap=softcap)
    return output


def masked_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Attention over every valid cached token and the new tokens causally: ``[batch, queries, heads,
    head_dim]``, with a mask and sdpa (the reference `valid_attention` is tested against)."""
    new = query.shape[2]
    return attention_with_mask(
        query, key, value, visibility(key.shape[2] - new, new, valid, key.device), scaling, softcap
    )


def attention_with_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Attention where ``mask [batch or 1, kv_heads or 1, queries, tokens]`` is True:
    ``[batch, queries, heads, head_dim]``."""
    heads = query.shape[1]
    groups = heads // key.shape[1]
    if mask.shape[1] != 1:
        mask = _repeat_heads(mask, groups)
    keys, values = _repeat_heads(key, groups), _repeat_heads(value, groups)
    if softcap:
        scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(weights, values)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _attend_in_pass(
    original: Callable[..., Any],
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer_idx: int,
    cache: EvictingCache,
    mask_fits: bool,
    scaling: float,
    softcap: float | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """The call's output ``[batch, queries, heads, head_dim]``, recording the statistics the
    policy declared in the same pass: queries whose probabilities are needed (all of them for
    received attention, the newest ``attention_window`` for rows) are attended explicitly
    (`in_pass.attend`); the older ones by the model's own kernel where its mask fits the cache,
    else explicitly too (padded slots, heads keeping different tokens: one call for all)."""
    requirements = cache.requirements
    layer = cache.layers[layer_idx]
    new, tokens = query.shape[2], key.shape[2]
    past = tokens - new
    rows = min(new, requirements.attention_window)
    own_kernel = layer.valid is None and mask_fits
    explicit = new if requirements.accumulated_attention or not own_kernel else rows
    prefix = new - explicit
    query, key, value = query.detach(), key.detach(), value.detach()
    output, row_stats, columns = in_pass.attend(
        query[:, :, prefix:],
        key,
        value,
        valid=layer.valid,
        scaling=scaling,
        softcap=softcap,
        rows=rows,
        columns=requirements.accumulated_attention,
    )
    if prefix:  # only where the model's own kernel attends them
        visible = past + prefix
        mask = None if attention_mask is None else attention_mask[..., :prefix, :visible]
        older, _ = original(module, query[:, :, :prefix], key[:, :, :visible], value[:, :, :visible], mask, **kwargs)
        output = torch.cat([older, output], dim=1)
    cache.record_in_pass(layer_idx, row_stats, columns)
    return output


def _sliding_mask(column_valid: torch.Tensor, new: int, tokens: int, window: int) -> torch.Tensor | None:
    """``[batch, 1, new, tokens]`` mask of a sliding-window layer holding the last ``tokens``
    columns, when left padding lies among them (None otherwise: the model's own mask is right).
    Each query sees the valid columns less than ``window`` back, and a padded query itself."""
    valid = column_valid[:, -tokens:]
    if bool(valid.all()):
        return None
    device = valid.device
    queries = torch.arange(tokens - new, tokens, device=device)[:, None]
    keys = torch.arange(tokens, device=device)[None, :]
    reach = (keys <= queries) & (queries - keys < window)
    return (reach[None] & (valid[:, None, :] | (keys == queries)[None]))[:, None]


def scaling_of(module: torch.nn.Module, query: torch.Tensor, kwargs: dict[str, Any]) -> float:
    """The softmax scale the model passes (``scaling``), else the module's, else 1/sqrt(head_dim)."""
    return kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)


def _check_mask(
    route: AttentionRoute, attention_mask: torch.Tensor | None, layer_idx: int, new: int, past: int
) -> None:
    if attention_mask is None and new > 1 and past > 0:
        raise AttachError(
            f"no causal mask reached the attention of layer {layer_idx} for a {new}-token chunk over "
            f"{past} cached tokens: the mask function {route.name!r} is not registered in "
            "transformers' AttentionMaskInterface"
        )


def plain_attention(
    route: AttentionRoute,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The layer's attention output, recording nothing: the model's own kernel where the cache
    lines up with transformers' mask, kvpolicy's mask where it does not (heads that keep
    different tokens, padded slots, left padding in a sliding window)."""
    original = original_attention(route.implementation, module)
    cache = route.cache
    layer_idx = getattr(module, "layer_idx", None)
    layer = cache.layers[layer_idx] if cache is not None and layer_idx is not None else None
    if not isinstance(layer, EvictingLayer):
        if isinstance(layer, DynamicSlidingWindowLayer) and cache.column_valid is not None:
            padded = _sliding_mask(cache.column_valid, query.shape[2], key.shape[2], layer.sliding_window)
            if padded is not None:
                scaling = scaling_of(module, query, kwargs)
                return attention_with_mask(query, key, value, padded, scaling, kwargs.get("softcap")), None
        return original(module, query, key, value, attention_mask, **kwargs)
    new, tokens = query.shape[2], key.shape[2]
    _check_mask(route, attention_mask, layer_idx, new, tokens - new)
    if layer.valid is None and (attention_mask is None or attention_mask.shape[-1] == tokens):
        return original(module, query, key, value, attention_mask, **kwargs)
    scaling = scaling_of(module, query, kwargs)
    return valid_attention(query, key, value, layer.valid, scaling, kwargs.get("softcap")), None


def make_attention_function(route: AttentionRoute) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention function of one route (a closure: it reads the cache in use): for a layer
    whose statistics the policy reads, the output and the statistics in one pass; otherwise
    `plain_attention`."""

    def kvpolicy_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        cache = route.cache
        layer_idx = getattr(module, "layer_idx", None)
        if route.repeat is not None and cache is not None and layer_idx in cache.managed:
            valid = cache.layers[layer_idx].valid
            scaling = scaling_of(module, query, kwargs)
            return route.repeat.attend(layer_idx, query, key, value, valid, scaling, kwargs.get("softcap")), None
        if cache is None or layer_idx is None or not cache.records_statistics(layer_idx):
            return plain_attention(route, module, query, key, value, attention_mask, **kwargs)
        new, tokens = query.shape[2], key.shape[2]
        _check_mask(route, attention_mask, layer_idx, new, tokens - new)
        start = time.perf_counter()
        output = _attend_in_pass(
            original_attention(route.implementation, module),
            module,
            query,
            key,
            value,
            attention_mask,
            layer_idx,
            cache,
            attention_mask is None or attention_mask.shape[-1] == tokens,
            scaling_of(module, query, kwargs),
            kwargs.get("softcap"),
            kwargs,
        )
        cache.policy_seconds += time.perf_counter() - start
        return output, None

    return kvpolicy_attention


def make_mask_function(route: AttentionRoute) -> Callable[..., Any]:
    """The mask function of one route: the model's original one, under kvpolicy's name."""
    mask = original_mask(route.implementation)

    def kvpolicy_mask(*args: Any, **kwargs: Any) -> Any:
        return mask(*args, **kwargs)

    return kvpolicy_mask
