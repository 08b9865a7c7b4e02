"""The ``bam`` scorer: NAMM's backward attention memory (Cetin et al., "An Evolved Universal
Transformer Memory", arXiv 2410.13166, section 3.2).

One single-head self-attention layer over a head's cached tokens with a *counter-causal* mask —
token *i* attends to itself and to newer tokens only, so a token is judged by what came after it
and an older token can never change a newer one's score — then a gated residual and a linear read
out::

    q, k, v = x W_qkv + b_qkv                      x: [batch, kv_heads, tokens, features]
    o       = softmax(q kᵀ / √hidden + counter-causal mask) v  W_o + b_o
    r, m    = o[..., :features], o[..., features:]
    score   = (x · (1 + m) + r) w_s + b_s

With 25 features and hidden 32 that is 2,496 + 1,650 + 26 = 4,172 parameters, one set shared by
every layer and head, zero at first (⇒ every score 0 ⇒ ``threshold`` evicts nothing). Flat layout:
``w_qkv [features, 3·hidden]``, ``b_qkv``, ``w_o [hidden, 2·features]``, ``b_o``, ``w_s
[features]``, ``b_s``. A population ``[batch, 4172]`` scores batch row *i* with row *i*.

Tokens are ordered newest first by position, which turns the counter-causal mask into an ordinary
causal one, so the fused causal kernel of ``scaled_dot_product_attention`` does the work.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from kvpolicy import hookimpl
from kvpolicy.parameters import ParametricComponent, check_features
from kvpolicy.types import FeatureWidth, LayerView, positive


@attrs.frozen
class BamConfig:
    """``features``: inputs per token (25 for ``stft``); ``hidden``: width of q, k and v."""

    features: int = attrs.field(default=25, validator=positive)
    hidden: int = attrs.field(default=32, validator=positive)


class BamScorer(ParametricComponent):
    """NAMM's BAM: counter-causal single-head attention + gated residual + linear score."""

    name = "bam"
    Config = BamConfig

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        f, h = self.config.features, self.config.hidden
        return {"w_qkv": (f, 3 * h), "b_qkv": (3 * h,), "w_o": (h, 2 * f), "b_o": (2 * f,), "w_s": (f,), "b_s": (1,)}

    @property
    def input_width(self) -> FeatureWidth:
        return FeatureWidth.exactly(self.config.features)

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor:
        f, h = self.config.features, self.config.hidden
        check_features(self.label, features, f)
        x = features.float()
        batch = x.shape[0]
        p = self.params.unpack(batch, x.device, x.dtype)
        if not (bool(p["w_o"].any()) or bool(p["b_o"].any())):
            # The attention's output is multiplied by zeros: the score is the linear read-out of
            # the features alone (exactly; e.g. a first evolution stage searching only w_s).
            return torch.einsum("bhtf,bf->bht", x, p["w_s"].expand(batch, -1)) + p["b_s"].view(-1, 1, 1)
        # newest first: "attend to self and newer" becomes "attend to self and earlier" (causal)
        order = view.positions.to(x.device).argsort(dim=-1, descending=True, stable=True)
        x = x.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, f))
        qkv = torch.einsum("bhtf,bfo->bhto", x, p["w_qkv"].expand(batch, -1, -1)) + p["b_qkv"][:, None, None]
        q, k, v = qkv.split(h, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = torch.einsum("bhtd,bdo->bhto", attended, p["w_o"].expand(batch, -1, -1)) + p["b_o"][:, None, None]
        residual, gate = out.split(f, dim=-1)
        y = x * (1 + gate) + residual
        scores_sorted = torch.einsum("bhtf,bf->bht", y, p["w_s"].expand(batch, -1)) + p["b_s"].view(-1, 1, 1)
        return torch.empty_like(scores_sorted).scatter_(2, order, scores_sorted)


@hookimpl
def kvpolicy_register_scorers(register) -> None:
    register("bam", BamScorer, description="NAMM backward attention memory: counter-causal attention, 4,172 params")
