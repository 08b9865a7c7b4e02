"""``model.generate`` with a policy attached: a fresh evicting cache, and where the prompt ends.

While a policy is attached, the model's ``generate`` is this wrapper (`generate_on_cache`): it
starts every call from a fresh `EvictingCache` (or the handle's own, still empty), tells the cache
where the prompt ends (``after_prefill`` fires once the prompt is consumed, chunked prefill
included), refuses what eviction cannot serve (beam search, assisted decoding, continuing a cache
that already holds tokens) and runs cacheless when asked to, so the report says the policy did
nothing. `GenerationResult` is what `Policy.generate` returns.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import attrs
import torch

from kvpolicy.errors import AttachError, BudgetOverriddenWarning, ShapeError, UnsupportedModelError
from kvpolicy.integrations.hf.inputs import check_rows_have_tokens
from kvpolicy.integrations.hf.report import budget_override_note
from kvpolicy.types import CacheReport


def cache_keyword(model: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier 5.x), read from forward's signature."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def given_cache(kwargs: dict[str, Any]) -> Any:
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


@attrs.frozen(eq=False)
class GenerationResult:
    """What `Policy.generate` returns: ``sequences`` (prompt + new tokens), ``new_tokens`` and the cache report."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    report: CacheReport


def _uses_cache(model: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """``use_cache`` as ``generate`` will read it: the keyword, else the generation config given, else the model's."""
    if kwargs.get("use_cache") is not None:
        return bool(kwargs["use_cache"])
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, "use_cache", True) is not False


def generate_on_cache(attachment: Any, original_generate: Any, *args: Any, **kwargs: Any) -> Any:
    """``original_generate(*args, **kwargs)`` on ``attachment``'s evicting cache (see the module docstring)."""
    given = given_cache(kwargs)
    if not _uses_cache(attachment.model, kwargs):
        # Without a cache every step re-feeds the whole sequence; handed the policy's cache, the
        # model would append it again as new tokens (wrong logits). Run it cacheless: exact, and
        # the report says the policy did nothing.
        if given is not None:
            raise AttachError("model.generate got use_cache=False and a cache; drop one of them")
        attachment.cache = attachment.new_cache()
        attachment.uncached = True
        return original_generate(*args, **kwargs)
    attachment.uncached = False
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    if given is None:
        cache = attachment.new_cache()
    elif not attachment.owns(given):
        raise AttachError(
            f"model.generate got a {type(given).__name__}; with a policy attached, leave the cache to kvpolicy "
            "(or pass handle.cache after handle.reset())"
        )
    elif given.seen:
        raise AttachError(
            "model.generate cannot continue from a cache that already holds tokens (transformers would slice the "
            "prompt by the evicted cache's length); feed the continuation with handle.feed instead"
        )
    else:
        cache = given
    for option in ("assistant_model", "prompt_lookup_num_tokens"):
        if kwargs.get(option) is not None:
            raise UnsupportedModelError(f"{option} (assisted decoding) is not supported with a policy attached")
    if int(kwargs.get("num_beams", 1) or 1) > 1:
        raise UnsupportedModelError("beam search is not supported with a policy attached; use greedy or sampling")
    inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if inputs is None and kwargs.get("inputs_embeds") is not None:
        inputs = kwargs["inputs_embeds"]
    if inputs is None:
        raise ShapeError("model.generate needs input_ids (or inputs_embeds) with a policy attached")
    check_rows_have_tokens(kwargs.get("attention_mask"))
    cache.prompt_end = inputs.shape[1]
    kwargs[cache_keyword(attachment.model)] = cache
    attachment.cache = cache
    output = original_generate(*args, **kwargs)
    if cache.eviction_passes and attachment.policy.schedule.kind != "never":
        note = budget_override_note(attachment.policy.budget, attachment.policy.protect, cache.fewest_tokens)
        if note:
            warnings.warn(note, BudgetOverriddenWarning, stacklevel=3)  # the caller of model.generate
    return output
