"""The evicting cache: transformers' dynamic cache plus what an eviction policy needs per token.

Each full-attention layer (`EvictingLayer`) stores keys and values ``[batch, kv_heads, tokens,
head_dim]`` and, aligned with them, the absolute position of every kept token, optionally its
token id, the attention it has accumulated, a ``valid`` mask for padded slots and the per-token
state components keep in ``LayerView.state``. `EvictingLayer.gather` applies a `Selection` to all
of them at once, so nothing ever goes out of step. Sliding-window layers stay transformers' own
`DynamicSlidingWindowLayer`: they trim themselves and are never evicted.

``get_seq_length()`` stays *physical* (the tokens actually stored): transformers sizes masks and
query offsets from it, while RoPE gets absolute ``position_ids`` from `EvictingCache.seen`.

Left-padded batches: each row numbers its own tokens (a padded slot is stored at position -1 and
``valid`` False, never counted or scored), keeps its own counters (`EvictingLayer.row_seen`,
``row_new``, ``row_updates``) and so its own schedule and budget. Rows whose counters agree are
planned together; a row's view lists its valid slots first, in order, exactly the layout the same
row run alone would have, and any pass drops every row's padded slots, so storage never exceeds the
longest row per head.

`EvictingCache` owns the eviction pass (`EvictingCache.eviction_pass`: schedule → view → plan →
gather, between forward calls) and takes the statistics the attention function records
(`record_in_pass`, `record_for_recompute`). transformers' own ``update`` is only the append of
new keys and values.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from kvpolicy.errors import ShapeError, UnsupportedModelError, UnsupportedPaddingError
from kvpolicy.integrations.hf import statistics
from kvpolicy.integrations.hf.window import AttentionWindow
from kvpolicy.types import LayerView, Requirements, Selection, extend_tokens

#: position stored for a padded (invalid) slot; such a slot is never attended
PADDED_POSITION = -1


def _expand_index(indices: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``indices [batch, kv_heads, kept]`` broadcast over the trailing dimensions of ``tensor``."""
    return indices.reshape(*indices.shape, *([1] * (tensor.dim() - 3))).expand(*indices.shape, *tensor.shape[3:])


