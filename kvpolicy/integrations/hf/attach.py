"""Attaching a policy to a transformers model (the wiring), and the handle that drives it.

``with policy.attach(model) as handle:`` registers kvpolicy's attention and mask functions,
switches the model's attention implementation to them, and adds two torch hooks on the model:
before each forward call it gives the new tokens their absolute ``position_ids`` (after eviction
RoPE needs the true positions, not the shrunken cache length; in a left-padded batch, each row's
own) and hands the cache which new tokens are padding; after
each forward call — between calls, never inside transformers' ``cache.update`` (the append) — the
cache runs its eviction pass (`EvictingCache.eviction_pass`). ``model.generate`` is wrapped so
that it starts from a fresh evicting cache and knows where the prompt ends (``after_prefill``
fires once the prompt is consumed, chunked prefill included). Leaving the block undoes all of it.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import attrs
import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from kvpolicy import native
from kvpolicy.errors import (
    AttachError,
    BudgetOverriddenWarning,
    InvalidConfigError,
    ShapeError,
    UnsupportedModelError,
)
from kvpolicy.integrations.hf.attention import (
    SUPPORTED_IMPLEMENTATIONS,
    AttentionRoute,
    make_attention_function,
    make_mask_function,
)
from kvpolicy.integrations.hf.cache import EvictingCache, EvictingLayer, layer_types
from kvpolicy.integrations.hf.inputs import check_chunk_size, check_forward_inputs, check_row, check_rows_have_tokens
from kvpolicy.integrations.hf.report import budget_override_note, build_report
from kvpolicy.integrations.hf.transfer import transfer_note
from kvpolicy.types import CacheReport

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NAMES = itertools.count()
_LOCK = threading.Lock()


def cache_keyword(model: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier 5.x), read from forward's signature."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _given_cache(kwargs: dict[str, Any]) -> Any:
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def chunk_sizes(tokens: int, chunk_size: int | None, align_end: bool = False) -> list[int]:
    """Forward-call sizes for ``tokens`` in chunks of ``chunk_size`` (None: one call), from the
    start, or with ``align_end`` from the end (the first chunk takes the remainder)."""
    size = chunk_size or tokens
    whole, remainder = divmod(tokens, size)
    if not remainder:
        return [size] * whole
    return [remainder] + [size] * whole if align_end else [size] * whole + [remainder]


@attrs.frozen(eq=False)
class GenerationResult:
    """What `Policy.generate` returns: ``sequences`` (prompt + new tokens), ``new_tokens`` and the cache report."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    report: CacheReport


def _on_cpu(model: torch.nn.Module) -> bool:
    parameter = next(model.parameters(), None)
    return parameter is None or parameter.device.type == "cpu"


