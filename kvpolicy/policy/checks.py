"""The checks a policy runs: when it is built (feature widths, budget) and on every eviction pass,
cheaply, on what its components return (shapes, NaN scores, the selection). A broken component
fails here with a named error that says which component and what was wrong, never later as a
damaged cache."""

from __future__ import annotations

from typing import Any

import torch

from kvpolicy.errors import (
    FeatureWidthError,
    InvalidBudgetError,
    InvalidConfigError,
    InvalidScoresError,
    InvalidSelectionError,
    ShapeError,
)
from kvpolicy.types import (
    Budget,
    DeclaresFeatures,
    LayerView,
    Protection,
    ReadsFeatures,
    Requirements,
    Schedule,
    Selection,
    capabilities,
)


def check_feature_width(extractor: Any, scorer: Any) -> None:
    """The extractor's declared feature width must be one the scorer declares it takes."""
    if not isinstance(extractor, DeclaresFeatures) or not isinstance(scorer, ReadsFeatures):
        return
    width, takes = extractor.num_features, scorer.input_width
    if not takes.admits(width):
        raise FeatureWidthError(
            f"extractor {extractor.name!r} gives {width} features per token, but scorer "
            f"{scorer.name!r} takes {takes}; configure the scorer for {width} features (e.g. "
            f"its `features` field) or use an extractor whose width it takes"
        )


def check_budget(selector: Any, budget: Budget, protect: Protection, evicts: bool) -> None:
    """A budget exactly where the selector needs one (and the schedule ever ``evicts``), and no
    smaller than the protected tokens."""
    wants_budget = capabilities(selector).needs_budget
    if wants_budget and evicts and not budget.is_set:
        raise InvalidBudgetError(
            f"selector {selector.name!r} needs a budget (e.g. budget=512 or budget=0.25); "
            "threshold-style selectors are the ones that work without one"
        )
    if not wants_budget and budget.is_set:
        raise InvalidBudgetError(
            f"selector {selector.name!r} decides the cache size itself and takes no budget; "
            f"got {budget}. Use a top_k selector for a fixed budget."
        )
    if budget.tokens is not None and budget.tokens < protect.minimum:
        raise InvalidBudgetError(
            f"budget of {budget.tokens} tokens is smaller than the {protect.minimum} tokens "
            f"the policy must protect ({protect.sinks} sinks + {max(protect.recent, 1)} recent)"
        )


def check_reconstruction(requirements: Requirements, schedule: Schedule) -> None:
    """A policy reading `Requirements.reconstruction` runs once the context is whole
    (``after_prefill``): the repeat pass reproduces the cached context, which mid-prompt is a
    fragment, and after eviction is no longer there to repeat. It also needs the token ids the
    repeat replays (how to repeat them, `Policy.repeat_prompt`, is asked when the pass runs: a
    policy that only records statistics for others has no prompt of its own)."""
    if not requirements.reconstruction:
        return
    if schedule.kind != "after_prefill":
        raise InvalidConfigError(
            f"a policy that reads reconstruction attention (KVzip) runs its eviction pass once, after the whole "
            f"prompt: use Schedule('after_prefill'), not {schedule.kind!r}"
        )
    if not requirements.token_ids:
        raise InvalidConfigError(
            "Requirements(reconstruction=True) needs the cached token ids too (token_ids=True): the repeat pass "
            "feeds them again"
        )


def check_no_nan(scores: torch.Tensor, padded: torch.Tensor | None, view: LayerView, source: str) -> None:
    """A NaN score has no rank, so the selector would keep or evict that token arbitrarily;
    ±inf are legal (+inf pins a token, padded slots are set to −inf). ``source`` names the
    component that produced ``scores`` (``scorer 'h2o'``, ``pooler 'span'``)."""
    nan = torch.isnan(scores)
    if padded is not None:
        nan &= ~padded
    if not bool(nan.any()):
        return
    row, head, slot = (int(i) for i in nan.nonzero()[0])
    raise InvalidScoresError(
        f"{source} returned NaN for {int(nan.sum())} cached token(s) on layer {view.layer} (first: batch "
        f"row {row}, head {head}, position {int(view.positions[row, head, slot])}); scores must be numbers or ±inf"
    )


