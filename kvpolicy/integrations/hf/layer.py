"""Storage of one evicting layer: keys, values and everything aligned with them, kept together.

An `EvictingLayer` stores keys and values ``[batch, kv_heads, tokens, head_dim]`` and, aligned
with them, the absolute position of every kept token, optionally its token id, the attention it
has accumulated, a ``valid`` mask for padded slots and the per-token state components keep in
``LayerView.state``. `EvictingLayer.gather` applies a `Selection` to all of them at once, so
nothing ever goes out of step. Sliding-window layers stay transformers' own
`DynamicSlidingWindowLayer`: they trim themselves and are never evicted.

Keys and values are views of the front of a larger *store* with free slots after them, which
the layer alone writes: a decoding step writes its token into a free slot instead of copying
the whole cache into a new tensor (transformers' ``torch.cat``), and an eviction pass moves only
the kept tokens after the first evicted slot, in place. On an 8k context at 25 %, a per-step
policy (TOVA) otherwise copied every kept key and value of every layer twice per token. A layer
gives up writing into its store when its tensors may be seen elsewhere (`release_store`, called
by `EvictingCache.copy` on both sides), so a copy never sees a change.

Left-padded batches: each row numbers its own tokens (a padded slot is stored at position -1 and
``valid`` False, never counted or scored) and keeps its own schedule counters
(`EvictingLayer.row_seen`, ``row_new``, ``row_passes``). What the policy sees of a layer is
built in `kvpolicy.integrations.hf.layer_view`; when a pass runs, in
`kvpolicy.integrations.hf.eviction`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from kvpolicy import native
from kvpolicy.errors import ShapeError, UnsupportedModelError
from kvpolicy.integrations.hf.window import AttentionWindow
from kvpolicy.types import Selection, extend_tokens

#: position stored for a padded (invalid) slot; such a slot is never attended
PADDED_POSITION = -1

#: free slots a store gets beyond the tokens it holds when it is (re)allocated: at least this
#: many (a decoding step then writes in place for this many steps between copies), and as many as
#: the call appended, up to 8× this (the next prefill chunk, too, fits without a copy)
SPARE_SLOTS = 64


def expand_index(indices: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``indices [batch, kv_heads, kept]`` broadcast over the trailing dimensions of ``tensor``."""
    return indices.reshape(*indices.shape, *([1] * (tensor.dim() - 3))).expand(*indices.shape, *tensor.shape[3:])