def _gather_tokens(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor [batch, kv_heads, tokens, ...]`` along tokens with ``indices [batch, kv_heads, kept]``."""
    return tensor.gather(2, _expand_index(indices, tensor))


def _keeps_all(indices: torch.Tensor, tokens: int) -> bool:
    """Whether ``indices [batch, kv_heads, kept]`` keep all ``tokens`` in their stored order."""
    if indices.shape[2] != tokens:
        return False
    return bool((indices == torch.arange(tokens, device=indices.device)).all())


def _valid_first(valid: torch.Tensor) -> bool:
    """Whether every head lists its valid slots first (true after any pass; false while a row's
    left padding is still stored)."""
    return not bool((valid[..., 1:] & ~valid[..., :-1]).any())


def _check_state(name: str, tensor: object, tokens: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 3 or tensor.shape[2] > tokens:
        raise ShapeError(
            f"LayerView.state[{name!r}] must be a tensor [batch, kv_heads, tokens', ...] with tokens' <= "
            f"{tokens}; got {tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}"
        )


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
        self.query_positions: torch.Tensor | None = None  # [batch, queries] int64 (recompute; -1 padded)
        self.scaling: float = 1.0
        self.softcap: float | None = None
        #: per batch row (int64, on the CPU): tokens seen (padding excluded), tokens since the
        #: row's last eviction pass, eviction passes run; None before the first append
        self.row_seen: torch.Tensor | None = None
        self.row_new: torch.Tensor | None = None
        self.row_updates: torch.Tensor | None = None
        #: which rows hold each `state` entry ([batch] bool): rows evict on their own schedules
        self.state_rows: dict[str, torch.Tensor] = {}
        self.finished = False  # the policy's schedule will never run another pass on this layer (any row)

    # ----------------------------------------------------------------- filling

    def append(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        token_ids: torch.Tensor | None,
        new_valid: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new tokens at ``positions [batch, tokens]`` (each row's own, -1 where padded);
        ``token_ids [batch, tokens]`` or None; ``new_valid [batch, tokens]`` False at padding (None:
        all real) with ``counts [batch]`` real tokens per row (CPU)."""
        before = self.tokens
        keys, values = DynamicLayer.update(self, key_states, value_states)
        batch, kv_heads, new = key_states.shape[:3]
        shape = (batch, kv_heads, new)
        new_positions = positions.to(key_states.device).view(batch, 1, new).expand(shape)
        self.positions = (
            new_positions.clone() if self.positions is None else torch.cat([self.positions, new_positions], 2)
        )
        if token_ids is not None:
            ids = token_ids.to(key_states.device).view(batch, 1, new).expand(shape)
            self.token_ids = ids.clone() if self.token_ids is None else torch.cat([self.token_ids, ids], 2)
        if new_valid is not None or self.valid is not None:
            old = (
                self.valid
                if self.valid is not None
                else self.positions.new_ones((batch, kv_heads, before), dtype=torch.bool)
            )
            fresh = (
                old.new_ones(shape) if new_valid is None else new_valid.to(old.device).view(batch, 1, new).expand(shape)
            )
            self.valid = torch.cat([old, fresh], 2)
        if counts is None:
            counts = torch.full((batch,), new, dtype=torch.long)
        if self.row_seen is None:
            self.row_seen = self.row_new = self.row_updates = torch.zeros(batch, dtype=torch.long)
        self.row_seen = self.row_seen + counts
        self.row_new = self.row_new + counts
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):
        raise UnsupportedModelError(
            "an EvictingLayer is filled through EvictingCache.update, which knows the absolute positions"
        )

    def add_rows(self, rows: torch.Tensor, positions: torch.Tensor, window: int) -> None:
        """Keep ``rows [batch, kv_heads, queries, tokens]`` computed in this call's attention pass
        (queries at ``positions [batch, queries]``) among the ``window`` newest."""
        if self.window is None:
            self.window = AttentionWindow(window)
        self.window = self.window.append(rows, positions.to(rows.device))

    def remember_queries(self, queries: torch.Tensor, positions: torch.Tensor, window: int) -> None:
        """Keep the ``window`` newest queries since the last update (the ``recompute`` statistics
        path computes their attention rows at update time: the keys they saw are all still cached)."""
        queries = queries.detach()[:, :, -window:]
        positions = positions[:, -window:].to(queries.device)
        if self.queries is not None:
            queries = torch.cat([self.queries, queries], 2)[:, :, -window:]
            positions = torch.cat([self.query_positions, positions], 1)[:, -window:]
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

    @property
    def batch(self) -> int:
        return 0 if self.positions is None else self.positions.shape[0]

    @property
    def updates(self) -> int:
        """Eviction passes run, by the row that ran the most."""
        return 0 if self.row_updates is None else int(self.row_updates.max())

    def cached_rows(self) -> list[int]:
        """Tokens per head of each row for the schedule: the physical length, or the row's mean
        kept over its heads if they differ (what the row alone would hold)."""
        if self.valid is None:
            return [self.tokens] * self.batch
        return [math.ceil(x) for x in self.valid.sum(-1).float().mean(-1).tolist()]

    def view(
        self, layer: int, num_layers: int, requirements: Requirements, rows: list[int] | None = None
    ) -> tuple[LayerView, torch.Tensor | None]:
        """A `LayerView` of batch ``rows`` (all by default; rows with the same counters) with
        exactly what the policy declared it needs, and the slot ``order [rows, kv_heads, tokens']``
        it lists (None: the stored order). Where padding precedes a row's tokens, each head's
        valid slots come first, in order: the layout of the row run alone."""
        rows = list(range(self.batch)) if rows is None else rows
        index = None if len(rows) == self.batch else torch.tensor(rows)

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if index is None else tensor.index_select(0, index.to(tensor.device))

        valid = None if self.valid is None else pick(self.valid)
        order = None
        if valid is not None and not _valid_first(valid):
            kept = int(valid.sum(-1).max())
            order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)[..., :kept]

        def arrange(tensor: torch.Tensor) -> torch.Tensor:
            tensor = pick(tensor)
            return tensor if order is None else _gather_tokens(tensor, order.to(tensor.device))

        first = rows[0]
        seen, new = int(self.row_seen[first]), int(self.row_new[first])
        present = [k for k in self.state if bool(self._holders(k)[rows].all())]
        view = LayerView(
            layer=layer,
            num_layers=num_layers,
            positions=arrange(self.positions),
            seen=seen,
            state={k: arrange(extend_tokens(self.state[k], self.tokens)) for k in present},
        )
        if requirements.keys:
            view.keys = arrange(self.keys)
        window = min(requirements.attention_window, new)
        if window and self.window is not None:
            recent = self.window.last(window)
            attention = pick(recent.rows(self.tokens))
            if order is not None:
                attention = attention.gather(3, order.unsqueeze(2).expand(-1, -1, attention.shape[2], -1))
            view.attention, view.query_positions = attention, pick(recent.query_positions)[0]
        elif window and self.queries is not None:
            view.attention = statistics.attention_rows(
                pick(self.queries)[:, :, -window:],
                pick(self.query_positions)[:, -window:],
                arrange(self.keys),
                view.positions,
                None if valid is None else (valid if order is None else valid.gather(2, order)),
                scaling=self.scaling,
                softcap=self.softcap,
            )
            view.query_positions = pick(self.query_positions)[0, -window:]
        if requirements.accumulated_attention:
            accumulated = self.accumulated
            if accumulated is None:
                accumulated = torch.zeros(self.positions.shape, dtype=torch.float32, device=self.positions.device)
            view.accumulated_attention = arrange(extend_tokens(accumulated, self.tokens))
        if requirements.token_ids:
            view.token_ids = arrange(self.token_ids)
        return view, order

    def store_state(
        self, rows: list[int], state: dict[str, torch.Tensor], given: set[str], order: torch.Tensor | None
    ) -> None:
        """Write the state a pass left in the view of ``rows`` (listed in ``order``) back into the
        stored layout; entries the components dropped are dropped for those rows."""
        batch, kv_heads, tokens = self.positions.shape
        if len(rows) == batch and order is None:
            self.state = dict(state)
            self.state_rows = {k: torch.ones(batch, dtype=torch.bool) for k in state}
            return
        index = torch.tensor(rows)
        view_tokens = tokens if order is None else order.shape[2]
        for name, tensor in state.items():
            _check_state(name, tensor, view_tokens)
            tensor = extend_tokens(tensor, view_tokens)
            if tuple(tensor.shape[:2]) != (len(rows), kv_heads):
                raise ShapeError(
                    f"LayerView.state[{name!r}] has shape {tuple(tensor.shape)}; expected [{len(rows)}, {kv_heads}, ...]"
                )
            full = self.state.get(name)
            if full is None:
                full = tensor.new_zeros((batch, kv_heads, tokens, *tensor.shape[3:]))
            else:
                full = extend_tokens(full, tokens).clone()  # never write into a tensor a fork may share
            index = index.to(full.device)
            if order is None:
                full[index] = tensor
            else:
                block = full[index]
                block.scatter_(2, _expand_index(order.to(full.device), tensor), tensor)
                full[index] = block
            present = self._holders(name).clone()
            present[rows] = True
            self.state[name], self.state_rows[name] = full, present
        for name in given - set(state):
            present = self._holders(name).clone()
            present[rows] = False
            self.state_rows[name] = present
            if not bool(present.any()):
                del self.state[name], self.state_rows[name]

    def _holders(self, name: str) -> torch.Tensor:
        """``[batch]`` bool: the rows holding state entry ``name`` (all, for an entry set directly)."""
        held = self.state_rows.get(name)
        if held is None:
            held = torch.full((self.batch,), name in self.state, dtype=torch.bool)
        return held

    def finish_pass(self, rows: list[int] | None = None, policy: Any = None) -> None:
        """After an eviction pass of ``rows`` (all by default): count it; once no row has tokens
        since its pass, forget the statistics; once ``policy`` can run no further pass on any row
        (`Policy.will_run_again`), mark the layer finished: its attention records nothing more."""
        if rows is None or len(rows) == self.batch:
            self.row_updates = self.row_updates + 1
            self.row_new = torch.zeros_like(self.row_new)
        else:
            done = torch.zeros(self.batch, dtype=torch.bool)
            done[rows] = True
            self.row_updates = self.row_updates + done.long()
            self.row_new = self.row_new.masked_fill(done, 0)
        if not bool(self.row_new.any()):
            self.queries = self.query_positions = None
            self.window = None
        if policy is not None:
            self.finished = not policy.will_run_again(updates=int(self.row_updates.min()))

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
        if self.valid is None and (valid is None or bool(valid.all())) and _keeps_all(indices, tokens):
            return  # every token kept, in order: nothing to move (a NAMM that evicts nothing this pass)
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
            _check_state(name, tensor, tokens)
            self.state[name] = _gather_tokens(extend_tokens(tensor, tokens), indices.to(tensor.device))
        if self.window is not None:  # rows not yet due still need their window, re-indexed
            self.window = self.window.take(indices.to(self.window.blocks[0].device), tokens)

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

    _BATCHED = (
        "keys", "values", "positions", "token_ids", "valid", "accumulated", "queries", "query_positions",
        "row_seen", "row_new", "row_updates",
    )  # fmt: skip

    def _batch_apply(self, fn) -> None:
        for name in self._BATCHED:
            tensor = getattr(self, name)
            if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and tensor.numel():
                setattr(self, name, fn(tensor))
        if self.window is not None:
            self.window = self.window.map(fn)
        self.state = {k: fn(v) for k, v in self.state.items()}
        self.state_rows = {k: fn(v) for k, v in self.state_rows.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))


