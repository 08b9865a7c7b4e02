"""One prefill, many members: run a prompt once, then fork any number of parameter rows from it.

A population of the same policy (CMA-ES members, or one member scored on many items over many
generations) computes the same thing up to its first eviction pass: the prompt's forward calls,
the statistics, and — for a fixed extractor with frozen calibration — the features. When that
first pass comes only after the whole prompt (``after_prefill``, or a prompt fed in one forward
call), `prefill` runs the prompt once with eviction deferred and extracts the features once at
batch 1; `fork` then copies that cache, scores the features with a population ``[rows,
num_params]`` (`Policy.choose`), repeats the cache to ``rows`` batch rows and keeps each row's
own selection. What follows (teacher forcing, greedy decoding) runs through the ordinary
attached model, one batch row per member.

Per member this is exactly the eviction pass a member run alone performs at that point (same
features, same scores, same selection); only the continuation runs batched, so results equal
one-by-one runs up to the rounding of batched kernels (tested). A prefill can be kept and forked
again in later generations: its cache is copied, never changed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import torch

from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.integrations.hf.attach import Handle
from kvpolicy.integrations.hf.cache import EvictingCache, EvictingLayer
from kvpolicy.integrations.hf.reconstruction import SharedRepeats, due_for_reconstruction, reconstruct_if_due
from kvpolicy.policy import Policy
from kvpolicy.types import EmptyConfig, LayerView, Requirements, Schedule


@attrs.define(eq=False)
class Prefill:
    """A prompt consumed once with nothing evicted: the cache (statistics of the layers due
    already turned into features, so their attention rows are not kept), the features of every layer due for its first
    eviction pass ``[1, kv_heads, tokens, features]``, and the logits of the last prompt token
    ``[1, vocab]`` (which predict the first answer token before any eviction, as in a normal run)."""

    cache: EvictingCache
    features: dict[int, torch.Tensor]
    last_logits: torch.Tensor
    prompt_tokens: int
    seconds: float

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache and the features (for bounding a store of prefills)."""
        total = sum(f.numel() * f.element_size() for f in self.features.values())
        for layer in self.cache.layers:
            for name in ("keys", "values", "positions", "token_ids", "accumulated", "reconstruction"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
            for tensor in getattr(layer, "state", {}).values():
                total += tensor.numel() * tensor.element_size()
            window = getattr(layer, "window", None)
            total += window.nbytes if window is not None else 0
        return total


def check_shareable(policy: Any, chunk_size: int | None, prompt_tokens: int) -> None:
    """A prefill can be shared only if the policy's first eviction pass comes after the whole prompt."""
    kind = policy.schedule.kind
    single_forward = chunk_size is None or chunk_size >= prompt_tokens
    if kind == "after_prefill" or (single_forward and kind in ("every_step", "every_n")):
        if kind == "every_n" and prompt_tokens < policy.schedule.every:
            raise InvalidConfigError(
                f"an every_n/{policy.schedule.every} policy runs no eviction pass after a {prompt_tokens}-token prompt, "
                "so there is no first eviction pass to fork from"
            )
        return
    if kind == "never":
        raise InvalidConfigError("a policy with schedule 'never' never evicts; there is nothing to fork")
    raise InvalidConfigError(
        f"members share a prefill only when their first eviction pass comes after the whole prompt; policy with "
        f"schedule {kind!r} would evict between {chunk_size}-token prompt chunks. Use schedule 'after_prefill' or "
        "feed the prompt in one forward call (chunk_size=None)"
    )


def record_prompt(
    model: Any, prompt_ids: torch.Tensor, requirements: Requirements, chunk_size: int | None = None
) -> tuple[EvictingCache, torch.Tensor]:
    """Run ``prompt_ids [1, tokens]`` once with nothing evicted, recording the statistics
    ``requirements`` asks for on every full-attention layer: ``(cache, last-token logits [1, vocab])``.

    One recording serves every policy whose requirements it covers (`prepare`), so a comparison
    of many policies costs one prompt per item."""
    ids = torch.as_tensor(prompt_ids)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ShapeError(f"a shared prefill takes one prompt, input_ids [1, tokens]; got {tuple(ids.shape)}")
    recorder = _recording_policy(requirements)
    with torch.inference_mode(), recorder.attach(model) as handle:
        handle.reset()
        logits = handle.feed(ids, chunk_size=chunk_size, evict=False, last_only=True)
        cache = handle.cache
    return cache, logits[:, -1].clone()


def prepare(
    policy: Any,
    model: Any,
    cache: EvictingCache,
    last_logits: torch.Tensor,
    seconds: float = 0.0,
    repeats: SharedRepeats | None = None,
) -> Prefill:
    """``policy``'s view of a recorded prompt: a copy of ``cache`` holding only the statistics the
    policy asks for (its own attention window of the newest queries, …) and the features of every
    layer whose first eviction pass is now due, extracted once at batch 1. ``repeats`` (one dict
    per recording) shares KVzip's repeat pass between the policies prepared from it
    (`reconstruct_if_due`); each is charged the pass's cost as if it had run it."""
    start = time.perf_counter()
    attachment = policy.attach(model)  # not entered: its managed layers and requirements
    wanted = attachment.requirements
    have = cache.requirements
    if (wanted | have) != have or not set(attachment.managed) <= set(cache.managed):
        raise InvalidConfigError(
            f"the recorded prompt has {have} on layers {cache.managed}; the policy needs {wanted} on "
            f"{attachment.managed}"
        )
    cache = cache.copy()
    cache.managed, cache.requirements = attachment.managed, wanted
    for layer in cache.layers:
        if not isinstance(layer, EvictingLayer):
            continue
        window = wanted.attention_window
        layer.window = layer.window.last(window) if window and layer.window is not None else None
        if not wanted.accumulated_attention:
            layer.accumulated = None
        if not wanted.token_ids:
            layer.token_ids = None
        if not wanted.reconstruction:
            layer.reconstruction = None
    before, spent = cache.policy_seconds, 0.0
    if due_for_reconstruction(policy, cache):  # KVzip's repeat pass needs the model attached
        with attachment:
            spent = reconstruct_if_due(attachment, cache, repeats)
    charged = cache.policy_seconds - before  # the repeat pass, as this policy alone pays it
    features: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for index in cache.managed:
            layer = cache.layers[index]
            if not cache.is_due(policy, index):
                continue
            view = cache.view(index)
            if index not in policy.skip_layers:
                features[index] = policy.extract(view)
            layer.state = view.state
            layer.window = None  # turned into features; not kept
    elapsed = time.perf_counter() - start - spent  # besides the repeat pass, already charged
    cache.policy_seconds += elapsed
    return Prefill(cache, features, last_logits, cache.seen, seconds + elapsed + charged)


def prefill(policy: Any, model: Any, prompt_ids: torch.Tensor, chunk_size: int | None = None) -> Prefill:
    """Run ``prompt_ids [1, tokens]`` once for ``policy`` with eviction deferred, and extract the
    features of every layer whose first eviction pass is then due (`record_prompt` + `prepare`)."""
    ids = torch.as_tensor(prompt_ids)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ShapeError(f"prefill takes one prompt, input_ids [1, tokens]; got {tuple(ids.shape)}")
    check_shareable(policy, chunk_size, ids.shape[1])
    start = time.perf_counter()
    cache, last = record_prompt(model, ids, policy.requirements, chunk_size)
    return prepare(policy, model, cache, last, time.perf_counter() - start)


class _Recorder:
    """An extractor that only declares requirements: attaching it records those statistics."""

    name = "shared_prefill_recorder"

    def __init__(self, requirements: Requirements) -> None:
        self.config = EmptyConfig()
        self.requirements = requirements

    def extract(self, view: LayerView) -> torch.Tensor:
        return view.positions.to(torch.float32).unsqueeze(-1)


def _recording_policy(requirements: Requirements) -> Any:
    """A policy that records ``requirements`` on every full-attention layer and never runs a pass
    on its own (eviction is deferred while it records)."""
    return Policy(_Recorder(requirements), "feature", "threshold", schedule=Schedule("after_prefill"))


def due_layers(policy: Any, model: Any, cache: EvictingCache) -> tuple[int, ...]:
    """The layers whose first eviction pass is due for ``policy`` on a recorded prompt."""
    managed = policy.attach(model).managed
    return tuple(i for i in managed if cache.is_due(policy, i) and i not in policy.skip_layers)


def _repeat_view(view: LayerView, rows: int) -> LayerView:
    """The view of one row seen by ``rows`` rows (expanded, not copied)."""

    def rep(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.expand(rows, *tensor.shape[1:])

    return LayerView(
        layer=view.layer,
        num_layers=view.num_layers,
        positions=rep(view.positions),
        seen=view.seen,
        keys=rep(view.keys),
        accumulated_attention=rep(view.accumulated_attention),
        token_ids=rep(view.token_ids),
        reconstruction_attention=rep(view.reconstruction_attention),
        state={k: rep(v) for k, v in view.state.items()},
    )


@contextmanager
def fork(shared: Prefill, policy: Any, model: Any, rows: int = 1, *, evict: bool = True) -> Iterator[Handle]:
    """``with fork(shared, policy, model, rows) as handle``: a copy of the shared cache after the
    first eviction pass of each of ``rows`` batch rows; the policy holds one parameter set or a
    population ``[rows, num_params]``. Feed the continuation with ``handle.feed``; the first
    continuation token is predicted by ``shared.last_logits``. ``evict=False`` keeps every token
    (the full-cache reference of the same prefill)."""
    if rows < 1:
        raise ShapeError(f"fork needs at least one row, got {rows}")
    cache = shared.cache.copy()
    with torch.inference_mode(), policy.attach(model) as handle:
        attachment = handle._attachment
        if not attachment.owns(cache):
            raise InvalidConfigError(
                "this prefill was made for a policy with other requirements or managed layers; make the prefill with "
                "the policy you fork"
            )
        start = time.perf_counter()
        selections = {}
        for index, features in shared.features.items() if evict else ():
            view = _repeat_view(cache.view(index), rows)
            selections[index] = policy.choose(view, features.expand(rows, *features.shape[1:]))
        for index, layer in enumerate(cache.layers):
            due = index in cache.managed and cache.is_due(policy, index)
            if due and evict and index not in selections and index not in policy.skip_layers:
                raise InvalidConfigError(
                    f"layer {index} is due for its first eviction pass but the prefill holds no features for it; "
                    "prepare the prefill with this policy"
                )
            if due and index in selections:
                if rows > 1:  # gather every row's selection straight from the one shared row
                    layer._batch_apply(lambda t: t.expand(rows, *t.shape[1:]))
                layer.gather(selections[index])
            elif rows > 1:
                layer.batch_repeat_interleave(rows)
            if due:
                layer.finish_pass(policy=policy)
        if rows > 1:
            cache.repeat_rows(rows)
        cache.eviction_passes += int(evict)
        cache.policy_seconds += time.perf_counter() - start
        attachment.cache = cache
        attachment.deferring = not evict  # the full-cache reference never evicts, however long it decodes
        try:
            yield handle
        finally:
            attachment.deferring = False
