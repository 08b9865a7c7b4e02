"""The evicting cache: transformers' dynamic cache plus what an eviction policy needs per token.

Each full-attention layer (`EvictingLayer`) stores keys and values ``[batch, kv_heads, tokens,
head_dim]`` and, aligned with them, the absolute position of every kept token, optionally its
token id, the attention it has accumulated, a ``valid`` mask for padded slots and the per-token
state components keep in ``LayerView.state``. `EvictingLayer.gather` applies a `Selection` to all
of them at once, so nothing ever goes out of step. Sliding-window layers stay transformers' own
`DynamicSlidingWindowLayer`: they trim themselves and are never evicted.

``get_seq_length()`` stays *physical* (the tokens actually stored): transformers sizes masks and
query offsets from it, while RoPE gets absolute ``position_ids`` from `EvictingCache.seen`.

`EvictingCache` owns the eviction pass (`EvictingCache.eviction_pass`: schedule → view → plan →
gather, between forward calls) and takes the statistics the attention function records
(`record_in_pass`, `record_for_recompute`). transformers' own ``update`` is only the append of
new keys and values.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from kvpolicy.errors import ShapeError, UnsupportedModelError
from kvpolicy.integrations.hf import statistics
from kvpolicy.integrations.hf.window import AttentionWindow
from kvpolicy.types import LayerView, Requirements, Selection, extend_tokens

#: position stored for a padded (invalid) slot; such a slot is never attended
PADDED_POSITION = -1


def _gather_tokens(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor [batch, kv_heads, tokens, ...]`` along tokens with ``indices [batch, kv_heads, kept]``."""
    index = indices.reshape(*indices.shape, *([1] * (tensor.dim() - 3))).expand(*indices.shape, *tensor.shape[3:])
    return tensor.gather(2, index)