def _check_left_padding(valid: torch.Tensor, seen: torch.Tensor) -> None:
    """Refuse padding anywhere but before a row's first token (right padding, holes)."""
    late = valid[:, :-1] & ~valid[:, 1:]  # a real token followed by padding
    started = (seen > 0).to(valid.device)[:, None] & ~valid  # padding after the row already began
    if bool(late.any()) or bool(started.any()):
        row = int((late.any(1) | started.any(1)).nonzero()[0])
        raise UnsupportedPaddingError(
            f"batch row {row} has padding after its first token (right padding or a hole in the attention_mask); "
            "kvpolicy supports left padding only: tokenize with padding_side='left' "
            "(tokenizer.padding_side = 'left') or run that row on its own"
        )


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
        #: tokens each batch row has seen ([batch] int64, CPU; padding excluded); ``seen`` counts columns
        self.row_seen: torch.Tensor | None = None
        #: ``[batch, columns]`` False at left padding, once a padded call came (sliding layers mask with it)
        self.column_valid: torch.Tensor | None = None
        self._pending_positions: torch.Tensor | None = None
        self._pending_valid: torch.Tensor | None = None
        self._pending_counts: torch.Tensor | None = None
        self._pending_ids: torch.Tensor | None = None

    def begin_forward(
        self,
        new_tokens: int,
        token_ids: torch.Tensor | None,
        device: torch.device,
        batch: int = 1,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Called before a forward of ``new_tokens`` columns of ``batch`` rows; ``valid [batch,
        new_tokens]`` is False at left padding (None: no padding). Returns each row's absolute
        ``position_ids [batch, new_tokens]`` (padded tokens get 0; they are never attended)."""
        if self.row_seen is None:
            self.row_seen = torch.zeros(batch, dtype=torch.long)
        elif self.row_seen.shape[0] != batch:
            raise ShapeError(f"the cache holds a batch of {self.row_seen.shape[0]}; this call has {batch} rows")
        offsets = torch.arange(new_tokens, device=device)
        if valid is None:
            counts = torch.full((batch,), new_tokens, dtype=torch.long)
            positions = self.row_seen.to(device)[:, None] + offsets
            self._pending_valid = None
        else:
            valid = valid.to(device, torch.bool)
            _check_left_padding(valid, self.row_seen)
            counts = valid.sum(1).cpu()
            positions = self.row_seen.to(device)[:, None] + valid.long().cumsum(1) - 1
            positions = positions.masked_fill(~valid, PADDED_POSITION)
            self._pending_valid = valid
        if self._pending_valid is not None or self.column_valid is not None:
            columns = self._pending_valid if self._pending_valid is not None else positions >= 0
            self.column_valid = columns if self.column_valid is None else torch.cat([self.column_valid, columns], 1)
        self._pending_positions = positions
        self._pending_counts = counts
        self._pending_ids = token_ids if self.requirements.token_ids else None
        self.seen += new_tokens
        self.row_seen = self.row_seen + counts
        return positions.clamp(min=0)

    @property
    def fewest_tokens(self) -> int:
        """Tokens of the shortest batch row (padding excluded)."""
        return 0 if self.row_seen is None else int(self.row_seen.min())

    @property
    def prefill_done(self) -> bool:
        return self.prompt_end is None or self.seen >= self.prompt_end

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if isinstance(layer, EvictingLayer):
            if self._pending_positions is None or self._pending_positions.shape != key_states.shape[::2]:
                raise UnsupportedModelError(
                    "the evicting cache was used in a forward call that kvpolicy did not see begin; "
                    "call the model the attached policy hooks (model(...) / model.generate / handle.feed)"
                )
            return layer.append(
                key_states,
                value_states,
                self._pending_positions,
                self._pending_ids,
                self._pending_valid,
                self._pending_counts,
            )
        return layer.update(key_states, value_states, *args, **kwargs)

    # ----------------------------------------------------------------- statistics (recorded by the attention function)

    def records_statistics(self, layer_idx: int) -> bool:
        """Whether the attention of ``layer_idx`` records statistics: a managed layer of a policy
        that reads attention, while its schedule can still run an eviction pass there."""
        return self.requirements.needs_attention and layer_idx in self.managed and not self.layers[layer_idx].finished

    def record_in_pass(self, layer_idx: int, rows: torch.Tensor | None, columns: torch.Tensor | None) -> None:
        """Keep what the attention pass computed from its own probabilities: attention ``rows
        [batch, kv_heads, queries, tokens]`` of the call's newest queries and the
        attention received ``columns [batch, kv_heads, tokens]`` (either may be None)."""
        layer = self.layers[layer_idx]
        if rows is not None:
            layer.add_rows(rows, self._pending_positions[:, -rows.shape[2] :], self.requirements.attention_window)
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
            layer.remember_queries(query, self._pending_positions[:, -new:], requirements.attention_window)
        if requirements.accumulated_attention:
            columns = statistics.attention_columns(
                query.detach(), key.detach(), layer.valid, scaling=scaling, softcap=softcap
            )
            layer.add_accumulated(columns)

    # ----------------------------------------------------------------- the eviction pass

    def due_rows(self, policy: Any, index: int) -> list[list[int]]:
        """The batch rows of layer ``index`` due for ``policy``'s eviction pass now (each row's own
        `Schedule`), grouped by their counters: a group is planned as one batch."""
        layer = self.layers[index]
        if not isinstance(layer, EvictingLayer) or layer.positions is None:
            return []
        counters = list(zip(layer.row_seen.tolist(), layer.row_new.tolist(), layer.row_updates.tolist(), strict=True))
        cached = layer.cached_rows()
        groups: dict[tuple[int, int, int], list[int]] = {}
        if len(set(counters)) == 1 and len(set(cached)) == 1:  # the usual case: one decision for all rows
            counters, cached = counters[:1], cached[:1]
        for row, ((seen, new, updates), tokens) in enumerate(zip(counters, cached, strict=True)):
            due = policy.is_due(
                new_tokens=new, cached=tokens, seen=seen, prefill_done=self.prefill_done, updates=updates
            )
            if due:
                groups.setdefault((seen, new, updates), []).append(row)
        if len(counters) == 1 and groups:
            return [list(range(layer.batch))]
        return list(groups.values())

    def is_due(self, policy: Any, index: int) -> bool:
        """Whether any row of layer ``index`` is due for ``policy``'s eviction pass now."""
        return bool(self.due_rows(policy, index))

    def view(self, index: int, rows: list[int] | None = None) -> LayerView:
        """What the policy sees of layer ``index`` (batch ``rows``, all by default): exactly what
        its requirements ask for."""
        return self.layers[index].view(index, self.num_layers, self.requirements, rows)[0]

    def eviction_pass(self, policy: Any) -> None:
        """Between forward calls: every managed layer runs extract → score → select (`Policy.plan`)
        for the rows whose schedule is due, and keeps the selected tokens with everything aligned
        to them."""
        start = time.perf_counter()
        ran = False
        with torch.no_grad():
            for index in self.managed:
                groups = self.due_rows(policy, index)
                if groups:
                    self._evict_rows(policy, index, groups)
                    ran = True
        self.policy_seconds += time.perf_counter() - start
        self.updates += int(ran)

    def _evict_rows(self, policy: Any, index: int, groups: list[list[int]]) -> None:
        """One layer's pass for ``groups`` of due rows. Every other row keeps its valid slots, so
        the pass also drops all left padding; the layer is stored as long as its longest head."""
        layer = self.layers[index]
        batch, kv_heads, tokens = layer.positions.shape
        due = [row for rows in groups for row in rows]
        pieces: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for rows in groups:
            view, order = layer.view(index, self.num_layers, self.requirements, rows)
            given = set(view.state)
            if len(rows) == batch:
                selection = policy.plan(view)
            else:
                with policy.population_rows(rows):
                    selection = policy.plan(view)
            layer.store_state(rows, view.state, given, order)
            if len(groups) == 1 and len(rows) == batch and order is None:  # the whole batch as stored
                layer.finish_pass(policy=policy)
                if selection is not None:
                    layer.gather(selection)
                return
            if selection is None:
                indices = torch.arange(view.tokens, device=view.positions.device).expand(view.positions.shape)
                kept = None
            else:
                indices, kept = selection.indices.to(view.positions.device, torch.long), selection.valid
            if order is not None:
                indices = order.gather(2, indices)
            for j, row in enumerate(rows):
                pieces[row] = (indices[j], None if kept is None else kept[j].to(indices.device, torch.bool))
        for row in range(batch):
            if row not in pieces:  # not due: keep every valid slot, in order
                valid = None if layer.valid is None else layer.valid[row]
                order = torch.arange(tokens, device=layer.positions.device).expand(kv_heads, tokens)
                if valid is not None:
                    order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)[..., : int(valid.sum(-1).max())]
                pieces[row] = (order, None if valid is None else valid.gather(1, order))
        width = max(piece[0].shape[-1] for piece in pieces.values())
        indices = layer.positions.new_zeros((batch, kv_heads, width))
        valid = torch.zeros((batch, kv_heads, width), dtype=torch.bool, device=indices.device)
        for row, (row_indices, row_valid) in pieces.items():
            indices[row, :, : row_indices.shape[-1]] = row_indices
            valid[row, :, : row_indices.shape[-1]] = True if row_valid is None else row_valid
        layer.finish_pass(due, policy)
        layer.gather(Selection(indices, valid))

    def copy(self) -> EvictingCache:
        """A copy that can be filled and evicted without touching this cache: layers and their
        state dicts are copied; tensors are shared, since the cache only ever replaces them
        (concatenation, gather), never writes into them."""
        copied = copy.copy(self)
        copied.layers = [copy.copy(layer) for layer in self.layers]
        for layer in copied.layers:
            if isinstance(getattr(layer, "state", None), dict):
                layer.state = dict(layer.state)
                layer.state_rows = dict(layer.state_rows)
        return copied

    def row_copy(self, row: int) -> EvictingCache:
        """A copy holding batch row ``row`` alone (to continue one row of a batch on its own)."""
        copied = self.copy()
        copied.batch_select_indices(torch.tensor([row]))
        return copied

    def repeat_rows(self, rows: int) -> None:
        """The cache-wide row records of a one-row cache repeated to ``rows`` (its layers are
        repeated by the caller)."""
        self._rows_apply(lambda t: t.expand(rows, *t.shape[1:]).clone())

    def _rows_apply(self, fn) -> None:
        for name in ("row_seen", "column_valid"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows_apply(lambda t: t[indices.to(t.device)])

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.row_seen = self.column_valid = None
        self.prompt_end = None
        self.updates = 0
        self.policy_seconds = 0.0

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModelError(
            "an evicting cache cannot be cropped (assisted / speculative decoding is not supported)"
        )