def gather_tokens(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor [batch, kv_heads, tokens, ...]`` along tokens with ``indices [batch, kv_heads, kept]``.

    A contiguous tensor with trailing dimensions (keys, values: ``head_dim``) is gathered as whole
    rows by ``index_select`` on its ``[batch · kv_heads · tokens, rest]`` view: the same values as
    ``gather`` along dim 2, about ten times faster on the CPU, where ``gather`` reads an index per
    element. A decoding step of a per-step policy (TOVA) gathers every kept key and value of every
    layer, so this is most of what its eviction pass costs."""
    store = _contiguous_store(tensor) if tensor.dim() >= 4 else None
    if store is None or indices.shape[:2] != tensor.shape[:2]:
        return tensor.gather(2, expand_index(indices, tensor))
    tensor = store  # the same rows, numbered within the store (indices lie in its front)
    batch, kv_heads, tokens = tensor.shape[:3]
    rest = tensor.shape[3:]
    offsets = torch.arange(batch * kv_heads, device=indices.device).view(batch, kv_heads, 1) * tokens
    rows = (indices.to(torch.long) + offsets).reshape(-1)
    picked = tensor.reshape(batch * kv_heads * tokens, -1).index_select(0, rows)
    return picked.view(batch, kv_heads, indices.shape[2], *rest)


def _contiguous_store(tensor: torch.Tensor) -> torch.Tensor | None:
    """A contiguous tensor ``[batch, kv_heads, slots >= tokens, ...]`` whose front is ``tensor
    [batch, kv_heads, tokens, ...]``: itself when contiguous, the layer's store when ``tensor``
    is 4-d keys or values at the store's front; else None."""
    if tensor.is_contiguous():
        return tensor
    if tensor.dim() != 4:
        return None
    batch, kv_heads, tokens, width = tensor.shape
    rows, heads, token, last = tensor.stride()
    if last != 1 or token != width or heads % width or heads // width < tokens:
        return None
    if batch > 1 and rows != kv_heads * heads:
        return None
    return tensor.as_strided((batch, kv_heads, heads // width, width), (kv_heads * heads, heads, width, 1))


def _keeps_all(indices: torch.Tensor, tokens: int) -> bool:
    """Whether ``indices [batch, kv_heads, kept]`` keep all ``tokens`` in their stored order."""
    if indices.shape[2] != tokens:
        return False
    return bool((indices == torch.arange(tokens, device=indices.device)).all())


def valid_first(valid: torch.Tensor) -> bool:
    """Whether every head lists its valid slots first (true after any pass; false while a row's
    left padding is still stored)."""
    return not bool((valid[..., 1:] & ~valid[..., :-1]).any())


def check_state(name: str, tensor: object, tokens: int) -> None:
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
        #: [batch, kv_heads, tokens] float32 attention received while the context was repeated
        #: (`kvpolicy.integrations.hf.reconstruction`), set just before the eviction pass reading it
        self.reconstruction: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.window: AttentionWindow | None = None  # attention rows of the newest queries (in-pass)
        #: ``(keys, values)`` stores whose front ``keys`` / ``values`` are views of, written in
        #: place by this layer alone; None: the next append allocates them
        self.store: tuple[torch.Tensor, torch.Tensor] | None = None
        #: per batch row (int64, on the CPU): tokens seen (padding excluded), tokens since the
        #: row's last eviction pass, eviction passes run; None before the first append
        self.row_seen: torch.Tensor | None = None
        self.row_new: torch.Tensor | None = None
        self.row_passes: torch.Tensor | None = None
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
        keys, values = self._append_keys_values(key_states, value_states)
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
            self.row_seen = self.row_new = self.row_passes = torch.zeros(batch, dtype=torch.long)
        self.row_seen = self.row_seen + counts
        self.row_new = self.row_new + counts
        return keys, values

    def _append_keys_values(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``DynamicLayer.update`` (keys and values grow along tokens) writing into
        the store's free slots when there are enough, else into a new store with `SPARE_SLOTS`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        before = self.keys.shape[2] if self.keys.dim() == 4 else 0
        total = before + key_states.shape[2]
        store = self._writable_store(key_states, value_states)
        if store is None or store[0].shape[2] < total:
            slots = total + max(SPARE_SLOTS, min(key_states.shape[2], 8 * SPARE_SLOTS))
            store = tuple(new.new_empty((*new.shape[:2], slots, new.shape[3])) for new in (key_states, value_states))
            if before:
                store[0][:, :, :before].copy_(self.keys)
                store[1][:, :, :before].copy_(self.values)
            self.store = store
        store[0][:, :, before:total].copy_(key_states)
        store[1][:, :, before:total].copy_(value_states)
        self.keys, self.values = store[0][:, :, :total], store[1][:, :, :total]
        return self.keys, self.values

    def _writable_store(
        self, key_states: torch.Tensor | None = None, value_states: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The store, if this layer may write into it now: its keys and values are still its
        front (nothing replaced them), new states fit its shape and dtype, and the current
        inference mode allows writing it."""
        store = self.store
        if store is None or self.keys is None or self.keys.dim() != 4:
            return None
        for tensor, kept in zip(store, (self.keys, self.values), strict=True):
            if (
                kept.data_ptr() != tensor.data_ptr()
                or kept.stride() != tensor.stride()
                or kept.shape[:2] != tensor.shape[:2]
            ):
                return None
        if store[0].is_inference() and not torch.is_inference_mode_enabled():
            return None
        for new, tensor in zip((key_states, value_states), store, strict=True):
            if new is not None and (
                new.shape[:2] != tensor.shape[:2] or new.shape[3:] != tensor.shape[3:]
                or new.dtype != tensor.dtype or new.device != tensor.device or new.requires_grad
            ):  # fmt: skip
                return None
        return store

    def release_store(self) -> None:
        """Never write into the current store again (its tensors are now seen by a copy): the
        next append or pass allocates a new one."""
        self.store = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):
        raise UnsupportedModelError(
            "an EvictingLayer is appended to through EvictingCache.update, which knows the absolute positions"
        )

    def add_rows(self, rows: torch.Tensor, positions: torch.Tensor, window: int) -> None:
        """Keep ``rows [batch, kv_heads, queries, tokens]`` computed in this call's attention pass
        (queries at ``positions [batch, queries]``) among the ``window`` newest."""
        if self.window is None:
            self.window = AttentionWindow(window)
        self.window = self.window.append(rows, positions.to(rows.device))

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

    def held_share(self, start: int, stop: int) -> torch.Tensor:
        """``[batch, stop - start]``: for each absolute position in ``start .. stop-1``, the share
        of this layer's KV heads whose cache still holds it — what survived eviction of a span of
        the stream (a video frame, a cue), read from the cache itself (padded slots excluded)."""
        if isinstance(start, bool) or isinstance(stop, bool) or not 0 <= start <= stop:
            raise ShapeError(f"held_share needs whole numbers 0 <= start <= stop, got {start!r}, {stop!r}")
        if self.positions is None:
            return torch.zeros(0, stop - start)
        positions = self.positions.detach().cpu()
        if self.valid is not None:
            positions = positions.masked_fill(~self.valid.cpu(), PADDED_POSITION)
        batch, heads = positions.shape[:2]
        inside = (positions >= start) & (positions < stop)
        shares = torch.zeros(batch, stop - start)
        for row in range(batch):
            held = positions[row][inside[row]] - start
            shares[row].index_add_(0, held, torch.full((held.numel(),), 1.0 / heads))
        return shares

    @property
    def batch(self) -> int:
        return 0 if self.positions is None else self.positions.shape[0]

    @property
    def eviction_passes(self) -> int:
        """Eviction passes run, by the row that ran the most."""
        return 0 if self.row_passes is None else int(self.row_passes.max())

    def cached_rows(self) -> list[int]:
        """Tokens per head of each row for the schedule: the physical length, or the row's mean
        kept over its heads if they differ (what the row alone would hold)."""
        if self.valid is None:
            return [self.tokens] * self.batch
        return [math.ceil(x) for x in self.valid.sum(-1).float().mean(-1).tolist()]

    def finish_pass(self, rows: list[int] | None = None, policy: Any = None) -> None:
        """After an eviction pass of ``rows`` (all by default): count it; once no row has tokens
        since its pass, forget the statistics; once ``policy`` can run no further pass on any row
        (`Policy.will_run_again`), mark the layer finished: its attention records nothing more."""
        if rows is None or len(rows) == self.batch:
            self.row_passes = self.row_passes + 1
            self.row_new = torch.zeros_like(self.row_new)
        else:
            done = torch.zeros(self.batch, dtype=torch.bool)
            done[rows] = True
            self.row_passes = self.row_passes + done.long()
            self.row_new = self.row_new.masked_fill(done, 0)
        if not bool(self.row_new.any()):
            self.window = None
        if policy is not None:
            self.finished = not policy.will_run_again(passes_done=int(self.row_passes.min()))

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
        if not self._take_in_place(indices):
            self.keys = gather_tokens(self.keys, indices)
            self.values = gather_tokens(self.values, indices)
            self.store = None  # the next append allocates one; the old is freed now
        self._take_aligned(indices, tokens)

    def _take_aligned(self, indices: torch.Tensor, tokens: int) -> None:
        """Keep ``indices`` of everything aligned with the keys (positions, ids, statistics,
        state, the attention window) once the keys and values themselves have been taken."""
        self.positions = self.positions.gather(2, indices)
        if self.token_ids is not None:
            self.token_ids = self.token_ids.gather(2, indices)
        if self.accumulated is not None:
            self.accumulated = extend_tokens(self.accumulated, tokens).gather(2, indices)
        if self.reconstruction is not None:
            self.reconstruction = extend_tokens(self.reconstruction, tokens).gather(2, indices)
        for name, tensor in list(self.state.items()):
            check_state(name, tensor, tokens)
            self.state[name] = gather_tokens(extend_tokens(tensor, tokens), indices.to(tensor.device))
        if self.window is not None:  # rows not yet due still need their window, re-indexed
            self.window = self.window.take(indices.to(self.window.blocks[0].device), tokens)

    def _store_keeping(self, kept: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The store, if ``kept`` tokens may be kept in it in place: it is writable, and it
        would not hold more than half again the kept tokens in free slots (else a new, smaller
        store is gathered instead)."""
        store = self._writable_store()
        if store is None or store[0].shape[2] - kept > max(2 * SPARE_SLOTS, kept // 2):
            return None
        return store

    def _take_in_place(self, indices: torch.Tensor) -> bool:
        """Keep the keys and values at ``indices`` in the store itself: the slots before the
        first one that moves stay where they are, only the rest are gathered and written back
        (a per-step pass dropping one token moves the tokens after it, not every kept one).
        False (nothing done) without a store that may keep them (`_store_keeping`)."""
        kept = indices.shape[2]
        store = self._store_keeping(kept)
        if store is None:
            return False
        moved = indices != torch.arange(kept, device=indices.device)
        first = int(torch.where(moved.any(-1), moved.to(torch.int8).argmax(-1), kept).min()) if kept else 0
        if first < kept:
            rest = indices[:, :, first:]
            for tensor in store:  # gathered first, then written: order of the indices does not matter
                tensor[:, :, first:kept].copy_(gather_tokens(tensor, rest))
        self.keys, self.values = store[0][:, :, :kept], store[1][:, :, :kept]
        return True

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
        self.__init__()  # drops the tensors; never zeroes them in place (a copy may share them)

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModelError(
            "an evicting cache cannot be cropped (assisted / speculative decoding is not supported)"
        )

    _BATCHED = (
        "keys", "values", "positions", "token_ids", "valid", "accumulated", "reconstruction",
        "row_seen", "row_new", "row_passes",
    )  # fmt: skip

    def _batch_apply(self, fn) -> None:
        self.store = None  # keys and values become new tensors
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


def keep_layers_in_place(layers: list[EvictingLayer], indices: torch.Tensor) -> bool:
    """Keep ``indices [layers, batch, kv_heads, kept]`` of every layer (each layer's pass already
    counted): keys and values in their stores by one native call (`kvpolicy.native.keep_in_place`:
    `EvictingLayer._take_in_place` for many layers at once), then what is aligned with them.
    False (nothing changed) where that does not apply: no native kernels, a layer holding padding
    or a store that may not keep them in place, indices out of stored order."""
    kept, tokens = indices.shape[-1], layers[0].tokens
    if any(layer.valid is not None or layer.tokens != tokens for layer in layers):
        return False
    stores = [layer._store_keeping(kept) for layer in layers]
    if any(store is None or not all(t.is_contiguous() for t in store) for store in stores):
        return False
    if not (indices.device.type == "cpu" and native.available()):
        return False
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= tokens):
        raise ShapeError(f"selection indices must lie in [0, {tokens}); got {int(indices.min())}..{int(indices.max())}")
    try:
        native.keep_in_place([tensor for store in stores for tensor in store], indices)
    except ShapeError:  # a selection not in stored order: each layer gathers it itself
        return False
    for layer, store, layer_indices in zip(layers, stores, indices, strict=True):
        layer.keys, layer.values = store[0][:, :, :kept], store[1][:, :, :kept]
        layer._take_aligned(layer_indices, tokens)
    return True