class Attachment(AbstractContextManager):
    """One policy attached to one model (see the module docstring). ``__enter__`` returns a `Handle`."""

    def __init__(self, model: torch.nn.Module, policy: Any, family: str, statistics: str = "in_pass") -> None:
        #: what the attention function reads (named and pointed at a cache while attached);
        #: ``statistics``: how attention statistics are computed (`attention.STATISTICS_PATHS`)
        self.route = AttentionRoute("", "", statistics)
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
        elif self.cache is not None and self.cache.updates and self.policy.schedule.kind != "never":
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
            implementation = self.model.config._attn_implementation
            if implementation not in SUPPORTED_IMPLEMENTATIONS:
                raise UnsupportedModelError(
                    f"attention implementation {implementation!r} is not supported; load the model with "
                    f"attn_implementation in {SUPPORTED_IMPLEMENTATIONS}"
                )
            name = f"kvpolicy_{next(_NAMES)}"
            while name in AttentionInterface._global_mapping or name in AttentionMaskInterface._global_mapping:
                name = f"kvpolicy_{next(_NAMES)}"
            self.route.name, self.route.implementation = name, implementation
            _ATTACHED[self.model] = self
        AttentionInterface.register(name, make_attention_function(self.route))
        AttentionMaskInterface.register(name, make_mask_function(self.route))
        self._saved_implementations = [(c, c.__dict__.get("_attn_implementation_internal")) for c in self._configs()]
        self.model.config._attn_implementation = name
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
        AttentionInterface._global_mapping.pop(self.route.name, None)
        AttentionMaskInterface._global_mapping.pop(self.route.name, None)
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

    def _own(self, cache: Any) -> bool:
        return (
            isinstance(cache, EvictingCache)
            and cache.managed == self.managed
            and cache.requirements == self.requirements
        )

    # ----------------------------------------------------------------- hooks around every forward call

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        cache = _given_cache(kwargs)
        if not self._own(cache):
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
            cache.eviction_pass(self.policy)

    # ----------------------------------------------------------------- generate

    def _uses_cache(self, kwargs: dict[str, Any]) -> bool:
        """``use_cache`` as ``generate`` will read it: the keyword, else the generation config given, else the model's."""
        if kwargs.get("use_cache") is not None:
            return bool(kwargs["use_cache"])
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        return getattr(config, "use_cache", True) is not False

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        given = _given_cache(kwargs)
        if not self._uses_cache(kwargs):
            # Without a cache every step re-feeds the whole sequence; handed the policy's cache, the
            # model would append it again as new tokens (wrong logits). Run it cacheless: exact, and
            # the report says the policy did nothing.
            if given is not None:
                raise AttachError("model.generate got use_cache=False and a cache; drop one of them")
            self.cache = self.new_cache()
            self.uncached = True
            return self._original_generate(*args, **kwargs)
        self.uncached = False
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        if given is None:
            cache = self.new_cache()
        elif not self._own(given):
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
        kwargs[cache_keyword(self.model)] = cache
        self.cache = cache
        output = self._original_generate(*args, **kwargs)
        if cache.updates and self.policy.schedule.kind != "never":
            note = budget_override_note(self.policy.budget, self.policy.protect, cache.fewest_tokens)
            if note:
                warnings.warn(note, BudgetOverriddenWarning, stacklevel=2)
        return output


