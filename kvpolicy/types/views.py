"""Run-time state handed to components: the `LayerView` of one layer's cache, the `Selection` a
selector returns, per-token state padding (`extend_tokens`) and the measured `CacheReport`."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from kvpolicy.errors import ShapeError
from kvpolicy.types.configs import config_to_dict

#: optional `LayerView` fields: their shape, and the `Requirements` setting that fills them
_VIEW_FIELDS: dict[str, tuple[str, str]] = {
    "keys": ("[batch, kv_heads, tokens, head_dim]", "keys=True"),
    "attention": ("[batch, kv_heads, queries, tokens]", "attention_window > 0"),
    "query_positions": ("[queries]", "attention_window > 0"),
    "accumulated_attention": ("[batch, kv_heads, tokens]", "accumulated_attention=True"),
    "token_ids": ("[batch, kv_heads, tokens]", "token_ids=True"),
    "reconstruction_attention": ("[batch, kv_heads, tokens]", "reconstruction=True"),
}


@attrs.define(eq=False)
class LayerView:
    """What the policy sees of one layer's cache at an eviction pass (built by the integration).

    Attributes
    ----------
    layer, num_layers:
        Index of this layer and the model's layer count.
    positions:
        ``[batch, kv_heads, tokens]`` int64 absolute position of every cached token, ascending.
    seen:
        Tokens that have entered this layer so far (newest absolute position + 1).
    keys:
        ``[batch, kv_heads, tokens, head_dim]`` when a component asked for keys.
    attention:
        ``[batch, kv_heads, queries, tokens]`` float32 attention rows of the newest queries since
        the last eviction pass (oldest first), GQA-averaged; tokens that did not exist for a query have 0.
    query_positions:
        ``[queries]`` absolute positions of those queries.
    accumulated_attention:
        ``[batch, kv_heads, tokens]`` attention each token received, summed over all queries.
    token_ids:
        ``[batch, kv_heads, tokens]`` int64 token id of every cached token.
    reconstruction_attention:
        ``[batch, kv_heads, tokens]`` float32: the most attention each token received from any
        query (of any head of its GQA group) while the model repeated the cached context (KVzip).
    state:
        Per-token state owned by components, each tensor ``[batch, kv_heads, tokens', ...]`` with
        ``tokens'`` the token count after the previous eviction pass (new tokens are appended by the
        component that owns the state; see `extend_tokens`). The integration gathers every
        entry together with the keys on eviction, so nothing stays misaligned.
    """

    layer: int
    num_layers: int
    positions: torch.Tensor
    seen: int
    keys: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    accumulated_attention: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    reconstruction_attention: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = attrs.field(factory=dict)

    def require(self, *fields: str, by: str) -> None:
        """Raise a `ShapeError` naming every one of ``fields`` that is None: the integration only
        computes what a component's `Requirements` ask for, so a missing field is a component
        that asked for less than it reads (or a hand-built view), never a model problem."""
        missing = [name for name in fields if getattr(self, name) is None]
        if missing:
            wanted = " and ".join(f"view.{name} {_VIEW_FIELDS[name][0]}" for name in missing)
            asks = ", ".join(dict.fromkeys(_VIEW_FIELDS[name][1] for name in missing))
            raise ShapeError(
                f"{by} needs {wanted}; the integration provided none (it computes them when the "
                f"component's Requirements ask: {asks})"
            )

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.positions.shape[1]

    @property
    def tokens(self) -> int:
        return self.positions.shape[2]


#: `LayerView` fields holding a tensor ``[batch, ...]``, which `stack_views` concatenates
STACKED_FIELDS = ("positions", *(name for name in _VIEW_FIELDS if name != "query_positions"))


def stack_views(views: list[LayerView]) -> LayerView:
    """One view holding the rows of several layers' ``views``, layer after layer along the batch
    (the same shapes; the first view's layer index, step and queries): what a component that
    plans layers together (`Capabilities.plans_layers_together`) is given."""
    first = views[0]
    stacked = LayerView(
        layer=first.layer,
        num_layers=first.num_layers,
        positions=torch.cat([view.positions for view in views]),
        seen=first.seen,
        query_positions=first.query_positions,
        state={name: torch.cat([view.state[name] for view in views]) for name in first.state},
    )
    for name in STACKED_FIELDS[1:]:
        if getattr(first, name) is not None:
            setattr(stacked, name, torch.cat([getattr(view, name) for view in views]))
    return stacked


def extend_tokens(tensor: torch.Tensor, tokens: int, fill: float = 0.0) -> torch.Tensor:
    """Pad per-token state ``[batch, kv_heads, tokens', ...]`` with ``fill`` up to ``tokens``."""
    missing = tokens - tensor.shape[2]
    if missing < 0:
        raise ShapeError(f"per-token state has {tensor.shape[2]} tokens, more than the cache's {tokens}")
    if missing == 0:
        return tensor
    pad = tensor.new_full((*tensor.shape[:2], missing, *tensor.shape[3:]), fill)
    return torch.cat([tensor, pad], dim=2)


@attrs.define(eq=False)
class Selection:
    """Which tokens a layer keeps: ``indices [batch, kv_heads, kept]`` into the current tokens,
    ascending per head. ``valid`` (same shape, bool) marks padding slots when heads keep different
    counts; padded slots are masked out of attention and count as evicted."""

    indices: torch.Tensor
    valid: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        return self.indices.shape[-1]


@attrs.frozen
class CacheReport:
    """What a policy did to a model's cache, measured (not estimated) by the integration.

    ``kept[layer][head]`` is the number of tokens that head keeps (mean over the batch);
    ``kept_fraction`` is kept ÷ seen averaged over every layer and KV head, evicting or not;
    bytes count keys and values as stored (dtype included) against a full cache of ``seen``
    tokens. In a left-padded batch, ``seen`` is the longest row, ``row_tokens`` each row's own
    tokens (empty when all rows agree), fractions are taken over their mean, the full cache holds
    exactly them, and ``padding_bytes`` (part of ``kv_bytes``) are stored slots holding no token. ``evicting_layers`` are the layers the policy manages; ``notes`` says why any
    other layer was left alone (e.g. sliding-window layers that trim themselves).
    """

    seen: int
    kept: tuple[tuple[float, ...], ...]
    kv_bytes: int
    full_kv_bytes: int
    policy_seconds: float
    eviction_passes: int
    evicting_layers: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()
    row_tokens: tuple[int, ...] = ()
    padding_bytes: int = 0

    @property
    def tokens_per_row(self) -> float:
        """Mean tokens seen per batch row (padding excluded)."""
        return sum(self.row_tokens) / len(self.row_tokens) if self.row_tokens else float(self.seen)

    @property
    def per_layer_fraction(self) -> tuple[float, ...]:
        tokens = self.tokens_per_row
        return tuple(sum(h) / len(h) / tokens if tokens and h else 1.0 for h in self.kept)

    @property
    def kept_fraction(self) -> float:
        layers = self.per_layer_fraction
        return sum(layers) / len(layers) if layers else 1.0

    @property
    def bytes_saved(self) -> int:
        return self.full_kv_bytes - self.kv_bytes

    def to_dict(self) -> dict[str, Any]:
        data = config_to_dict(self)
        data.update(
            kept_fraction=self.kept_fraction,
            per_layer_fraction=list(self.per_layer_fraction),
            bytes_saved=self.bytes_saved,
        )
        return data

    def summary(self) -> str:
        mib = 1024 * 1024
        seen = f"{self.seen}" if not self.row_tokens else f"{min(self.row_tokens)}..{max(self.row_tokens)} per row"
        padding = f", {self.padding_bytes / mib:.2f} MiB of it padding" if self.padding_bytes else ""
        return (
            f"tokens seen {seen}; cache kept {self.kept_fraction:.1%} "
            f"({self.kv_bytes / mib:.2f} MiB{padding} of {self.full_kv_bytes / mib:.2f} MiB, "
            f"{self.bytes_saved / mib:.2f} MiB saved); {self.eviction_passes} eviction pass{'es' if self.eviction_passes != 1 else ''}, "
            f"{self.policy_seconds * 1000:.1f} ms in the policy"
        )