class EvictingLayer(DynamicLayer):
    """One full-attention layer whose tokens a policy may evict (see the module docstring)."""

    is_croppable = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None  # [batch, kv_heads, tokens] int64
        self.token_ids: torch.Tensor | None = None  # [batch, kv_heads, tokens] int64, when required
        self.valid: torch.Tensor | None = None  # [batch, kv_heads, tokens] bool; None = every slot valid
        self.accumulated: torch.Tensor | None = None  # [batch, kv_heads, tokens] float32, when required
        self.state: dict[str, torch.Tensor] = {}
        self.window: AttentionWindow | None = None  # attention rows of the newest queries (in-pass)
        self.queries: torch.Tensor | None = None  # [batch, heads, queries, head_dim] newest queries (recompute)
        self.query_positions: torch.Tensor | None = None  # [queries] int64 (recompute)
        self.scaling: float = 1.0
        self.softcap: float | None = None
        self.seen = 0
        self.new_tokens = 0
        self.updates = 0
        self.finished = False  # the policy's schedule will never run another pass on this layer

    # ----------------------------------------------------------------- filling

    def append(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        token_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new tokens; ``positions [tokens]`` absolute, ``token_ids [batch, tokens]`` or None."""
        keys, values = DynamicLayer.update(self, key_states, value_states)
        batch, kv_heads, new = key_states.shape[:3]
        shape = (batch, kv_heads, new)
        new_positions = positions.to(key_states.device).view(1, 1, new).expand(shape)
        self.positions = (
            new_positions.clone() if self.positions is None else torch.cat([self.positions, new_positions], 2)
        )
        if token_ids is not None:
            ids = token_ids.to(key_states.device).view(batch, 1, new).expand(shape)
            self.token_ids = ids.clone() if self.token_ids is None else torch.cat([self.token_ids, ids], 2)
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(shape)], 2)
        self.seen += new
        self.new_tokens += new
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):
        raise UnsupportedModelError(
            "an EvictingLayer is filled through EvictingCache.update, which knows the absolute positions"
        )

    def add_rows(self, rows: torch.Tensor, positions: torch.Tensor, window: int) -> None:
        """Keep ``rows [batch, kv_heads, queries, tokens]`` computed in this call's attention pass
        (queries at ``positions [queries]``) among the ``window`` newest since the last update."""
        if self.window is None:
            self.window = AttentionWindow(window)
        self.window = self.window.append(rows, positions.to(rows.device))

    def remember_queries(self, queries: torch.Tensor, positions: torch.Tensor, window: int) -> None:
        """Keep the ``window`` newest queries since the last update (the ``recompute`` statistics
        path computes their attention rows at update time: the keys they saw are all still cached)."""
        queries = queries.detach()[:, :, -window:]
        positions = positions[-window:].to(queries.device)
        if self.queries is not None:
            queries = torch.cat([self.queries, queries], 2)[:, :, -window:]
            positions = torch.cat([self.query_positions, positions])[-window:]
        self.queries, self.query_positions = queries, positions

    def add_accumulated(self, columns: torch.Tensor) -> None:
        """Add ``[batch, kv_heads, tokens]`` attention received (the cache's current tokens)."""
        if self.accumulated is None:
            self.accumulated = torch.zeros_like(columns)
        self.accumulated = extend_tokens(self.accumulated, columns.shape[2]) + columns

    # ----------------------------------------------------------------- what the policy sees

    @property
    def tokens(self) -> int:
        return 0 if self.positions is None else self.positions.shape[2]

    def kept_per_head(self) -> torch.Tensor:
        """``[batch, kv_heads]`` tokens each head really keeps (padded slots excluded)."""
        if self.positions is None:
            return torch.zeros(0, 0)
        if self.valid is None:
            return torch.full(self.positions.shape[:2], float(self.tokens))
        return self.valid.sum(-1).float()

    def cached(self) -> int:
        """Tokens per head for the schedule: the physical length, or the mean kept if heads differ."""
        if self.valid is None:
            return self.tokens
        return math.ceil(self.valid.sum(-1).float().mean().item())

    def view(self, layer: int, num_layers: int, requirements: Requirements) -> LayerView:
        """A `LayerView` with exactly what the policy declared it needs."""
        view = LayerView(layer=layer, num_layers=num_layers, positions=self.positions, seen=self.seen, state=self.state)
        if requirements.keys:
            view.keys = self.keys
        if requirements.attention_window and self.window is not None:
            window = self.window.last(requirements.attention_window)
            view.attention, view.query_positions = window.rows(self.tokens), window.query_positions
        elif requirements.attention_window and self.queries is not None:
            view.attention = statistics.attention_rows(
                self.queries,
                self.query_positions,
                self.keys,
                self.positions,
                self.valid,
                scaling=self.scaling,
                softcap=self.softcap,
            )
            view.query_positions = self.query_positions
        if requirements.accumulated_attention:
            accumulated = self.accumulated
            if accumulated is None:
                accumulated = torch.zeros(self.positions.shape, dtype=torch.float32, device=self.positions.device)
            view.accumulated_attention = extend_tokens(accumulated, self.tokens)
        if requirements.token_ids:
            view.token_ids = self.token_ids
        return view

    def finish_pass(self) -> None:
        """After an eviction pass: count it and forget the statistics it consumed."""
        self.updates += 1
        self.new_tokens = 0
        self.queries = self.query_positions = None
        self.window = None

    # ----------------------------------------------------------------- eviction

    def gather(self, selection: Selection) -> None:
        """Keep the selected tokens: keys, values, positions, ids, statistics and state together."""
        indices = selection.indices.to(self.keys.device, torch.long)
        batch, kv_heads, tokens = self.positions.shape
        if indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, kv_heads):
            raise ShapeError(
                f"selection indices have shape {tuple(indices.shape)}; expected [batch={batch}, kv_heads={kv_heads}, kept]"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= tokens):
            raise ShapeError(
                f"selection indices must lie in [0, {tokens}); got {int(indices.min())}..{int(indices.max())}"
            )
        valid = None
        if selection.valid is not None:
            if selection.valid.shape != indices.shape:
                raise ShapeError(
                    f"selection.valid has shape {tuple(selection.valid.shape)}, indices {tuple(indices.shape)}"
                )
            valid = selection.valid.to(indices.device, torch.bool)
        if self.valid is not None:
            old = self.valid.gather(2, indices)
            valid = old if valid is None else valid & old
        self._take(indices)
        self.valid = None
        if valid is not None and not bool(valid.all()):
            self._compact(valid)

    def _take(self, indices: torch.Tensor) -> None:
        tokens = self.tokens
        self.keys = _gather_tokens(self.keys, indices)
        self.values = _gather_tokens(self.values, indices)
        self.positions = self.positions.gather(2, indices)
        if self.token_ids is not None:
            self.token_ids = self.token_ids.gather(2, indices)
        if self.accumulated is not None:
            self.accumulated = extend_tokens(self.accumulated, tokens).gather(2, indices)
        for name, tensor in list(self.state.items()):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 3 or tensor.shape[2] > tokens:
                raise ShapeError(
                    f"LayerView.state[{name!r}] must be a tensor [batch, kv_heads, tokens', ...] with tokens' <= "
                    f"{tokens}; got {tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}"
                )
            self.state[name] = _gather_tokens(extend_tokens(tensor, tokens), indices.to(tensor.device))

    def _compact(self, valid: torch.Tensor) -> None:
        """Move each head's valid slots first (in order) and trim to the longest head, so padded
        slots never accumulate; the remaining padding is masked out of attention."""
        order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)
        kept = int(valid.sum(-1).max())
        order = order[..., :kept]
        valid = valid.gather(2, order)
        self._take(order)
        self.positions = self.positions.masked_fill(~valid, PADDED_POSITION)
        self.valid = None if bool(valid.all()) else valid

    # ----------------------------------------------------------------- transformers' cache API

    def reset(self) -> None:
        super().reset()
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModelError(
            "an evicting cache cannot be cropped (assisted / speculative decoding is not supported)"
        )

    def _batch_apply(self, fn) -> None:
        for name in ("keys", "values", "positions", "token_ids", "valid", "accumulated", "queries"):
            tensor = getattr(self, name)
            if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and tensor.numel():
                setattr(self, name, fn(tensor))
        if self.window is not None:
            self.window = self.window.map(fn)
        self.state = {k: fn(v) for k, v in self.state.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))


