"""The invariants of an eviction, as plain functions returning what is violated.

Shared by the conformance checks (one `Selector.select` call on drawn tensors) and the state
machine (a cache driven through many eviction passes). Each function returns a list of messages, empty
when everything holds, so a caller can report every broken rule at once.
"""

from __future__ import annotations

import torch

from kvpolicy.types import Selection, capabilities


class InvariantViolation(AssertionError):
    """A cache or selection invariant does not hold; the message names the rule and where."""


def keeps_highest_scores(selector: object) -> bool:
    """Whether ``selector`` keeps the highest-scored unprotected tokens of each head.

    A selector that also keeps tokens by another rule (a recent window sized by the budget, a
    class of special tokens) declares ``keeps_highest_scores = False`` (`kvpolicy.types.Capabilities`)
    and is exempt from the score-order invariant.
    """
    return capabilities(selector).keeps_highest_scores


def kept_mask(selection: Selection, tokens: int) -> torch.Tensor:
    """``[batch, kv_heads, tokens]`` bool: which tokens the selection keeps (padding excluded)."""
    indices = selection.indices.clamp(0, max(tokens - 1, 0))
    batch, heads, _ = indices.shape
    valid = selection.valid if selection.valid is not None else torch.ones_like(indices, dtype=torch.bool)
    counts = torch.zeros(batch, heads, tokens, dtype=torch.int64, device=indices.device)
    counts.scatter_add_(-1, indices, valid.to(torch.int64))  # padding slots add 0 wherever they point
    return counts > 0


def selection_violations(
    selection: Selection,
    scores: torch.Tensor,
    protected: torch.Tensor,
    capacity: int | None,
    *,
    score_order: bool = True,
) -> list[str]:
    """Everything wrong with ``selection`` as an answer to ``select(scores, protected, ...)``.

    Rules: indices ``[batch, kv_heads, kept]`` int64 inside the cache, strictly ascending per
    head (so positions stay increasing); a ``valid`` mask, if any, is bool of the same shape;
    every protected token kept; at most ``kv_heads × max(capacity, protected)`` tokens kept per
    batch row when a budget applies; and (if ``score_order``) every evicted token scored no
    higher than every unprotected survivor of its head.
    """
    batch, heads, tokens = scores.shape
    indices, valid = selection.indices, selection.valid
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, heads):
        shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        return [f"selection indices have shape {shape}; expected [batch={batch}, kv_heads={heads}, kept]"]
    if indices.dtype != torch.int64:
        return [f"selection indices have dtype {indices.dtype}; expected torch.int64"]
    if valid is not None and (valid.dtype != torch.bool or valid.shape != indices.shape):
        return [f"selection.valid must be bool of shape {tuple(indices.shape)}, got {valid.dtype} {tuple(valid.shape)}"]
    is_valid = valid if valid is not None else torch.ones_like(indices, dtype=torch.bool)
    problems: list[str] = []
    outside = is_valid & ((indices < 0) | (indices >= tokens))
    if outside.any():
        return [f"selection indices {indices[outside][:5].tolist()} are outside the cache of {tokens} tokens"]
    for b in range(batch):
        for h in range(heads):
            kept = indices[b, h][is_valid[b, h]]
            if (kept[1:] <= kept[:-1]).any():
                problems.append(f"batch {b} head {h}: kept indices {kept.tolist()} are not strictly ascending")
    if problems:
        return problems
    keep = kept_mask(selection, tokens)
    lost = protected & ~keep
    if lost.any():
        where = lost.nonzero()[0].tolist()
        problems.append(f"protected tokens evicted ({int(lost.sum())} in all; first at batch, head, token {where})")
    if capacity is not None:
        allowed = heads * max(capacity, int(protected.sum(-1).max()) if protected.numel() else 0)
        per_row = keep.sum(dim=(1, 2))
        if (per_row > allowed).any():
            problems.append(
                f"kept {per_row.tolist()} tokens per batch row, over the budget of {allowed} "
                f"({heads} heads × max(capacity {capacity}, protected))"
            )
    if score_order:
        problems += score_order_violations(scores, protected, keep)
    return problems


def score_order_violations(scores: torch.Tensor, protected: torch.Tensor, keep: torch.Tensor) -> list[str]:
    """Evicted tokens that scored higher than an unprotected survivor of the same head."""
    scores = scores.float()
    inf = torch.tensor(float("inf"))
    lowest_survivor = torch.where(keep & ~protected, scores, inf).amin(dim=-1)
    highest_evicted = torch.where(~keep, scores, -inf).amax(dim=-1)
    bad = highest_evicted > lowest_survivor
    if not bad.any():
        return []
    b, h = bad.nonzero()[0].tolist()
    return [
        f"batch {b} head {h}: an evicted token scored {highest_evicted[b, h].item():.6g}, higher than an "
        f"unprotected survivor's {lowest_survivor[b, h].item():.6g}"
    ]


def raise_if(problems: list[str], what: str) -> None:
    """Raise `InvariantViolation` listing ``problems`` under the heading ``what``."""
    if problems:
        raise InvariantViolation(f"{what}:\n  - " + "\n  - ".join(problems))
