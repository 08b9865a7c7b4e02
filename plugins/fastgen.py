"""FastGen (Ge et al., "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs",
ICLR 2024).

Each attention head is profiled once, on the prompt, and given the cheapest of five structures
whose compressed attention still recovers at least ``recovery`` (the paper's T) of its full
attention: special tokens; + punctuation; + frequent tokens (heavy hitters by accumulated
attention, ``frequent_ratio`` of the sequence); + a local window (the newest ``local_ratio`` of
the sequence); or the full cache. During generation every head keeps its own structure, so
heads keep different counts (a ragged `Selection` with a ``valid`` mask).

Components: extractor ``token_class`` (is-special, is-punctuation, accumulated attention) →
scorer ``fastgen`` (profiles, then scores members of the head's structure ≥ 0, the rest −1) →
selector ``head_threshold`` (per head: keep scores ≥ 0, capped by the budget).

Token classes come from the tokenizer without importing transformers: `token_classes(tokenizer)`
returns ``{"special_ids": [...], "punctuation_ids": [...]}``, plain JSON that fills the extractor's
config: ``kvpolicy.build("fastgen", extractor=token_classes(tok))``. The registered preset has
no ids (it cannot know the tokenizer), so its special / punctuation structures are empty and
heads fall back to frequent + local or full until the ids are given.

Where the per-head profile lives: in the layer's per-token ``state`` under ``"fastgen.profile"``,
as ``[batch, kv_heads, tokens]`` int8 holding the head's structure index repeated along tokens.
It therefore obeys the state contract (tokens on dim 2), survives every gather unchanged and
starts afresh with each new cache; the scorer rewrites it at the current length on each eviction pass.

Deviations, stated: (1) recovery is measured as the share of the accumulated attention (summed
over every prompt query) that the structure keeps, i.e. the mean over queries of the recovered
attention mass; the paper compares attention maps, whose L1 gap after renormalisation is twice
the missing mass, so the criterion is the same per query but averaged over queries. (2) The
local window is measured against the newest position, as the cache generation will actually
see. (3) The paper sweeps T; the defaults here (T = 0.85, frequent 0.3, local 0.3) are those of
the cold-compress reimplementation of FastGen. (4) The preset runs an eviction pass every 16 tokens, so a
local window or heavy-hitter set can run up to 16 tokens over between eviction passes. (5) A budget, if
smaller than the sequence, caps each head (priority: special, punctuation, frequent, local,
then the rest by accumulated attention); the preset's ``Budget(ratio=1.0)`` means no cap.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import InvalidBudgetError, InvalidConfigError, ShapeError
from kvpolicy.selection import rank_protected_first, sorted_selection
from kvpolicy.types import (
    Budget,
    ComponentBase,
    ComponentRef,
    FeatureWidth,
    LayerView,
    PolicyConfig,
    Protection,
    Requirements,
    Schedule,
    Selection,
)

#: The five structures, cheapest first (index stored in the profile state).
STRUCTURES: tuple[str, ...] = ("special", "special+punctuation", "+frequent", "+local", "full")
PROFILE_KEY = "fastgen.profile"


def token_classes(tokenizer: Any) -> dict[str, list[int]]:
    """Special and punctuation token ids of a tokenizer, as JSON-ready config fields.

    Special ids are ``tokenizer.all_special_ids``; a punctuation token is one whose decoded text,
    stripped of whitespace, is non-empty and made only of Unicode punctuation (category P*).
    Works with any object that has ``all_special_ids``, ``__len__`` and ``batch_decode``.
    """
    missing = [a for a in ("all_special_ids", "__len__", "batch_decode") if not hasattr(tokenizer, a)]
    if missing:
        raise InvalidConfigError(
            "token_classes needs a tokenizer with all_special_ids, __len__ and batch_decode (a Hugging Face "
            f"tokenizer); {type(tokenizer).__name__} lacks {', '.join(missing)}"
        )
    special = sorted({int(i) for i in tokenizer.all_special_ids})
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special_set = set(special)
    punctuation = [
        i
        for i, text in enumerate(texts)
        if i not in special_set
        and (stripped := text.strip())
        and all(unicodedata.category(c).startswith("P") for c in stripped)
    ]
    return {"special_ids": special, "punctuation_ids": punctuation}


@attrs.frozen
class TokenClassConfig:
    """Token ids that count as special (BOS, chat-template markers) and as punctuation."""

    special_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    punctuation_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)


class TokenClassExtractor(ComponentBase):
    """Three features per token: is-special, is-punctuation (0/1) and accumulated attention."""

    name = "token_class"
    Config = TokenClassConfig
    requirements = Requirements(token_ids=True, accumulated_attention=True)
    num_features = 3

    def setup(self) -> None:
        self._special = torch.tensor(self.config.special_ids, dtype=torch.long)
        self._punctuation = torch.tensor(self.config.punctuation_ids, dtype=torch.long)

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Fill both classes from the model's tokenizer unless they were configured explicitly
        (called by `Policy.bind_tokenizer`; `kvpolicy run` and `kvpolicy eval` do)."""
        if not self.config.special_ids and not self.config.punctuation_ids:
            self.config = TokenClassConfig(**token_classes(tokenizer))
            self.setup()

    def extract(self, view: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, tokens, 3]``: special, punctuation, accumulated attention."""
        view.require("token_ids", "accumulated_attention", by=self.label)
        ids = view.token_ids
        special = torch.isin(ids, self._special.to(ids.device)).float()
        punctuation = torch.isin(ids, self._punctuation.to(ids.device)).float()
        return torch.stack([special, punctuation, view.accumulated_attention.float()], dim=-1)


def _unit(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InvalidConfigError(f"{type(instance).__name__}.{attribute.name} must be in [0, 1], got {value}")


@attrs.frozen
class FastGenConfig:
    """``recovery``: the attention share a structure must recover (T); ``frequent_ratio`` /
    ``local_ratio``: heavy hitters / local window as fractions of the tokens seen."""

    recovery: float = attrs.field(default=0.85, validator=_unit)
    frequent_ratio: float = attrs.field(default=0.3, validator=_unit)
    local_ratio: float = attrs.field(default=0.3, validator=_unit)


class FastGenScorer(ComponentBase):
    """Profiles each head on its first eviction pass, then scores members of the head's structure by
    priority (special 4, punctuation 3, frequent 2, local 1, other 0, + accumulated attention
    share / 2) and everything else −1."""

    name = "fastgen"
    Config = FastGenConfig
    input_width = FeatureWidth.at_least(3)

    def structure_masks(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        """``[5, batch, kv_heads, tokens]`` bool: the tokens each structure (`STRUCTURES`) keeps."""
        special, punctuation, accumulated = features[..., 0] > 0.5, features[..., 1] > 0.5, features[..., 2]
        tokens = accumulated.shape[-1]
        n_frequent = min(tokens, math.ceil(self.config.frequent_ratio * view.seen))
        frequent = torch.zeros_like(special)
        if n_frequent:
            ranked = accumulated.masked_fill(view.positions < 0, float("-inf"))  # padded slots rank last
            frequent.scatter_(-1, ranked.topk(n_frequent, dim=-1).indices, True)
        local = view.positions >= view.seen - math.ceil(self.config.local_ratio * view.seen)
        first = special
        second = first | punctuation
        third = second | frequent
        fourth = third | local
        return torch.stack([first, second, third, fourth, torch.ones_like(special)])

    def profile(self, masks: torch.Tensor, accumulated: torch.Tensor) -> torch.Tensor:
        """``[batch, kv_heads]`` index of the cheapest structure recovering ``recovery``."""
        total = accumulated.sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
        recovered = (masks.float() * accumulated).sum(-1) / total  # [5, batch, kv_heads]
        enough = recovered >= self.config.recovery - 1e-6
        enough[-1] = True
        return enough.float().argmax(dim=0)  # first structure that is enough

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        if features.shape[-1] < 3:
            raise ShapeError(
                f"scorer 'fastgen' reads 3 features (special, punctuation, accumulated attention), got {features.shape[-1]}"
            )
        batch, kv_heads, tokens = features.shape[:3]
        masks = self.structure_masks(features, view)
        accumulated = features[..., 2].float()
        stored = view.state.get(PROFILE_KEY)
        if stored is None:
            profile = self.profile(masks, accumulated)
        else:
            if tuple(stored.shape[:2]) != (batch, kv_heads) or stored.shape[2] < 1:
                raise ShapeError(
                    f"state {PROFILE_KEY!r} has shape {tuple(stored.shape)}; expected [batch={batch}, "
                    f"kv_heads={kv_heads}, tokens]"
                )
            profile = stored[:, :, 0].long()
        view.state[PROFILE_KEY] = profile.to(torch.int8).unsqueeze(-1).expand(batch, kv_heads, tokens).contiguous()
        member = masks.gather(0, profile.view(1, batch, kv_heads, 1).expand(1, batch, kv_heads, tokens))[0]
        member &= view.positions >= 0  # padded slots of a ragged cache are never members
        tier = torch.zeros_like(accumulated)
        for value, mask in ((1.0, masks[3]), (2.0, masks[2]), (3.0, masks[1]), (4.0, masks[0])):
            tier = torch.where(mask, torch.full_like(tier, value), tier)
        share = accumulated / accumulated.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(member, tier + 0.5 * share, torch.full_like(tier, -1.0))


@attrs.frozen
class HeadThresholdConfig:
    """``threshold``: per head, tokens scoring at or above it are kept."""

    threshold: float = 0.0


class HeadThresholdSelector(ComponentBase):
    """Each head keeps its own tokens scoring ≥ ``threshold`` (plus protected ones), capped by
    the budget per head; heads keep different counts, padded with ``valid`` marking real slots."""

    name = "head_threshold"
    Config = HeadThresholdConfig
    needs_budget = True

    def select(self, scores: torch.Tensor, protected: torch.Tensor, budget: Budget, view: LayerView) -> Selection:
        tokens = scores.shape[-1]
        capacity = budget.capacity(view.seen)
        if capacity is None:
            raise InvalidBudgetError(
                "selector 'head_threshold' needs a budget; Budget(ratio=1.0) lets each head keep its whole structure"
            )
        real = view.positions >= 0  # padded slots of a ragged cache carry a negative position
        wanted = ((scores >= self.config.threshold) | protected) & real
        must = (protected & real).sum(-1)
        cap = torch.clamp(must, min=min(capacity, tokens))
        counts = torch.minimum(wanted.sum(-1), cap)  # [batch, kv_heads]
        kept = int(counts.max())
        if kept == tokens and bool((counts == tokens).all()):  # every head keeps everything: no ranking
            return Selection(torch.arange(tokens, device=scores.device).expand(scores.shape).clone())
        keyed = rank_protected_first(scores, protected & real).masked_fill(~wanted, float("-inf"))
        top = keyed.topk(kept, dim=-1).indices
        valid = torch.arange(kept, device=scores.device) < counts.unsqueeze(-1)
        return sorted_selection(top, None if bool(valid.all()) else valid)


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("token_class", TokenClassExtractor)


@hookimpl
def kvpolicy_register_scorers(register) -> None:
    register("fastgen", FastGenScorer)


@hookimpl
def kvpolicy_register_selectors(register) -> None:
    register("head_threshold", HeadThresholdSelector)


@hookimpl
def kvpolicy_register_presets(register) -> None:
    register(
        "fastgen",
        PolicyConfig(
            extractor=ComponentRef("token_class"),
            scorer=ComponentRef("fastgen", {"recovery": 0.85, "frequent_ratio": 0.3, "local_ratio": 0.3}),
            selector=ComponentRef("head_threshold"),
            schedule=Schedule("every_n", every=16),
            protect=Protection(),
            budget=Budget(ratio=1.0),
        ),
        description="FastGen: per-head structure profiled on the prompt, cheapest recovering T (Ge et al. 2024)",
    )