def layer_types(config) -> list[str]:
    """The attention type of every decoder layer (``full_attention`` / ``sliding_attention``)."""
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
    return list(types[: config.num_hidden_layers])


class EvictingCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers are `EvictingLayer`s.

    Parameters
    ----------
    config:
        The decoder's text config (layer types, sliding window).
    managed:
        Layer indices the policy evicts; other full-attention layers keep everything.
    requirements:
        What the forward pass must record (token ids are only stored when asked for).
    """

    def __init__(self, config, managed: tuple[int, ...], requirements: Requirements) -> None:
        layers: list = []
        for index, kind in enumerate(layer_types(config)):
            if kind == "full_attention":
                layers.append(EvictingLayer())
            elif kind in ("sliding_attention", "chunked_attention"):
                window = config.sliding_window if kind == "sliding_attention" else config.attention_chunk_size
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            else:
                raise UnsupportedModelError(
                    f"layer {index} has attention type {kind!r}; kvpolicy supports full_attention and sliding_attention"
                )
        Cache.__init__(self, layers=layers)
        self.num_layers = config.num_hidden_layers
        self.managed = tuple(managed)
        self.requirements = requirements
        self.seen = 0
        #: absolute index at which the current prompt ends (None: every forward completes its input)
        self.prompt_end: int | None = None
        self.updates = 0
        self.policy_seconds = 0.0
        self._pending_positions: torch.Tensor | None = None
        self._pending_ids: torch.Tensor | None = None

    def begin_forward(self, new_tokens: int, token_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Called before a forward of ``new_tokens``: returns their absolute ``position_ids [tokens]``."""
        positions = torch.arange(self.seen, self.seen + new_tokens, device=device)
        self._pending_positions = positions
        self._pending_ids = token_ids if self.requirements.token_ids else None
        self.seen += new_tokens
        return positions

    @property
    def prefill_done(self) -> bool:
        return self.prompt_end is None or self.seen >= self.prompt_end

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if isinstance(layer, EvictingLayer):
            if self._pending_positions is None or self._pending_positions.numel() != key_states.shape[2]:
                raise UnsupportedModelError(
                    "the evicting cache was used in a forward call that kvpolicy did not see begin; "
                    "call the model the attached policy hooks (model(...) / model.generate / handle.feed)"
                )
            return layer.append(key_states, value_states, self._pending_positions, self._pending_ids)
        return layer.update(key_states, value_states, *args, **kwargs)

    # ----------------------------------------------------------------- statistics (recorded by the attention function)

    def records_statistics(self, layer_idx: int) -> bool:
        """Whether the attention of ``layer_idx`` records statistics: a managed layer of a policy
        that reads attention, while its schedule can still run an eviction pass there."""
        return self.requirements.needs_attention and layer_idx in self.managed and not self.layers[layer_idx].finished

    def record_in_pass(
        self, layer_idx: int, rows: torch.Tensor | None, positions: torch.Tensor, columns: torch.Tensor | None
    ) -> None:
        """Keep what the attention pass computed from its own probabilities: attention ``rows
        [batch, kv_heads, queries, tokens]`` of the queries at ``positions [queries]`` and the
        attention received ``columns [batch, kv_heads, tokens]`` (either may be None)."""
        layer = self.layers[layer_idx]
        if rows is not None:
            layer.add_rows(rows, positions, self.requirements.attention_window)
        if columns is not None:
            layer.add_accumulated(columns)

    def record_for_recompute(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: float | None
    ) -> None:
        """The ``recompute`` statistics path: keep the newest queries (their attention rows are
        computed at the eviction pass) and add the attention received, from a second pass."""
        layer = self.layers[layer_idx]
        requirements = self.requirements
        new = query.shape[2]
        layer.scaling, layer.softcap = scaling, softcap
        if requirements.attention_window:
            positions = torch.arange(layer.seen - new, layer.seen, device=query.device)
            layer.remember_queries(query, positions, requirements.attention_window)
        if requirements.accumulated_attention:
            columns = statistics.attention_columns(
                query.detach(), key.detach(), layer.valid, scaling=scaling, softcap=softcap
            )
            layer.add_accumulated(columns)

    # ----------------------------------------------------------------- the eviction pass

    def is_due(self, policy: Any, index: int) -> bool:
        """Whether layer ``index`` is due for ``policy``'s eviction pass now (its `Schedule`)."""
        layer = self.layers[index]
        if not isinstance(layer, EvictingLayer) or layer.positions is None:
            return False
        return policy.is_due(
            new_tokens=layer.new_tokens,
            cached=layer.cached(),
            seen=layer.seen,
            prefill_done=self.prefill_done,
            updates=layer.updates,
        )

    def view(self, index: int) -> LayerView:
        """What the policy sees of layer ``index``: exactly what its requirements ask for."""
        return self.layers[index].view(index, self.num_layers, self.requirements)

    def eviction_pass(self, policy: Any) -> None:
        """Between forward calls: every managed layer whose schedule is due runs extract → score →
        select (`Policy.plan`) and keeps the selected tokens with everything aligned to them."""
        start = time.perf_counter()
        ran = False
        with torch.no_grad():
            for index in self.managed:
                if not self.is_due(policy, index):
                    continue
                layer = self.layers[index]
                view = self.view(index)
                selection = policy.plan(view)
                layer.state = view.state
                if selection is not None:
                    layer.gather(selection)
                layer.finish_pass()
                ran = True
            for index in self.managed:  # a layer whose schedule is over records no more statistics
                layer = self.layers[index]
                if isinstance(layer, EvictingLayer) and not policy.will_run_again(updates=layer.updates):
                    layer.finished = True
        self.policy_seconds += time.perf_counter() - start
        self.updates += int(ran)

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.prompt_end = None
        self.updates = 0
        self.policy_seconds = 0.0

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModelError(
            "an evicting cache cannot be cropped (assisted / speculative decoding is not supported)"
        )
