"""Generic selectors: ``top_k`` (fixed budget, per head or shared by a layer's heads) and
``threshold`` (NAMM's rule: negative score evicts, the cache size is emergent)."""

from __future__ import annotations

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import InvalidBudgetError
from kvpolicy.selection import mask_selection, rank_protected_first, sorted_selection
from kvpolicy.types import Budget, ComponentBase, LayerView, Selection, non_negative

_KEEP = float("inf")


def _top_k(keyed: torch.Tensor, k: int) -> Selection:
    """The ``k`` highest of ``keyed [batch, heads, tokens]`` per head, ascending. A decoding step
    of a per-step policy drops a token or two of thousands: then the few lowest are found and the
    rest kept in order, instead of ranking and sorting every kept token (most of a pass's select).
    The ``j``-th kept slot is ``j`` plus the dropped slots at or before it, counted by a search in
    the sorted dropped ones (no mask over every token)."""
    tokens = keyed.shape[-1]
    drop = tokens - k
    if drop <= 0 or drop >= k:
        return sorted_selection(keyed.topk(min(k, tokens), dim=-1).indices)
    dropped = keyed.topk(drop, dim=-1, largest=False).indices.sort(dim=-1).values
    # dropped[i] - i: how many kept slots precede the i-th dropped one (non-decreasing)
    before = (dropped - torch.arange(drop, device=keyed.device)).contiguous()
    kept = torch.arange(k, device=keyed.device).expand(*keyed.shape[:-1], k)
    if drop == 1:  # the usual decoding step: one comparison instead of a search
        return Selection(kept + (kept >= before))
    kept = kept.contiguous()
    return Selection(kept + torch.searchsorted(before, kept, right=True))


@attrs.frozen
class TopKConfig:
    """``shared_across_heads``: the layer's heads share ``budget × kv_heads`` slots, each head
    keeping at least ``min_per_head`` (Ada-KV, Feng et al. 2024); heads then keep different
    counts, stored padded to the largest with the padding masked out."""

    shared_across_heads: bool = False
    min_per_head: int = attrs.field(default=0, validator=non_negative)


class TopKSelector(ComponentBase):
    """Keep the highest-scored tokens within the budget; protected tokens always."""

    name = "top_k"
    plans_layers_together = True  # rows alone, no layer index: `Capabilities`
    Config = TopKConfig
    needs_budget = True

    def select(self, scores: torch.Tensor, protected: torch.Tensor, budget: Budget, view: LayerView) -> Selection:
        batch, heads, tokens = scores.shape
        capacity = budget.capacity(view.seen)
        if capacity is None:
            raise InvalidBudgetError("top_k needs a budget (tokens or ratio)")
        capacity = min(capacity, tokens)
        keyed = rank_protected_first(scores, protected)
        if not self.config.shared_across_heads:
            k = max(capacity, int(protected.sum(-1).max()))
            return _top_k(keyed, k)
        return self._shared(keyed, protected, capacity, heads, tokens)

    def _shared(
        self, keyed: torch.Tensor, protected: torch.Tensor, capacity: int, heads: int, tokens: int
    ) -> Selection:
        batch = keyed.shape[0]
        floor = min(max(self.config.min_per_head, int(protected.sum(-1).max())), tokens)
        total = max(capacity * heads, floor * heads)
        # Each head's `floor` best are kept first, then the rest of the layer's slots go to the
        # best remaining tokens of any head.
        first = keyed.topk(floor, dim=-1).indices if floor else keyed.new_zeros((batch, heads, 0), dtype=torch.long)
        chosen = torch.zeros_like(protected)
        chosen.scatter_(-1, first, True)
        rest = keyed.masked_fill(chosen, -_KEEP).reshape(batch, heads * tokens)
        extra = total - floor * heads
        if extra > 0:
            top = rest.topk(extra, dim=-1).indices
            flat = chosen.reshape(batch, heads * tokens).clone()
            flat.scatter_(-1, top, True)
            chosen = flat.reshape(batch, heads, tokens)
        return mask_selection(chosen)


@attrs.frozen
class ThresholdConfig:
    """``threshold``: tokens scoring below it are evicted (NAMM: 0). ``per_head``: each KV head
    keeps exactly the tokens it wants (heads keep different counts, stored padded to the layer's
    largest with the padding masked out), so the memory's size is chosen per layer *and* head;
    off, every head of a layer keeps the greediest head's count."""

    threshold: float = 0.0
    per_head: bool = False


class ThresholdSelector(ComponentBase):
    """NAMM's selection (Cetin et al. 2024): a token whose score is below the threshold is
    evicted and the newest is always kept, so the cache's size is emergent rather than budgeted.
    By default every head of a layer keeps the same count — the largest any head wants, filled
    with each head's best-scored tokens — so a layer's cache stays rectangular; ``per_head`` lets
    each head keep only what it wants."""

    name = "threshold"
    Config = ThresholdConfig
    needs_budget = False

    def select(self, scores: torch.Tensor, protected: torch.Tensor, budget: Budget, view: LayerView) -> Selection:
        wanted = (scores >= self.config.threshold) | protected
        if self.config.per_head:  # each head keeps exactly what it wants
            selection = mask_selection(wanted)
            return Selection(selection.indices) if bool(selection.valid.all()) else selection
        per_row = wanted.sum(-1).amax(dim=1)  # [batch]: the count the greediest head of each row wants
        k = int(per_row.max())
        indices = rank_protected_first(scores, protected).topk(k, dim=-1).indices  # best first
        if bool((per_row == k).all()):
            return sorted_selection(indices)
        # Batch rows are independent sequences (e.g. population members): each keeps its own
        # count; the shorter rows are padded and their padding masked out.
        rank = torch.arange(k, device=scores.device)
        valid = (rank < per_row[:, None, None]).expand_as(indices)
        return sorted_selection(indices, valid)


@hookimpl
def kvpolicy_register_selectors(register) -> None:
    register("top_k", TopKSelector)
    register("threshold", ThresholdSelector)