class Handle:
    """What ``with policy.attach(model) as handle`` gives: the cache in use, feeding, resetting, reporting."""

    def __init__(self, attachment: Attachment) -> None:
        self._attachment = attachment

    @property
    def policy(self) -> Any:
        return self._attachment.policy

    @property
    def cache(self) -> EvictingCache:
        """The cache of the latest ``model.generate`` or `feed` (a fresh one if neither ran yet)."""
        if self._attachment.cache is None:
            self._attachment.cache = self._attachment.new_cache()
        return self._attachment.cache

    def reset(self) -> None:
        """Start over with a fresh, empty cache."""
        self._attachment.cache = self._attachment.new_cache()

    @contextlib.contextmanager
    def fork_row(self, row: int) -> Iterator[Handle]:
        """``with handle.fork_row(i):`` feed batch row ``i`` alone on a copy of the cache (e.g. a
        continuation only that row has after a batched prefill); the batch's cache is untouched
        and in use again after the block."""
        attachment = self._attachment
        saved = self.cache
        check_row(saved, row)
        attachment.cache = saved.row_copy(row)
        try:
            yield self
        finally:
            attachment.cache = saved

    def feed(
        self,
        input_ids: torch.Tensor,
        chunk_size: int | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        evict: bool = True,
        last_only: bool = False,
        align_end: bool = False,
    ) -> torch.Tensor:
        """Run ``input_ids [batch, tokens]`` through the model on the handle's cache, in chunks of
        ``chunk_size`` with eviction between them; returns the logits of the last forward
        ``[batch, chunk, vocab]``. Calls continue the same sequence until `reset`.

        ``attention_mask [batch, tokens]`` (0 at left padding, as ``tokenizer(..., padding=True,
        padding_side='left')`` gives it) runs a padded batch: each row is numbered, budgeted and
        scheduled on its own tokens, as if run alone in the same forward calls. ``align_end=True``
        puts the chunk boundaries at whole chunks before the end (the first chunk takes the
        remainder): in a left-padded batch every row then sees the chunking it would see alone.

        ``evict=False`` records the statistics the policy needs but runs no eviction pass: the
        update that was due is left for later (`kvpolicy.integrations.hf.shared_prefill` forks many
        parameter rows from that point). ``last_only=True`` computes the logits of the last
        token only (``[batch, 1, vocab]``): a 2k-token prompt's full logits cost SmolLM2 a fifth
        of its forward pass."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.int64, torch.int32):
            raise ShapeError(
                f"feed takes integer input_ids [batch, tokens] with tokens >= 1; got {tuple(ids.shape)} {ids.dtype}"
            )
        ids = ids.to(self._attachment.model.device, torch.long)
        mask = None
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask)
            mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
            if mask.shape != ids.shape:
                raise ShapeError(f"attention_mask has shape {tuple(mask.shape)}; input_ids have {tuple(ids.shape)}")
            mask = mask.to(ids.device)
            if not self.cache.seen:  # a prompt: every row needs a token of its own
                check_rows_have_tokens(mask)
        return self._forward_chunks(
            "input_ids", ids, chunk_size, evict=evict, last_only=last_only, what="feed", mask=mask, align_end=align_end
        )

    def feed_embeds(
        self, inputs_embeds: torch.Tensor, chunk_size: int | None = None, *, evict: bool = True
    ) -> torch.Tensor:
        """Like `feed`, for a model driven by its own embeddings: ``inputs_embeds [batch, tokens,
        hidden]`` go through the model on the handle's cache (chunks of ``chunk_size``, eviction
        between them). Returns the last forward's logits ``[batch, chunk, vocab]`` for a causal LM,
        or its last hidden state ``[batch, chunk, hidden]`` for a base model (e.g. the `LlamaModel`
        of a Decision Transformer). Policies that need token ids cannot run on embeddings."""
        embeds = torch.as_tensor(inputs_embeds)
        hidden = self._attachment.config.hidden_size
        if embeds.dim() != 3 or embeds.shape[1] == 0 or embeds.shape[2] != hidden or not embeds.is_floating_point():
            raise ShapeError(
                f"feed_embeds takes floating inputs_embeds [batch, tokens, {hidden}] with tokens >= 1; "
                f"got {tuple(embeds.shape)} {embeds.dtype}"
            )
        embeds = embeds.to(self._attachment.model.device)
        return self._forward_chunks(
            "inputs_embeds", embeds, chunk_size, evict=evict, last_only=False, what="feed_embeds"
        )

    def _forward_chunks(
        self,
        key: str,
        inputs: torch.Tensor,
        chunk_size: int | None,
        *,
        evict: bool,
        last_only: bool,
        what: str,
        mask: torch.Tensor | None = None,
        align_end: bool = False,
    ) -> torch.Tensor:
        attachment = self._attachment
        if not attachment._entered or _ATTACHED.get(attachment.model) is not attachment:
            raise AttachError(f"handle.{what} works only inside its `with policy.attach(model)` block")
        check_chunk_size(chunk_size)
        cache = self.cache
        if cache.seen and cache.layers and isinstance(cache.layers[0], EvictingLayer):
            batch = cache.layers[0].keys.shape[0] if cache.layers[0].keys is not None else inputs.shape[0]
            if batch != inputs.shape[0]:
                raise ShapeError(
                    f"the cache holds a batch of {batch}; {what} got {inputs.shape[0]} rows (call reset first)"
                )
        cache.prompt_end = cache.seen + inputs.shape[1]
        keyword = cache_keyword(attachment.model)
        result = None
        deferring = attachment.deferring
        attachment.deferring = deferring or not evict
        try:
            with torch.no_grad():
                extra = {"logits_to_keep": 1} if last_only else {}
                sizes = chunk_sizes(inputs.shape[1], chunk_size, align_end)
                masks = mask.split(sizes, dim=1) if mask is not None else itertools.repeat(None)
                for chunk, chunk_mask in zip(inputs.split(sizes, dim=1), masks, strict=False):
                    if chunk_mask is not None:
                        extra["attention_mask"] = chunk_mask
                    output = attachment.model(**{key: chunk}, use_cache=True, **{keyword: cache}, **extra)
                    result = output.logits if hasattr(output, "logits") else output.last_hidden_state
        finally:
            attachment.deferring = deferring
        return result

    def report(self, row: int | None = None) -> CacheReport:
        """Tokens seen, kept per layer and head, KV bytes stored vs a full cache, time in the policy.

        ``row=None``: the whole batch (kept averaged over rows); ``row=i``: batch row *i* alone,
        counting only its valid slots (what member *i* of a population evaluated as one batch kept).
        """
        return build_report(self.cache, self._attachment.notes, row)
