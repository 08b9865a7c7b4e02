"""The ``stft`` and ``stft_votes`` extractors: NAMM's attention-spectrogram features.

Cetin et al., "An Evolved Universal Transformer Memory" (arXiv 2410.13166), section 3: every cached
token is described by how the attention it receives oscillates over the newest queries. Per token
and KV head, at each eviction pass:

1. its attention series over the queries since the last pass, preceded by the last ``n_fft - hop``
   values of the previous pass (left context, zeros for a new token), is cut into frames of
   ``n_fft`` (hop ``hop``, periodic Hann window, no centring) aligned so the last frame ends at the
   newest query; the magnitudes give ``n_fft // 2 + 1`` bins per frame (the math:
   `kvpolicy_plugins.spectrogram`);
2. the frames are folded into an exponential moving average: frame ``f`` of ``F`` weighs
   ``(1 - a) a^(F-1-f)`` with ``a = γ^hop`` and counts only if the token existed at the frame's
   last query; the previous average is decayed by ``γ^(queries since it was last updated)``;
3. each bin is z-scored with statistics collected once by a calibration pass (the no-eviction
   policy running with `calibrating` set) and then frozen; they are saved with the policy;
4. an 8-d sinusoidal embedding of recency (newest position − position, frequencies
   ``max_freq^(−k / (dims/2))``) is prepended.

With the defaults (n_fft 32, hop 16, γ 0.99, 8-d recency, a pass every 512 queries) that is 25
features, as in the paper. The moving average and the left context live in the layer's per-token
state (``view.state``), which the integration gathers with the keys on eviction; two consecutive
passes over whole hops give exactly the features of one pass over the joined series.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch

from kvpolicy import hookimpl
from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.selection import MAX_KERNEL, padding_mask, pool_neighbours
from kvpolicy.types import BufferedComponent, LayerView, Requirements, extend_tokens, positive
from kvpolicy_plugins import spectrogram

EMA_KEY = "stft.ema"
CONTEXT_KEY = "stft.context"
CLOCK_KEY = "stft.clock"


#: sizes past which a config cannot be meant (an n_fft of 2**16 needs a 2**32-element DFT basis)
MAX_N_FFT = 4096
MAX_PERIOD = 2**20
MAX_RECENCY_DIMS = 1024


@attrs.frozen
class StftConfig:
    """Spectrogram, moving-average, normalisation and recency settings (paper values by default).

    ``period``: how many of the newest queries' attention rows the forward pass keeps for it: the
    queries between two eviction passes (NAMM: 512, its schedule's ``every``). ``gamma``: EMA
    coefficient per query. ``recency_dims``: size of the recency embedding (even;
    0 drops it). ``normalize``: z-score bins with the calibrated statistics.
    """

    n_fft: int = attrs.field(default=32, validator=positive)
    hop: int = attrs.field(default=16, validator=positive)
    gamma: float = 0.99
    period: int = attrs.field(default=512, validator=positive)
    recency_dims: int = 8
    recency_max_freq: float = attrs.field(default=50000.0, validator=positive)
    normalize: bool = True
    eps: float = attrs.field(default=1e-6, validator=positive)

    def __attrs_post_init__(self) -> None:
        if self.hop > self.n_fft:
            raise InvalidConfigError(f"StftConfig.hop ({self.hop}) must not exceed n_fft ({self.n_fft})")
        if not 0.0 < self.gamma <= 1.0:
            raise InvalidConfigError(f"StftConfig.gamma must be in (0, 1], got {self.gamma}")
        if self.recency_dims < 0 or self.recency_dims % 2:
            raise InvalidConfigError(f"StftConfig.recency_dims must be even and >= 0, got {self.recency_dims}")
        for name, limit in (("n_fft", MAX_N_FFT), ("period", MAX_PERIOD), ("recency_dims", MAX_RECENCY_DIMS)):
            if getattr(self, name) > limit:  # the DFT basis is n_fft², the features recency_dims wide per token
                raise InvalidConfigError(f"StftConfig.{name} must be at most {limit}, got {getattr(self, name)}")
        if self.period < self.n_fft - self.hop:
            raise InvalidConfigError(
                f"StftConfig.period ({self.period}) must cover at least n_fft - hop = {self.n_fft - self.hop} queries"
            )

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def context(self) -> int:
        return self.n_fft - self.hop

    @property
    def num_features(self) -> int:
        return self.recency_dims + self.bins


def recency_embedding(recency: torch.Tensor, dims: int, max_freq: float) -> torch.Tensor:
    """``[..., dims]``: sin then cos of ``recency · max_freq^(−k / (dims/2))`` for k < dims/2."""
    half = dims // 2
    freqs = max_freq ** (-torch.arange(half, dtype=torch.float32, device=recency.device) / half)
    angles = recency.to(torch.float32).unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class StftExtractor(BufferedComponent):
    """NAMM attention spectrogram + recency (Cetin et al. 2024): 25 features per token by default.

    `Stateful`: the per-bin normalisation statistics (``mean``, ``var``, ``count``) are saved with
    the policy. Set ``calibrating = True`` (or call `start_calibration`) while the zero policy runs
    to collect them, then `freeze`. Until calibrated, bins pass through un-normalised.
    """

    name = "stft"
    Config = StftConfig

    def setup(self) -> None:
        super().setup()
        self.calibrating = False

    def initial_buffers(self) -> dict[str, torch.Tensor]:
        """Per-bin normalisation statistics: ``mean``, ``var`` and the ``count`` of values seen."""
        bins = self.config.bins
        return {
            "mean": torch.zeros(bins, dtype=torch.float64),
            "var": torch.ones(bins, dtype=torch.float64),
            "count": torch.zeros(1, dtype=torch.float64),
        }

    @property
    def requirements(self) -> Requirements:
        return Requirements(attention_window=self.config.period)

    @property
    def num_features(self) -> int:
        return self.config.num_features

    # ----------------------------------------------------------------- calibration (Stateful)

    @property
    def calibrated(self) -> bool:
        return bool(self.buffers["count"].item() > 0)

    def start_calibration(self) -> None:
        """Forget any statistics and collect new ones on every following `extract`."""
        self.buffers = self.initial_buffers()
        self.calibrating = True

    def freeze(self) -> None:
        """Stop collecting; the statistics gathered so far are used from now on."""
        self.calibrating = False

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.calibrating = False

    def _accumulate(self, values: torch.Tensor) -> None:
        """Merge per-bin mean / variance of ``values [..., bins]`` into the running statistics (Chan et al.)."""
        flat = values.detach().reshape(-1, values.shape[-1]).to(torch.float64).cpu()
        n_b = flat.shape[0]
        if n_b == 0:
            return
        mean_b = flat.mean(0)
        var_b = flat.var(0, unbiased=False)
        mean, var, count = self.buffers["mean"], self.buffers["var"], self.buffers["count"]
        n_a = count.item()
        total = n_a + n_b
        delta = mean_b - mean
        if n_a == 0:
            mean, var = mean_b, var_b
        else:
            mean = mean + delta * (n_b / total)
            var = (var * n_a + var_b * n_b + delta.square() * (n_a * n_b / total)) / total
        self.buffers = {"mean": mean, "var": var, "count": count.fill_(total)}

    # ----------------------------------------------------------------- features

    def extract(self, view: LayerView) -> torch.Tensor:
        cfg = self.config
        view.require("attention", "query_positions", by="the stft extractor")
        batch, heads, tokens = view.positions.shape
        attention = view.attention.to(torch.float32)
        if attention.dim() != 4 or tuple(attention.shape[:2]) != (batch, heads) or attention.shape[3] != tokens:
            raise ShapeError(
                f"view.attention has shape {tuple(attention.shape)}; expected [batch={batch}, kv_heads={heads}, "
                f"queries, tokens={tokens}]"
            )
        queries = attention.shape[2]
        query_positions = view.query_positions.to(device=attention.device, dtype=torch.int64)
        if query_positions.shape != (queries,):
            raise ShapeError(f"view.query_positions has shape {tuple(query_positions.shape)}; expected [{queries}]")
        positions = view.positions.to(attention.device)

        ema = extend_tokens(self._state(view, EMA_KEY, (cfg.bins,), torch.float32), tokens)
        context = extend_tokens(self._state(view, CONTEXT_KEY, (cfg.context,), torch.float32), tokens)
        clock = extend_tokens(self._state(view, CLOCK_KEY, (), torch.int64), tokens, fill=-1)

        if queries > 0:
            newest = int(query_positions[-1])
            # The left context only continues this series if the previous pass ended right before it.
            adjacent = (clock == int(query_positions[0]) - 1).to(torch.float32)
            head = context * adjacent.unsqueeze(-1)  # [batch, kv_heads, tokens, context]: series before these queries
            frames = spectrogram.frame_count(cfg.context + queries, cfg.n_fft, cfg.hop)
            ends = query_positions[queries - 1 - cfg.hop * torch.arange(frames - 1, -1, -1, device=attention.device)]
            a = cfg.gamma**cfg.hop
            weights = (1 - a) * a ** torch.arange(frames - 1, -1, -1, dtype=torch.float32, device=attention.device)
            exists = positions.unsqueeze(2) <= ends.view(1, 1, frames, 1)  # [batch, kv_heads, frames, tokens]
            weights = exists.to(torch.float32) * weights.view(1, 1, frames, 1)
            folded = spectrogram.folded(attention, weights, cfg.n_fft, cfg.hop, head)
            elapsed = (newest - clock).clamp_min(0).to(torch.float32)
            decay = torch.where(clock >= 0, cfg.gamma**elapsed, torch.zeros_like(elapsed))
            ema = ema * decay.unsqueeze(-1) + folded
            if cfg.context > queries:
                context = torch.cat([head, attention.transpose(2, 3)], dim=3)[..., -cfg.context :]
            elif cfg.context:
                context = attention[:, :, queries - cfg.context :, :].transpose(2, 3)
            clock = torch.full_like(clock, newest)

        view.state[EMA_KEY] = ema
        view.state[CONTEXT_KEY] = context.contiguous()
        view.state[CLOCK_KEY] = clock

        if self.calibrating:
            self._accumulate(ema)
        spectral = ema
        if cfg.normalize and (self.calibrated or self.calibrating):
            mean = self.buffers["mean"].to(device=ema.device, dtype=torch.float32)
            std = self.buffers["var"].sqrt().clamp_min(cfg.eps).to(device=ema.device, dtype=torch.float32)
            spectral = (ema - mean) / std
        if not cfg.recency_dims:
            return spectral
        recency = recency_embedding(view.seen - 1 - positions, cfg.recency_dims, cfg.recency_max_freq)
        return torch.cat([recency, spectral], dim=-1)

    @staticmethod
    def _state(view: LayerView, key: str, trailing: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The stored per-token state ``key`` (empty on a layer's first eviction pass), shape-checked."""
        batch, heads = view.positions.shape[:2]
        device = view.attention.device if view.attention is not None else view.positions.device
        stored = view.state.get(key)
        if stored is None:
            return torch.zeros((batch, heads, 0, *trailing), dtype=dtype, device=device)
        if tuple(stored.shape[:2]) != (batch, heads) or tuple(stored.shape[3:]) != trailing:
            raise ShapeError(
                f"per-token state {key!r} has shape {tuple(stored.shape)}; expected "
                f"[batch={batch}, kv_heads={heads}, tokens, {', '.join(map(str, trailing)) or '-'}]"
            )
        return stored.to(device=device, dtype=dtype)


def check_kernels(field: str, value: tuple[int, ...]) -> None:
    """Span widths to max-pool a per-token feature over: odd (centred on the token), at least 3
    and at most `MAX_KERNEL` cached tokens; anything else is a config error naming ``field``."""
    for kernel in value:
        if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 3 or kernel % 2 == 0:
            raise InvalidConfigError(f"{field} must be odd integers >= 3 (span widths in cached tokens); got {value!r}")
        if kernel > MAX_KERNEL:
            raise InvalidConfigError(f"{field} must be at most {MAX_KERNEL} tokens wide; got {value!r}")


def max_pooled_columns(values: torch.Tensor, kernels: tuple[int, ...], positions: torch.Tensor) -> list[torch.Tensor]:
    """``values [batch, kv_heads, tokens]`` max-pooled over each width of ``kernels``, one
    ``[..., tokens, 1]`` feature column each (neighbours in cached order, as
    `kvpolicy.selection.pool_neighbours` defines them; padded slots hold 0, a finite value the
    selector never reads)."""
    if not kernels:
        return []
    mask = padding_mask(positions)
    columns = []
    for kernel in kernels:
        pooled = pool_neighbours(values, kernel, "max", mask)
        if mask is not None:
            pooled = pooled.masked_fill(mask, 0.0)
        columns.append(pooled.unsqueeze(-1))
    return columns


@attrs.frozen
class StftVotesConfig(StftConfig):
    """`StftConfig` plus ``votes_window``: how many of the newest queries vote (SnapKV's
    observation window), ``votes_eps``, added before the logarithm, and ``votes_kernels``: odd
    span widths over which the log votes are also max-pooled, one extra feature each (so a
    scorer can weigh spans of several widths instead of one fixed span pooling)."""

    votes_window: int = attrs.field(default=32, validator=positive)
    votes_eps: float = attrs.field(default=1e-6, validator=positive)
    votes_kernels: tuple[int, ...] = attrs.field(default=(), converter=tuple)

    @votes_kernels.validator
    def _check_kernels(self, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
        check_kernels(attribute.name, value)

    @property
    def num_features(self) -> int:
        return self.recency_dims + self.bins + 1 + len(self.votes_kernels)


class StftVotesExtractor(StftExtractor):
    """NAMM's spectrogram features plus one more: ``log(votes + eps)``, the attention each token
    received from the ``votes_window`` newest queries (SnapKV's signal), last.

    Why: NAMM's 512-query EMA mostly sees the context, not the question at the end of a prompt,
    so a scorer over the spectrogram alone cannot tell what will be asked. The newest queries'
    votes carry that, and a linear scorer whose only weight is on this feature ranks tokens
    exactly as SnapKV's votes do: a strong, known starting point for evolution. 26 features by
    default; with ``votes_kernels`` the log votes max-pooled over each width follow (neighbours in
    cached order, as `kvpolicy.selection.pool_neighbours` defines them), so a one-hot scorer on
    the width-31 feature ranks tokens exactly as the raw votes with ``span=31`` do.
    """

    name = "stft_votes"
    Config = StftVotesConfig

    def extract(self, view: LayerView) -> torch.Tensor:
        spectral = super().extract(view)
        window = view.attention[:, :, -self.config.votes_window :, :].to(torch.float32)
        votes = torch.log(window.sum(dim=2) + self.config.votes_eps).to(spectral.device)
        pooled = max_pooled_columns(votes, self.config.votes_kernels, view.positions)
        return torch.cat([spectral, votes.unsqueeze(-1), *pooled], dim=-1)


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("stft", StftExtractor, description="NAMM attention spectrogram (STFT + EMA) with recency, 25 features")
    register(
        "stft_votes",
        StftVotesExtractor,
        description="NAMM spectrogram + log votes of the newest 32 queries (SnapKV's signal), 26 features",
    )
