"""The component contract: the kinds, what a component needs from the forward pass
(`Requirements`), the protocol of each kind, the optional capabilities a component declares
(`Capabilities`, `Calibrated`, `DeclaresFeatures` / `ReadsFeatures`, `Parametric`, `Stateful`,
`TokenizerAware`) and the model adapter a ``kvpolicy_model_adapter`` hook returns."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import attrs
import torch

from kvpolicy.types.configs import _non_negative, _non_negative_int, _positive_int
from kvpolicy.types.policy_config import Budget
from kvpolicy.types.views import LayerView, Selection

ComponentKind = Literal["extractor", "scorer", "pooler", "selector", "optimizer"]
COMPONENT_KINDS: tuple[ComponentKind, ...] = ("extractor", "scorer", "pooler", "selector", "optimizer")


@attrs.frozen
class Requirements:
    """What a component needs the forward pass to compute, so the integration computes no more.

    Attributes
    ----------
    keys:
        The cached keys themselves (`LayerView.keys`).
    attention_window:
        Attention rows (post-softmax, averaged over each GQA group) of up to this many of the
        newest queries since the last eviction pass, in `LayerView.attention`. 0 = none.
    accumulated_attention:
        For every cached token, the attention it received summed over all queries so far
        (H2O), in `LayerView.accumulated_attention`.
    token_ids:
        The token id of every cached token (FastGen's special / punctuation classes).
    reconstruction:
        For every cached token, the most attention it received while the model *repeated the
        cached context* (KVzip), in `LayerView.reconstruction_attention`. Before the policy's
        eviction pass the integration feeds a repeat prompt and the context again on a copy of
        the cache (a second prefill: its cost), so it needs ``token_ids`` too, a component saying
        how to repeat (`Reconstructing`) and schedule ``after_prefill`` (the context must be whole).
    """

    keys: bool = False
    attention_window: int = attrs.field(default=0, validator=_non_negative)
    accumulated_attention: bool = False
    token_ids: bool = False
    reconstruction: bool = False

    def __or__(self, other: Requirements) -> Requirements:
        return Requirements(
            keys=self.keys or other.keys,
            attention_window=max(self.attention_window, other.attention_window),
            accumulated_attention=self.accumulated_attention or other.accumulated_attention,
            token_ids=self.token_ids or other.token_ids,
            reconstruction=self.reconstruction or other.reconstruction,
        )

    @property
    def needs_attention(self) -> bool:
        return self.attention_window > 0 or self.accumulated_attention


@runtime_checkable
class Component(Protocol):
    """What every component has: a name, a frozen config and declared requirements."""

    name: ClassVar[str]
    config: Any

    @property
    def requirements(self) -> Requirements: ...


@runtime_checkable
class FeatureExtractor(Component, Protocol):
    """Turns a layer's cache into per-token features ``[batch, kv_heads, tokens, features]``."""

    def extract(self, view: LayerView) -> torch.Tensor: ...


@runtime_checkable
class Scorer(Component, Protocol):
    """Scores every cached token from its features: ``[batch, kv_heads, tokens]``, higher = keep."""

    def score(self, features: torch.Tensor, view: LayerView) -> torch.Tensor: ...


@runtime_checkable
class Pooler(Component, Protocol):
    """Pools scores over neighbouring cached tokens between scorer and selector, so a policy can
    keep spans (a fact with its context) instead of scattered tokens.

    ``pool(scores, view)`` takes and returns ``[batch, kv_heads, tokens]``. Neighbours are
    neighbours in *cached order* (index along ``tokens``): after an eviction, adjacent cached
    tokens need not be adjacent in absolute position. Padded slots (``view.positions < 0``, heads
    keeping fewer tokens than the layer's longest) arrive as -inf and must stay -inf, neither
    lending nor receiving a score; real slots must not become NaN.
    """

    def pool(self, scores: torch.Tensor, view: LayerView) -> torch.Tensor: ...


@runtime_checkable
class Selector(Component, Protocol):
    """Chooses the tokens to keep from scores, never dropping ``protected`` ones."""

    def select(self, scores: torch.Tensor, protected: torch.Tensor, budget: Budget, view: LayerView) -> Selection: ...


@runtime_checkable
class Optimizer(Protocol):
    """A black-box minimiser mirroring pycma: ``ask`` / ``tell`` / ``stop`` / ``result``.

    Optimizers minimise a *loss*; whoever maximises a fitness negates it once, before `tell`.
    ``state_dict`` / ``load_state_dict`` make runs resumable.
    """

    name: ClassVar[str]
    config: Any

    def ask(self) -> torch.Tensor: ...

    def tell(self, solutions: torch.Tensor, losses: torch.Tensor) -> None: ...

    def stop(self) -> bool: ...

    @property
    def result(self) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Parametric(Protocol):
    """A component with learnable parameters exposed as one flat vector (for optimizers)."""

    @property
    def num_params(self) -> int: ...

    def get_flat(self) -> torch.Tensor: ...

    def set_flat(self, vector: torch.Tensor) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    """A component with frozen, non-learned buffers (e.g. calibrated normalisation statistics)
    that must be saved with it."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


@runtime_checkable
class TokenizerAware(Protocol):
    """A component whose config depends on the tokenizer the model runs with (e.g. FastGen's
    special / punctuation token classes). `Policy.bind_tokenizer` fills it in once; a config
    given explicitly is left alone."""

    def bind_tokenizer(self, tokenizer: Any) -> None: ...


@attrs.frozen
class RepeatPrompt:
    """How the cached context is repeated for `Requirements.reconstruction` (KVzip): chunks of
    ``chunk_size`` context tokens, each fed on top of the whole context as ``first`` (the first
    chunk) or ``later`` + the last ``overlap`` tokens of the chunk before, then ``suffix`` (e.g.
    the chat template's assistant opening), then the chunk's own tokens, teacher-forced."""

    first: tuple[int, ...] = attrs.field(converter=tuple)
    later: tuple[int, ...] = attrs.field(converter=tuple)
    suffix: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    chunk_size: int = attrs.field(default=2048, validator=_positive_int)
    overlap: int = attrs.field(default=8, validator=_non_negative_int)

    def chunks(self, context: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """``(start, stop, input_ids [batch, prompt + stop - start])`` of every chunk of
        ``context [batch, tokens]`` (token ids), in order."""
        out = []
        for start in range(0, context.shape[1], self.chunk_size):
            stop = min(start + self.chunk_size, context.shape[1])
            if start == 0:
                head = torch.tensor(self.first, dtype=torch.long, device=context.device).expand(context.shape[0], -1)
            else:
                later = torch.tensor(self.later, dtype=torch.long, device=context.device)
                tail = context[:, max(0, start - self.overlap) : start]
                head = torch.cat([later.expand(context.shape[0], -1), tail], 1)
            suffix = torch.tensor(self.suffix, dtype=torch.long, device=context.device).expand(context.shape[0], -1)
            out.append((start, stop, torch.cat([head, suffix, context[:, start:stop]], 1)))
        return out


@runtime_checkable
class Reconstructing(Protocol):
    """A component that reads `LayerView.reconstruction_attention` and says how the context is
    repeated (`RepeatPrompt`); it raises a `MissingTokenizerError` while it has no tokenizer
    (`Policy.bind_tokenizer`) to write the prompt with."""

    def repeat_prompt(self) -> RepeatPrompt: ...


@runtime_checkable
class Calibrated(Protocol):
    """An extractor with normalisation statistics collected while a policy runs and then frozen
    (NAMM's per-bin z-scores); `kvpolicy.calibrate` drives it. The statistics are its buffers."""

    def start_calibration(self) -> None: ...

    def freeze(self) -> None: ...


@runtime_checkable
class DeclaresFeatures(Protocol):
    """An extractor that declares ``num_features``, the width of the features it returns, so a
    policy can check that its scorer takes that width when it is built."""

    @property
    def num_features(self) -> int: ...


@attrs.frozen
class FeatureWidth:
    """The feature widths a scorer takes: at least ``minimum``, and exactly that when ``exact``."""

    minimum: int = attrs.field(validator=_non_negative_int)
    exact: bool = False

    @classmethod
    def exactly(cls, width: int) -> FeatureWidth:
        return cls(width, exact=True)

    @classmethod
    def at_least(cls, width: int) -> FeatureWidth:
        return cls(width)

    def admits(self, width: int) -> bool:
        return width == self.minimum if self.exact else width >= self.minimum

    def __str__(self) -> str:
        return f"{'exactly' if self.exact else 'at least'} {self.minimum}"


@runtime_checkable
class ReadsFeatures(Protocol):
    """A scorer that declares ``input_width``, the feature widths it takes (a `FeatureWidth`)."""

    @property
    def input_width(self) -> FeatureWidth: ...


@attrs.frozen
class Capabilities:
    """What a component may declare about itself, as class attributes of these names.

    A component that declares none of them gets these defaults (what every component was
    assumed to do before it could say otherwise), so a component written without them keeps
    working unchanged. `capabilities` reads them; nothing else does.

    Attributes
    ----------
    needs_budget:
        (selector) It sizes the cache from the policy's `Budget`; ``False``: it decides the size
        itself (NAMM's threshold) and takes no budget.
    keeps_highest_scores:
        (selector) It never evicts a token that scored higher than an unprotected survivor;
        ``False`` for one that also keeps tokens by another rule (H2O's recent window).
    requires_aligned_heads:
        Every KV head of a layer must keep the same tokens.
    plans_layers_together:
        Given the views of several layers stacked along the batch (the same tokens per head, no
        padding), it returns for each layer exactly what it returns for that layer's view
        alone: it reads neither ``view.layer`` nor ``view.num_layers`` and treats batch rows
        independently. When every component of a policy says so (and no population is loaded),
        the layers due at one step are planned in one pass instead of one per layer: a per-step
        policy (TOVA) then pays its fixed per-pass cost once per token, not once per layer.
    """

    needs_budget: bool = True
    keeps_highest_scores: bool = True
    requires_aligned_heads: bool = False
    plans_layers_together: bool = False


_DEFAULT_CAPABILITIES = Capabilities()


def capabilities(component: Any) -> Capabilities:
    """The `Capabilities` ``component`` declares, the defaults for those it does not."""
    return Capabilities(
        **{
            field.name: bool(getattr(component, field.name, getattr(_DEFAULT_CAPABILITIES, field.name)))
            for field in attrs.fields(Capabilities)
        }
    )


@runtime_checkable
class ModelAdapter(Protocol):
    """What a ``kvpolicy_model_adapter`` hook returns for a model it can drive: `Policy.attach`
    and `Policy.generate` call exactly these two."""

    def attach(self, policy: Any) -> AbstractContextManager[Any]: ...

    def generate(self, policy: Any, inputs: Any, **generate_kwargs: Any) -> Any: ...


PROTOCOLS: dict[ComponentKind, type] = {
    "extractor": FeatureExtractor,
    "scorer": Scorer,
    "pooler": Pooler,
    "selector": Selector,
    "optimizer": Optimizer,
}