def check_selection(
    selection: Selection, protected: torch.Tensor, padded: torch.Tensor | None, view: LayerView, selector: str
) -> None:
    """Cheap run-time checks of a selection (vectorised, one host sync when all is well): indices
    inside the cache, no token twice, ascending per head and every protected token kept. Slots
    that ``selection.valid`` marks as padding are ignored (they legitimately point at 0)."""
    indices = selection.indices
    where = f"selector {selector!r} on layer {view.layer}"
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise InvalidSelectionError(f"{where} returned {indices.dtype} indices; they must be integers")
    valid = selection.valid
    if valid is not None and (
        not isinstance(valid, torch.Tensor) or valid.shape != indices.shape or valid.dtype != torch.bool
    ):
        got = f"{tuple(valid.shape)} {valid.dtype}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise InvalidSelectionError(f"{where} returned selection.valid {got}; expected bool {tuple(indices.shape)}")
    tokens = view.tokens
    if valid is None:
        if _plainly_valid(indices, protected, padded, tokens):
            return
        valid = torch.ones_like(indices, dtype=torch.bool)
    outside = ~((indices >= 0) & (indices < tokens))
    safe = indices.clamp(0, max(tokens - 1, 0)).long()
    counts = torch.zeros(protected.shape, dtype=torch.int32, device=indices.device)
    counts.scatter_add_(-1, safe, (valid & ~outside).to(torch.int32))
    unsorted = torch.zeros_like(valid)
    if indices.shape[-1] > 1:
        before = torch.where(valid, safe, -1).cummax(-1).values  # the largest valid index up to each slot
        unsorted[..., 1:] = valid[..., 1:] & (safe[..., 1:] <= before[..., :-1])
    dropped = protected.to(counts.device) & (counts == 0)
    if padded is not None:
        dropped &= ~padded.to(counts.device)
    problems = torch.stack([outside.any(), (counts > 1).any(), unsorted.any(), dropped.any()]).tolist()
    if not any(problems):
        return
    if problems[0]:
        raise InvalidSelectionError(
            f"{where} returned indices {int(indices.min())}..{int(indices.max())}; they must lie in [0, {tokens})"
        )
    if problems[1]:
        row, head, slot = (int(i) for i in (counts > 1).nonzero()[0])
        raise InvalidSelectionError(
            f"{where} kept slot {slot} twice (batch row {row}, head {head}); each cached token may be kept once"
        )
    if problems[2]:
        row, head, _ = (int(i) for i in unsorted.nonzero()[0])
        raise InvalidSelectionError(
            f"{where} returned unsorted indices (batch row {row}, head {head}): {indices[row, head].tolist()[:16]}; "
            "kept indices must ascend per head (kvpolicy.selection.sorted_selection does this)"
        )
    row, head, slot = (int(i) for i in dropped.nonzero()[0])
    raise InvalidSelectionError(
        f"{where} dropped {int(dropped.sum())} protected token(s) (first: position "
        f"{int(view.positions[row, head, slot])}, batch row {row}, head {head}); sinks, the recent window and the "
        "newest token must always be kept"
    )


def _plainly_valid(indices: torch.Tensor, protected: torch.Tensor, padded: torch.Tensor | None, tokens: int) -> bool:
    """The common case of `check_selection` in a few operations (a per-step policy runs it on
    every layer at every token): no padding in the selection, indices strictly ascending (so none
    twice) from >= 0 to < ``tokens``, every protected token kept. False sends the selection to the
    full check, which names the problem."""
    if indices.shape[-1] == 0:
        return not bool(protected.any())
    ascending = (indices[..., 1:] > indices[..., :-1]).all()  # strictly: no index twice
    if not bool(ascending & (indices[..., 0] >= 0).all() & (indices[..., -1] < tokens).all()):
        return False
    # indices ascend strictly inside the cache, so every protected token is kept exactly when
    # as many kept slots are protected as there are protected tokens (a gather of the kept,
    # cheaper than scattering a mask over every token)
    needed = protected.to(indices.device)
    if padded is not None:
        needed = needed & ~padded.to(indices.device)
    return bool((needed.gather(-1, indices.long()).sum(-1) == needed.sum(-1)).all())


def check_shape(tensor: torch.Tensor, view: LayerView, what: str, extra_dims: int) -> None:
    expected = (view.batch, view.kv_heads, view.tokens)
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape[:3]) != expected or tensor.dim() != 3 + extra_dims:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        dims = "[batch, kv_heads, tokens" + (", features]" if extra_dims else "]")
        raise ShapeError(f"{what} have shape {shape}; expected {dims} with leading dims {expected}")
