"""Attaching a policy to a transformers model (the wiring), and the handle that drives it.

``with policy.attach(model) as handle:`` registers kvpolicy's attention and mask functions,
switches the model's attention implementation to them, and adds two torch hooks on the model:
before each forward call it gives the new tokens their absolute ``position_ids`` (after eviction
RoPE needs the true positions, not the shrunken cache length; in a left-padded batch, each row's
own) and hands the cache which new tokens are padding; after
each forward call — between calls, never inside transformers' ``cache.update`` (the append) — the
cache runs its eviction pass (`EvictingCache.eviction_pass`). ``model.generate`` is wrapped so
that it starts from a fresh evicting cache and knows where the prompt ends (``after_prefill``
fires once the prompt is consumed, chunked prefill included); given ``context_end=n`` it runs the
``context-first`` protocol instead (`kvpolicy.integrations.hf.context_first`). Leaving the block
undoes all of it. A vision-language wrapper (e.g. `LlavaForConditionalGeneration`) is hooked the
same way: its forward merges the image features into the embeddings and hands them, with the
positions, to its language model, whose cache holds image and text tokens alike.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from kvpolicy import native
from kvpolicy.errors import AttachError, InvalidConfigError, ShapeError, UnsupportedModelError
from kvpolicy.integrations.hf import context_first
from kvpolicy.integrations.hf.attention import (
    SUPPORTED_IMPLEMENTATIONS,
    AttentionRoute,
    is_registered,
    make_attention_function,
    make_mask_function,
    register_functions,
    unregister_functions,
)
from kvpolicy.integrations.hf.cache import EvictingCache, layer_types
from kvpolicy.integrations.hf.generate import GenerationResult, cache_keyword, generate_on_cache, given_cache
from kvpolicy.integrations.hf.handle import Handle, chunk_sizes
from kvpolicy.integrations.hf.inputs import check_forward_inputs
from kvpolicy.integrations.hf.reconstruction import reconstruct_if_due
from kvpolicy.integrations.hf.report import budget_override_note
from kvpolicy.integrations.hf.transfer import transfer_note

__all__ = ["Attachment", "GenerationResult", "Handle", "cache_keyword", "chunk_sizes"]

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NAMES = itertools.count()
_LOCK = threading.Lock()


def _on_cpu(model: torch.nn.Module) -> bool:
    parameter = next(model.parameters(), None)
    return parameter is None or parameter.device.type == "cpu"


class Attachment(AbstractContextManager):
    """One policy attached to one model (see the module docstring). ``__enter__`` returns a `Handle`."""

    def __init__(
        self,
        model: torch.nn.Module,
        policy: Any,
        family: str,
        attention: Callable[[AttentionRoute], Callable[..., Any]] = make_attention_function,
    ) -> None:
        #: what the attention function reads (named and pointed at a cache while attached)
        self.route = AttentionRoute("", "")
        #: makes the attention function registered for the route (the test kit's recompute
        #: reference, `kvpolicy.testing.recompute`, passes its own)
        self.make_attention = attention
        self.model = model
        self.policy = policy
        self.family = family
        self.config = model.config.get_text_config(decoder=True)
        self.num_layers = self.config.num_hidden_layers
        types = layer_types(self.config)
        skip = set(policy.skip_layers)
        bad = sorted(i for i in skip if not 0 <= i < self.num_layers)
        if bad:
            raise InvalidConfigError(f"skip_layers {bad} do not exist: the model has layers 0..{self.num_layers - 1}")
        evicts = policy.schedule.kind != "never"
        self.managed = tuple(i for i, t in enumerate(types) if t == "full_attention" and i not in skip and evicts)
        self.requirements = policy.requirements
        self._fixed_notes = self._notes(types, skip)
        #: the latest ``model.generate`` ran with ``use_cache=False``: no cache, so no policy effect
        self.uncached = False
        self.cache: EvictingCache | None = None
        self._hooks: list[Any] = []
        self._saved_implementations: list[tuple[Any, Any]] = []
        self._had_generate = False
        self._wraps_generate = False
        self._entered = False
        #: while true, forward calls record statistics but no layer evicts (`Handle.feed(evict=False)`)
        self.deferring = False

    def _notes(self, types: list[str], skip: set[int]) -> tuple[str, ...]:
        notes = []
        sliding = [i for i, t in enumerate(types) if t != "full_attention"]
        if sliding:
            notes.append(
                f"{len(sliding)} of {len(types)} layers use sliding-window attention and trim themselves to their "
                f"window; the policy evicts only the {len(types) - len(sliding)} full-attention layers"
            )
        if skip:
            notes.append(f"layers {sorted(skip)} are skipped by the policy and keep every token")
        if self.policy.schedule.kind == "never":
            notes.append("schedule 'never': every token is kept")
        if (transfer := transfer_note(self.policy, self.model)) is not None:
            notes.append(transfer)
        return tuple(notes)

    @property
    def notes(self) -> tuple[str, ...]:
        """What the report must say besides its figures: the fixed notes of this model and policy,
        then what the latest run did that the figures alone do not show."""
        notes = list(self._fixed_notes)
        if self.uncached:
            notes.append(
                "use_cache=False: generate ran without a cache, so the policy kept and evicted nothing "
                "(exactly the bare model's logits); the figures describe an empty cache"
            )
        elif self.cache is not None and self.cache.eviction_passes and self.policy.schedule.kind != "never":
            note = budget_override_note(self.policy.budget, self.policy.protect, self.cache.fewest_tokens)
            if note:
                notes.append(note)
        return tuple(notes)

    # ----------------------------------------------------------------- enter / exit

    def __enter__(self) -> Handle:
        if self._entered:
            raise AttachError("this attachment is already in use; call policy.attach(model) again for a new one")
        if self.requirements.needs_attention and self.managed and _on_cpu(self.model):
            native.available()  # a first build of the native kernels happens here, not inside a timed forward
        with _LOCK:
            if self.model in _ATTACHED:
                raise AttachError(
                    f"a policy is already attached to this {type(self.model).__name__} "
                    f"({_ATTACHED[self.model].policy!r}); leave its `with` block before attaching another"
                )
            implementation = self.config._attn_implementation  # the language model's (a vision tower keeps its own)
            if implementation not in SUPPORTED_IMPLEMENTATIONS:
                raise UnsupportedModelError(
                    f"attention implementation {implementation!r} is not supported; load the model with "
                    f"attn_implementation in {SUPPORTED_IMPLEMENTATIONS}"
                )
            name = f"kvpolicy_{next(_NAMES)}"
            while is_registered(name):
                name = f"kvpolicy_{next(_NAMES)}"
            self.route.name, self.route.implementation = name, implementation
            _ATTACHED[self.model] = self
        register_functions(name, self.make_attention(self.route), make_mask_function(self.route))
        self._saved_implementations = [(c, c.__dict__.get("_attn_implementation_internal")) for c in self._configs()]
        self._switch_language_model(name)
        self._hooks = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward),
        ]
        # A base model (LlamaModel, driven with inputs_embeds) has no generate to wrap.
        self._wraps_generate = hasattr(self.model, "generate")
        self._had_generate = "generate" in self.model.__dict__
        if self._wraps_generate:
            self._original_generate = self.model.generate
            self.model.generate = self._generate
        self._entered = True
        return Handle(self)

    def _switch_language_model(self, name: str) -> None:
        """Route the language model's attention and masks through ``name``. In a vision-language
        wrapper only its own config and the language model's switch: the vision tower attends
        without a cache, so it keeps its implementation (and none of its layers is taken for a
        decoder layer of the same index)."""
        if self.config is self.model.config:
            self.model.config._attn_implementation = name  # transformers sets every sub-config too
            return
        for config in (self.model.config, self.config):
            config.__dict__["_attn_implementation_internal"] = name

    def _configs(self) -> list[Any]:
        """The model's config and every sub-config (their attention implementation is switched together)."""
        seen, stack, out = set(), [self.model.config], []
        while stack:
            config = stack.pop()
            if id(config) in seen:
                continue
            seen.add(id(config))
            out.append(config)
            for key in getattr(config, "sub_configs", {}) or {}:
                sub = getattr(config, key, None)
                if sub is not None:
                    stack.append(sub)
        return out

    def __exit__(self, *exc_info: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for config, value in self._saved_implementations:
            config.__dict__["_attn_implementation_internal"] = value
        unregister_functions(self.route.name)
        if self._wraps_generate and self._had_generate:
            self.model.generate = self._original_generate
        elif self._wraps_generate:
            self.model.__dict__.pop("generate", None)
        self.route.cache = None
        with _LOCK:
            if _ATTACHED.get(self.model) is self:
                del _ATTACHED[self.model]

    # ----------------------------------------------------------------- caches

    def new_cache(self) -> EvictingCache:
        return EvictingCache(self.config, self.managed, self.requirements)

    def owns(self, cache: Any) -> bool:
        return (
            isinstance(cache, EvictingCache)
            and cache.managed == self.managed
            and cache.requirements == self.requirements
        )

    # ----------------------------------------------------------------- hooks around every forward call

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        cache = given_cache(kwargs)
        if not self.owns(cache):
            self.route.cache = None
            return None
        if kwargs.get("use_cache") is False:  # the model would still append to the cache it was given
            raise AttachError(
                "the model was called with use_cache=False and the policy's cache: the tokens would be written "
                "into the cache anyway and numbered as new ones. Call it without the cache for a cacheless "
                "forward, or with use_cache=True"
            )
        self.uncached = False
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        inputs = input_ids if input_ids is not None else embeds
        if inputs is None:
            raise ShapeError("the model was called with neither input_ids nor inputs_embeds")
        batch, new = inputs.shape[:2]
        check_forward_inputs(self.model, input_ids, embeds, whole_prompt=new > 1 or not cache.seen)
        valid = self._new_tokens_valid(kwargs.get("attention_mask"), cache, batch, new)
        kwargs["attention_mask"] = None  # the cache masks padded slots itself (the 2-D mask stops lining up)
        if self.requirements.token_ids and input_ids is None:
            raise UnsupportedModelError("this policy needs token ids; call the model with input_ids, not inputs_embeds")
        kwargs["position_ids"] = cache.begin_forward(new, input_ids, inputs.device, batch, valid)
        self.route.cache = cache
        self.cache = cache
        return args, kwargs

    @staticmethod
    def _new_tokens_valid(mask: Any, cache: EvictingCache, batch: int, new: int) -> torch.Tensor | None:
        """The new tokens' columns of a 2-D ``attention_mask`` (the call's own ``[batch, new]``, or
        ``[batch, seen + new]`` as ``generate`` passes it) as bool, or None without padding."""
        if mask is None:
            return None
        if (
            isinstance(mask, dict)
            or mask.dim() != 2
            or mask.shape[0] != batch
            or mask.shape[1] not in (new, cache.seen + new)
        ):
            shape = "a dict" if isinstance(mask, dict) else tuple(mask.shape)
            raise ShapeError(
                f"with a policy attached, pass a 2-D attention_mask [batch, tokens] covering this call's {new} tokens "
                f"or all {cache.seen + new} so far, or none; got {shape}"
            )
        valid = mask[:, -new:].bool()
        return None if bool(valid.all()) and cache.column_valid is None else valid

    def _after_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        cache, self.route.cache = self.route.cache, None
        if cache is not None and not self.deferring:
            reconstruct_if_due(self, cache)  # KVzip's repeat pass, when a layer due now reads it
            cache.eviction_pass(self.policy)

    @property
    def active(self) -> bool:
        """Whether this attachment is entered and still the one attached to its model."""
        return self._entered and _ATTACHED.get(self.model) is self

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("context_end") is not None:  # the context-first protocol: kvpolicy's own decoding loop
            return self._generate_context_first(*args, **kwargs)
        kwargs.pop("context_end", None)
        return generate_on_cache(self, self._original_generate, *args, **kwargs)

    def _generate_context_first(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``model.generate(input_ids, context_end=n, prefill_chunk_size=..., ...)``: see `context_first.generate`."""
        input_ids = kwargs.pop("input_ids", kwargs.pop("inputs", args[0] if args else None))
        if input_ids is None:
            raise ShapeError("model.generate with context_end needs input_ids")
        if given_cache(kwargs) is not None:
            raise AttachError("model.generate with context_end starts a fresh cache of its own; pass no cache")
        if kwargs.pop("use_cache", None) is False:
            raise AttachError("context_end compresses the context's cache; it cannot run with use_cache=False")
        for key in ("cache", "past_key_values"):
            kwargs.pop(key, None)
        handle = Handle(self)
        return context_first.generate(
            handle,
            input_ids,
            kwargs.pop("context_end"),
            attention_mask=kwargs.pop("attention_mask", None),
            chunk_size=kwargs.pop("prefill_chunk_size", None),
            **kwargs,
        )
