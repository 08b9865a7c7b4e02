"""The recompute reference for attention statistics: what the in-pass path is tested against.

In production the attention pass computes the statistics a policy declared from its own
probabilities (`kvpolicy.integrations.hf.in_pass`). Here the output comes from the model's own
kernel (`kvpolicy.integrations.hf.attention.plain_attention`) and the statistics from a second,
straightforward pass over the scores (`kvpolicy.testing.statistics`), recorded into the cache
exactly where the in-pass ones go (`EvictingCache.record_in_pass`). Runs attached with
`attach_recomputing` must keep the same tokens and give the same logits as runs attached
normally, to float tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvpolicy.errors import InvalidConfigError
from kvpolicy.integrations.hf.adapter import HFAdapter
from kvpolicy.integrations.hf.attach import Attachment
from kvpolicy.integrations.hf.attention import AttentionRoute, make_attention_function, plain_attention, scaling_of
from kvpolicy.integrations.hf.cache import EvictingLayer
from kvpolicy.testing.statistics import attention_columns, attention_rows


def recomputing_attention(route: AttentionRoute) -> Callable[..., tuple[torch.Tensor, Any]]:
    """An attention function for ``route``: the model's output, then the reference statistics."""
    production = make_attention_function(route)

    def recomputing(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        if route.repeat is not None:  # KVzip's repeat pass: its own reference is an eager run (tests/plugins)
            return production(module, query, key, value, attention_mask, **kwargs)
        output, weights = plain_attention(route, module, query, key, value, attention_mask, **kwargs)
        cache, index = route.cache, getattr(module, "layer_idx", None)
        if cache is None or index is None or not cache.records_statistics(index):
            return output, weights
        layer: EvictingLayer = cache.layers[index]
        requirements = cache.requirements
        scaling, softcap = scaling_of(module, query, kwargs), kwargs.get("softcap")
        query, key = query.detach(), key.detach()
        rows = columns = None
        window = min(query.shape[2], requirements.attention_window)
        if window:
            # the call's new tokens are the layer's newest slots (eviction runs between calls only)
            query_positions = layer.positions[:, 0, -window:]
            rows = attention_rows(
                query[:, :, -window:],
                query_positions,
                key,
                layer.positions,
                layer.valid,
                scaling=scaling,
                softcap=softcap,
            )
        if requirements.accumulated_attention:
            columns = attention_columns(query, key, layer.valid, scaling=scaling, softcap=softcap)
        cache.record_in_pass(index, rows, columns)
        return output, weights

    return recomputing


def attach_recomputing(model: torch.nn.Module, policy: Any) -> Attachment:
    """``with attach_recomputing(model, policy) as handle``: like ``policy.attach(model)``, with
    the statistics recorded by the recompute reference instead of the attention pass."""
    return HFAdapter(model).attach(policy, attention=recomputing_attention)


#: the two ways statistics reach a policy in the tests: production's and this reference
STATISTICS_PATHS = ("in_pass", "recompute")


def attach_with(statistics: str, model: torch.nn.Module, policy: Any) -> Attachment:
    """``policy`` attached with the ``in_pass`` statistics (production) or the ``recompute`` reference."""
    if statistics not in STATISTICS_PATHS:
        raise InvalidConfigError(f"statistics must be one of {', '.join(STATISTICS_PATHS)}, got {statistics!r}")
    return attach_recomputing(model, policy) if statistics == "recompute" else HFAdapter(model).attach(policy)
