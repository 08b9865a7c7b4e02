"""The evicting cache: transformers' dynamic cache whose full-attention layers a policy evicts.

Its layers are `EvictingLayer`s (`kvpolicy.integrations.hf.layer`: keys, values, positions and
per-token state kept together) and, for sliding-window layers, transformers' own
`DynamicSlidingWindowLayer`. The cache hands each forward call its tokens' absolute positions
(`begin_forward`), appends keys and values through transformers' ``cache.update`` (only an
*append*, never an eviction), keeps the statistics the attention pass computed
(`record_in_pass`) and runs the eviction pass between forward calls
(`eviction_pass`, see `kvpolicy.integrations.hf.eviction`).

``get_seq_length()`` stays *physical* (the tokens actually stored): transformers sizes masks and
query offsets from it, while RoPE gets absolute ``position_ids`` from `EvictingCache.seen`.
Left-padded batches: each row numbers its own tokens (a padded slot is stored at position -1,
never counted or scored) and keeps its own counters, so its own schedule and budget.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer

from kvpolicy.errors import ShapeError, UnsupportedModelError, UnsupportedPaddingError
from kvpolicy.integrations.hf.eviction import due_rows, evict_rows
from kvpolicy.integrations.hf.layer import PADDED_POSITION, EvictingLayer
from kvpolicy.integrations.hf.layer_view import layer_view
from kvpolicy.integrations.hf.memory_release import enabled as release_enabled
from kvpolicy.integrations.hf.memory_release import release_freed_memory
from kvpolicy.integrations.hf.stacked_pass import evict_together
from kvpolicy.types import LayerView, Requirements

__all__ = ["PADDED_POSITION", "EvictingCache", "EvictingLayer", "layer_types"]


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
        self.eviction_passes = 0
        self.policy_seconds = 0.0
        #: plan the layers due at one step as one stacked pass where the policy allows it
        #: (`kvpolicy.integrations.hf.stacked_pass`); False: one pass per layer (the reference)
        self.plan_layers_together = True
        #: after each forward call of more than one token (a prefill chunk), hand the memory freed
        #: since back to the operating system (`kvpolicy.integrations.hf.memory_release`)
        self.release_memory = release_enabled()
        #: no eviction pass runs any more and no statistics are recorded: what is cached stays
        #: (`Handle.seal`, the ``context-first`` protocol: the question never reaches a pass)
        self.sealed = False
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
            if not self.sealed:  # sealed: no pass will see the gap, attention masks every padded slot
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
        return (
            self.requirements.needs_attention
            and layer_idx in self.managed
            and not self.sealed
            and not self.layers[layer_idx].finished
        )

    def record_in_pass(self, layer_idx: int, rows: torch.Tensor | None, columns: torch.Tensor | None) -> None:
        """Keep what the attention pass computed from its own probabilities: attention ``rows
        [batch, kv_heads, queries, tokens]`` of the call's newest queries and the
        attention received ``columns [batch, kv_heads, tokens]`` (either may be None)."""
        layer = self.layers[layer_idx]
        if rows is not None:
            layer.add_rows(rows, self._pending_positions[:, -rows.shape[2] :], self.requirements.attention_window)
        if columns is not None:
            layer.add_accumulated(columns)

    # ----------------------------------------------------------------- the eviction pass

    def due_rows(self, policy: Any, index: int) -> list[list[int]]:
        """The batch rows of layer ``index`` due for ``policy``'s eviction pass now, grouped by
        their counters (`kvpolicy.integrations.hf.eviction.due_rows`)."""
        return due_rows(self.layers[index], policy, self.prefill_done)

    def is_due(self, policy: Any, index: int) -> bool:
        """Whether any row of layer ``index`` is due for ``policy``'s eviction pass now."""
        return bool(self.due_rows(policy, index))

    def view(self, index: int, rows: list[int] | None = None) -> LayerView:
        """What the policy sees of layer ``index`` (batch ``rows``, all by default): exactly what
        its requirements ask for."""
        return layer_view(self.layers[index], index, self.num_layers, self.requirements, rows)[0]

    def eviction_pass(self, policy: Any) -> None:
        """Between forward calls: every managed layer runs extract → score → select (`Policy.plan`)
        for the rows whose schedule is due, and keeps the selected tokens with everything aligned
        to them; layers that can be are planned together, as one stacked pass. After a forward
        call of more than one token, the memory freed is handed back to the operating system
        (`release_memory`). A sealed cache runs none."""
        if self.sealed:
            return
        start = time.perf_counter()
        with torch.no_grad():
            due = [(index, groups) for index in self.managed if (groups := self.due_rows(policy, index))]
            left = due
            if self.plan_layers_together and len(due) > 1 and policy.plans_layers_together:
                left = evict_together(self.layers, policy, self.num_layers, self.requirements, due)
            for index, groups in left:
                evict_rows(self.layers[index], policy, index, self.num_layers, self.requirements, groups)
            if self.release_memory and self._pending_positions is not None and self._pending_positions.shape[1] > 1:
                release_freed_memory()
        self.policy_seconds += time.perf_counter() - start
        self.eviction_passes += int(bool(due))

    def copy(self) -> EvictingCache:
        """A copy that can be filled and evicted without touching this cache: layers and their
        state dicts are copied; tensors are shared, and neither side writes into the keys and
        values they share again (`EvictingLayer.release_store`), so each only ever replaces them."""
        for layer in self.layers:
            if isinstance(layer, EvictingLayer):
                layer.release_store()
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
        self.eviction_passes = 0
        self.policy_seconds = 0.0
        self.sealed = False

    def seal(self) -> None:
        """No eviction pass from now on; the statistics kept for passes are dropped (nothing reads them)."""
        self.sealed = True
        for layer in self.layers:
            if isinstance(layer, EvictingLayer):
                layer.window = None
                layer.accumulated = None

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModelError(
            "an evicting cache cannot be cropped (assisted / speculative decoding is not supported)"
        )
