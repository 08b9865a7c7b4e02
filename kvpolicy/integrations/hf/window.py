"""The attention rows of a layer's newest queries, kept across forward calls until its eviction pass.

A policy with ``Requirements.attention_window = w`` reads the rows of the ``w`` newest queries
since the layer's last eviction pass. They are computed in the attention pass of the call that runs
those queries (`kvpolicy.integrations.hf.in_pass`), so a window that spans several calls (decoding,
or prefill chunks that do not divide the schedule's period) is assembled here from one block per
call. Between gathers a layer only grows, so a block computed over the tokens of its time lines
up with the cache's first tokens; tokens that came later did not exist for its queries and get 0.
A gather that keeps the window (some batch rows of a padded batch were not due) re-indexes it
with `take`, so blocks always line up with the tokens stored.

Query positions are kept per batch row (``[batch, queries_i]``): in a left-padded batch each row
numbers its own tokens, and a padded query sits at -1.

Immutable: `append`, `last`, `take` and `map` return new windows, so a cache copied for a fork
(`kvpolicy.integrations.hf.shared_prefill`) never changes the one it was copied from.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch


@attrs.frozen(eq=False)
class AttentionWindow:
    """Row blocks ``[batch, kv_heads, queries_i, tokens_i]`` (oldest first) and the absolute
    positions ``[batch, queries_i]`` of their queries; at most ``size`` queries in all."""

    size: int
    blocks: tuple[torch.Tensor, ...] = ()
    positions: tuple[torch.Tensor, ...] = ()

    @property
    def queries(self) -> int:
        return sum(block.shape[2] for block in self.blocks)

    @property
    def nbytes(self) -> int:
        return sum(block.numel() * block.element_size() for block in self.blocks)

    def append(self, rows: torch.Tensor, positions: torch.Tensor) -> AttentionWindow:
        """This window plus ``rows [batch, kv_heads, queries, tokens]`` at ``positions [batch,
        queries]``, trimmed to the ``size`` newest queries."""
        return attrs.evolve(self, blocks=(*self.blocks, rows), positions=(*self.positions, positions)).last(self.size)

    def last(self, size: int) -> AttentionWindow:
        """The ``size`` newest queries of this window (whole blocks dropped, the oldest kept one sliced)."""
        blocks, positions = list(self.blocks), list(self.positions)
        excess = sum(block.shape[2] for block in blocks) - size
        while excess > 0 and blocks and blocks[0].shape[2] <= excess:
            excess -= blocks[0].shape[2]
            blocks.pop(0)
            positions.pop(0)
        if excess > 0:
            blocks[0], positions[0] = blocks[0][:, :, excess:], positions[0][:, excess:]
        return AttentionWindow(min(size, self.size), tuple(blocks), tuple(positions))

    def rows(self, tokens: int) -> torch.Tensor:
        """``[batch, kv_heads, queries, tokens]`` float32, zero for tokens newer than a block."""
        if len(self.blocks) == 1 and self.blocks[0].shape[3] == tokens:
            return self.blocks[0]
        first = self.blocks[0]
        out = first.new_zeros((*first.shape[:2], self.queries, tokens))
        start = 0
        for block in self.blocks:
            out[:, :, start : start + block.shape[2], : block.shape[3]] = block
            start += block.shape[2]
        return out

    @property
    def query_positions(self) -> torch.Tensor:
        """``[batch, queries]`` absolute positions (-1 for a padded query)."""
        return torch.cat(self.positions, dim=1)

    def take(self, indices: torch.Tensor, tokens: int) -> AttentionWindow:
        """The window over the tokens ``indices [batch, kv_heads, kept]`` of the ``tokens`` it
        covered, as one block (what a gather that keeps the window needs)."""
        if not self.blocks:
            return self
        rows = self.rows(tokens)
        index = indices.unsqueeze(2).expand(-1, -1, rows.shape[2], -1)
        return AttentionWindow(self.size, (rows.gather(3, index),), (self.query_positions,))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AttentionWindow:
        """The window with ``fn`` applied to the batch dimension of every block and position row
        (beams, batch selection)."""
        return attrs.evolve(
            self, blocks=tuple(fn(block) for block in self.blocks), positions=tuple(fn(p) for p in self.positions)
        )
