"""The ``stft`` extractor: NAMM's attention-spectrogram features.

Cetin et al., "An Evolved Universal Transformer Memory" (arXiv 2410.13166), section 3: every cached
token is described by how the attention it receives oscillates over the newest queries. Per token
and KV head, at each update:

1. its attention series over the queries since the last update, preceded by the last
   ``n_fft - hop`` values of the previous update (left context, zeros for a new token), is cut
   into frames of ``n_fft`` (hop ``hop``, periodic Hann window, no centring) aligned so the last
   frame ends at the newest query; the magnitudes give ``n_fft // 2 + 1`` bins per frame;
2. the frames are folded into an exponential moving average: frame ``f`` of ``F`` weighs
   ``(1 - a) a^(F-1-f)`` with ``a = γ^hop`` and counts only if the token existed at the frame's
   last query; the previous average is decayed by ``γ^(queries since it was last updated)``;
3. each bin is z-scored with statistics collected once by a calibration pass (the no-eviction
   policy running with `calibrating` set) and then frozen; they are saved with the policy;
4. an 8-d sinusoidal embedding of recency (newest position − position, frequencies
   ``max_freq^(−k / (dims/2))``) is prepended.

With the defaults (n_fft 32, hop 16, γ 0.99, 8-d recency, update every 512) that is 25 features,
as in the paper. The moving average and the left context live in the layer's per-token state
(``view.state``), which the integration gathers with the keys on eviction; two consecutive updates
of whole hops give exactly the features of one update over the joined series.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import attrs
import torch

from kvpolicy import hookimpl, native
from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.selection import MAX_KERNEL, padding_mask, pool_neighbours
from kvpolicy.types import LayerView, Requirements, extend_tokens, positive

EMA_KEY = "stft.ema"
CONTEXT_KEY = "stft.context"
CLOCK_KEY = "stft.clock"


#: sizes past which a config cannot be meant (an n_fft of 2**16 needs a 2**32-element DFT basis)
MAX_N_FFT = 4096
MAX_WINDOW = 2**20
MAX_RECENCY_DIMS = 1024


@attrs.frozen
class StftConfig:
    """Spectrogram, moving-average, normalisation and recency settings (paper values by default).

    ``window``: newest queries whose attention the forward pass must keep (the update period).
    ``gamma``: EMA coefficient per query. ``recency_dims``: size of the recency embedding (even;
    0 drops it). ``normalize``: z-score bins with the calibrated statistics.
    """

    n_fft: int = attrs.field(default=32, validator=positive)
    hop: int = attrs.field(default=16, validator=positive)
    gamma: float = 0.99
    window: int = attrs.field(default=512, validator=positive)
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
        for name, limit in (("n_fft", MAX_N_FFT), ("window", MAX_WINDOW), ("recency_dims", MAX_RECENCY_DIMS)):
            if getattr(self, name) > limit:  # the DFT basis is n_fft², the features recency_dims wide per token
                raise InvalidConfigError(f"StftConfig.{name} must be at most {limit}, got {getattr(self, name)}")
        if self.window < self.n_fft - self.hop:
            raise InvalidConfigError(
                f"StftConfig.window ({self.window}) must cover at least n_fft - hop = {self.n_fft - self.hop} queries"
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


def _dft_matrices(n_fft: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hann-windowed real / imaginary one-sided DFT bases ``[n_fft, bins]`` (torch.stft's sign)."""
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    n = torch.arange(n_fft, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64).unsqueeze(0)
    angle = 2 * math.pi * n * k / n_fft
    real = (window.unsqueeze(1) * torch.cos(angle)).to(torch.float32).to(device)
    imag = (-window.unsqueeze(1) * torch.sin(angle)).to(torch.float32).to(device)
    return real, imag


def folded_spectrogram(
    series: torch.Tensor,
    weights: torch.Tensor,
    basis: torch.Tensor,
    hop: int,
    tile: int,
    head: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[batch, kv_heads, tokens, bins]``: Σ_f ``weights[f, t]`` · |windowed DFT of frame f of
    token t's series|, the frames right-aligned as in `StftExtractor.spectrogram`.

    ``series [batch, kv_heads, length, tokens]``, ``weights [batch, kv_heads, frames, tokens]``,
    ``basis [n_fft, 2 * bins]`` (real columns, then imaginary). ``head [batch, kv_heads, tokens,
    h]`` (optional) holds values that come before ``series`` in every token's series (NAMM's left
    context, stored token-major), so the two are never concatenated. One tile of ``tile`` tokens
    at a time, so no ``[frames, bins, tokens]`` intermediate larger than a tile ever exists.
    """
    n_fft = basis.shape[0]
    if n_fft % hop == 0 and series.shape[2] % hop == 0 and (head is None or head.shape[3] % hop == 0):
        return _folded_by_blocks(series, weights, basis, hop, tile, head)
    if head is not None:
        series = torch.cat([head.transpose(2, 3), series], dim=2)
    return _folded_by_frames(series, weights, basis, hop, tile)


def _folded_by_frames(
    series: torch.Tensor, weights: torch.Tensor, basis: torch.Tensor, hop: int, tile: int
) -> torch.Tensor:
    """Any hop: a tile's frames are a strided view of the series, one matmul with the basis
    gives every frame's spectrum, and magnitudes are folded over frames at once."""
    batch, heads, length, tokens = series.shape
    frames = weights.shape[2]
    n_fft, bins = basis.shape[0], basis.shape[1] // 2
    out = series.new_empty((batch, heads, tokens, bins))
    if frames == 0:
        return out.zero_()
    series = series[:, :, length - (n_fft + (frames - 1) * hop) :, :]
    stride_b, stride_h, stride_q, stride_t = series.stride()
    rows = basis.T.contiguous()  # [2 * bins, n_fft]
    for start in range(0, tokens, tile):
        stop = min(start + tile, tokens)
        part = series[..., start:stop]
        windows = part.as_strided(
            (batch, heads, frames, n_fft, stop - start),
            (stride_b, stride_h, hop * stride_q, stride_q, stride_t),
            part.storage_offset(),
        )
        spectrum = torch.matmul(rows, windows).square_()  # [batch, heads, frames, 2 * bins, tile]
        magnitude = (spectrum[..., :bins, :] + spectrum[..., bins:, :]).sqrt_()
        out[:, :, start:stop] = torch.einsum("bhfnt,bhft->bhtn", magnitude, weights[..., start:stop])
    return out


def _folded_by_blocks(
    series: torch.Tensor,
    weights: torch.Tensor,
    basis: torch.Tensor,
    hop: int,
    tile: int,
    head: torch.Tensor | None,
) -> torch.Tensor:
    """``hop`` divides ``n_fft`` (NAMM's 32 / 16): a frame is ``n_fft / hop`` consecutive blocks
    of ``hop`` values, so each block is transformed once by every part of the basis (one matmul
    over the series as it lies, no frame copies) and a frame's spectrum is the sum of its
    blocks' parts. Measured about 20% faster than `_folded_by_frames` for NAMM's shapes."""
    batch, heads, length, tokens = series.shape
    frames = weights.shape[2]
    n_fft, bins = basis.shape[0], basis.shape[1] // 2
    parts = n_fft // hop
    out = series.new_empty((batch, heads, bins, tokens))
    needed = frames + parts - 1  # blocks the frames cover, the newest last
    body_blocks = min(needed, length // hop)
    head_blocks = needed - body_blocks
    if frames == 0:
        return out.zero_().transpose(2, 3)
    if head_blocks > (0 if head is None else head.shape[3] // hop):
        raise ShapeError(f"the series holds {length} values (+ head); {frames} frames need {needed * hop}")
    # [parts * 2 * bins, hop]: part p of the basis (rows p*hop ... (p+1)*hop) for every output column
    by_part = basis.reshape(parts, hop, 2 * bins).transpose(1, 2).reshape(parts * 2 * bins, hop).contiguous()
    body = series[:, :, length - body_blocks * hop :, :]
    for start in range(0, tokens, tile):
        stop = min(start + tile, tokens)
        size = stop - start
        blocks = torch.matmul(by_part, body[..., start:stop].unflatten(2, (body_blocks, hop)))
        blocks = blocks.view(batch, heads, body_blocks, parts, 2 * bins, size)
        if head_blocks:
            earlier = head[:, :, start:stop, head.shape[3] - head_blocks * hop :].transpose(2, 3)
            early = torch.matmul(by_part, earlier.unflatten(2, (head_blocks, hop)))
            early = early.view(batch, heads, head_blocks, parts, 2 * bins, size)
        spectrum = torch.empty((batch, heads, frames, 2 * bins, size), dtype=series.dtype, device=series.device)
        for part in range(parts):  # frame f takes part p of block f + p
            from_head = min(frames, max(0, head_blocks - part))
            if from_head:
                chunk = early[:, :, part : part + from_head, part]
                if part:
                    spectrum[:, :, :from_head] += chunk
                else:
                    spectrum[:, :, :from_head] = chunk
            chunk = blocks[:, :, from_head + part - head_blocks : frames + part - head_blocks, part]
            if part:
                spectrum[:, :, from_head:] += chunk
            else:
                spectrum[:, :, from_head:] = chunk
        spectrum.square_()
        magnitude = (spectrum[..., :bins, :] + spectrum[..., bins:, :]).sqrt_()  # [batch, heads, frames, bins, tile]
        magnitude.mul_(weights[..., start:stop].unsqueeze(3))
        out[..., start:stop] = magnitude.sum(2)
    return out.transpose(2, 3)


def _half_frame_dft(n_fft: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For `folded_hann_spectrogram`: ``rows [2 * (bins + 2), n_fft / 2]``, the plain (unwindowed)
    DFT of a frame's first half at bins −1 … n_fft/2 + 1 (real rows, then imaginary; torch.stft's
    sign), and ``signs [2 * (bins + 2), 1]``, (−1)^k, by which the same rows of the second half
    enter the frame's spectrum."""
    half = n_fft // 2
    n = torch.arange(half, dtype=torch.float64).unsqueeze(0)
    k = torch.arange(-1, half + 2, dtype=torch.float64).unsqueeze(1)
    angle = 2 * math.pi * k * n / n_fft
    rows = torch.cat([torch.cos(angle), -torch.sin(angle)]).to(torch.float32).to(device)
    signs = torch.cat([(-1.0) ** k, (-1.0) ** k]).to(torch.float32).to(device)
    return rows, signs


def folded_hann_spectrogram(
    series: torch.Tensor,
    weights: torch.Tensor,
    dft: tuple[torch.Tensor, torch.Tensor],
    tile: int,
    head: torch.Tensor | None = None,
) -> torch.Tensor:
    """`folded_spectrogram` for the periodic Hann window and ``hop = n_fft / 2`` (NAMM's 32 / 16),
    with about half the matmul: the window is applied in the frequency domain.

    The periodic Hann window is ½ − ¼e^{iθn} − ¼e^{−iθn} (θ = 2π / n_fft), so a frame's windowed
    spectrum is Y[k] = ½X[k] − ¼(X[k−1] + X[k+1]) of its plain spectrum X, and X[k] = A[k] +
    (−1)^k B[k] for the plain DFTs A and B of its two halves (`_half_frame_dft`; bins −1 and
    n_fft/2 + 1 mirror bins 1 and n_fft/2 − 1 of a real series). Every block of ``hop`` values is
    transformed once by ``2 · (bins + 2)`` rows instead of the windowed basis's ``2 · 2 · bins``,
    and |Y| = ¼ |X[k−1] + X[k+1] − 2X[k]| costs two elementwise passes. ``series`` and ``head``
    hold whole blocks; shapes as in `folded_spectrogram`; ``dft`` from `_half_frame_dft`.
    """
    rows, signs = dft
    hop = rows.shape[1]
    bins = rows.shape[0] // 2 - 2
    batch, heads, length, tokens = series.shape
    frames = weights.shape[2]
    out = series.new_empty((batch, heads, bins, tokens))
    if frames == 0:
        return out.zero_().transpose(2, 3)
    needed = frames + 1  # blocks the frames cover, the newest last
    body_blocks = min(needed, length // hop)
    head_blocks = needed - body_blocks
    if head_blocks > (0 if head is None else head.shape[3] // hop):
        raise ShapeError(f"the series holds {length} values (+ head); {frames} frames need {needed * hop}")
    body = series[:, :, length - body_blocks * hop :, :]
    quarter = weights * 0.25
    for start in range(0, tokens, tile):
        stop = min(start + tile, tokens)
        values = body[..., start:stop]  # [batch, heads, body_blocks * hop, size]
        if head_blocks:  # the head's values of these tokens come first (the matmul copies its input anyway)
            earlier = head[:, :, start:stop, head.shape[3] - head_blocks * hop :].transpose(2, 3)
            values = torch.cat([earlier, values], dim=2)
        blocks = torch.matmul(rows, values.unflatten(2, (needed, hop)))  # [batch, heads, needed, rows, size]
        plain = torch.addcmul(blocks[:, :, :frames], blocks[:, :, 1:], signs)  # X of every frame
        plain = plain.view(batch, heads, frames, 2, bins + 2, stop - start)
        windowed = torch.add(plain[..., :-2, :], plain[..., 2:, :]).sub_(plain[..., 1:-1, :], alpha=2).square_()
        magnitude = windowed[:, :, :, 0].add_(windowed[:, :, :, 1]).sqrt_()  # 4|Y| [batch, heads, frames, bins, size]
        magnitude.mul_(quarter[..., start:stop].unsqueeze(3))
        out[..., start:stop] = magnitude.sum(2)
    return out.transpose(2, 3)


class StftExtractor:
    """NAMM attention spectrogram + recency (Cetin et al. 2024): 25 features per token by default.

    `Stateful`: the per-bin normalisation statistics (``mean``, ``var``, ``count``) are saved with
    the policy. Set ``calibrating = True`` (or call `start_calibration`) while the zero policy runs
    to collect them, then `freeze`. Until calibrated, bins pass through un-normalised.
    """

    name: ClassVar[str] = "stft"
    Config = StftConfig
    #: Tokens per tile of `folded_spectrogram`: a tile's blocks stay in cache (measured fastest
    #: of 32, 64 and 128 on CPU for NAMM's 32 frames).
    tile: ClassVar[int] = 64
    #: Tokens per tile of `folded_hann_spectrogram` (measured fastest of 64, 128 and 256).
    hann_tile: ClassVar[int] = 128

    def __init__(self, config: StftConfig | None = None) -> None:
        self.config = config or StftConfig()
        self.calibrating = False
        bins = self.config.bins
        self._mean = torch.zeros(bins, dtype=torch.float64)
        self._var = torch.ones(bins, dtype=torch.float64)
        self._count = torch.zeros(1, dtype=torch.float64)
        self._bases: dict[torch.device, torch.Tensor] = {}
        self._half_dfts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def requirements(self) -> Requirements:
        return Requirements(attention_window=self.config.window)

    @property
    def num_features(self) -> int:
        return self.config.num_features

    # ----------------------------------------------------------------- calibration (Stateful)

    @property
    def calibrated(self) -> bool:
        return bool(self._count.item() > 0)

    def start_calibration(self) -> None:
        """Forget any statistics and collect new ones on every following `extract`."""
        self._mean.zero_()
        self._var.fill_(1.0)
        self._count.zero_()
        self.calibrating = True

    def freeze(self) -> None:
        """Stop collecting; the statistics gathered so far are used from now on."""
        self.calibrating = False

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self._mean.clone(), "var": self._var.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = {"mean", "var", "count"} - set(state)
        if missing:
            raise KeyError(f"stft statistics lack {sorted(missing)}; expected mean, var and count")
        bins = self.config.bins
        for key, size in (("mean", bins), ("var", bins), ("count", 1)):
            if tuple(state[key].shape) != (size,):
                raise ValueError(
                    f"stft statistic {key!r} has shape {tuple(state[key].shape)}, expected ({size},) "
                    f"for n_fft={self.config.n_fft}"
                )
        self._mean = state["mean"].detach().to(torch.float64).cpu().clone()
        self._var = state["var"].detach().to(torch.float64).cpu().clone()
        self._count = state["count"].detach().to(torch.float64).cpu().clone()
        self.calibrating = False

    def _accumulate(self, values: torch.Tensor) -> None:
        """Merge per-bin mean / variance of ``values [..., bins]`` into the running statistics (Chan et al.)."""
        flat = values.detach().reshape(-1, values.shape[-1]).to(torch.float64).cpu()
        n_b = flat.shape[0]
        if n_b == 0:
            return
        mean_b = flat.mean(0)
        var_b = flat.var(0, unbiased=False)
        n_a = self._count.item()
        total = n_a + n_b
        delta = mean_b - self._mean
        if n_a == 0:
            self._mean, self._var = mean_b, var_b
        else:
            self._mean = self._mean + delta * (n_b / total)
            self._var = (self._var * n_a + var_b * n_b + delta.square() * (n_a * n_b / total)) / total
        self._count.fill_(total)

    # ----------------------------------------------------------------- features

    def _basis(self, device: torch.device) -> torch.Tensor:
        """``[n_fft, 2 * bins]``: windowed DFT, real columns then imaginary columns."""
        if device not in self._bases:
            real, imag = _dft_matrices(self.config.n_fft, device)
            self._bases[device] = torch.cat([real, imag], dim=1)
        return self._bases[device]

    def frame_count(self, length: int) -> int:
        """Frames of ``n_fft`` every ``hop`` that fit in a series of ``length`` values."""
        n_fft, hop = self.config.n_fft, self.config.hop
        return (length - n_fft) // hop + 1 if length >= n_fft else 0

    def spectrogram(self, series: torch.Tensor) -> torch.Tensor:
        """Magnitudes ``[..., frames, bins, tokens]`` of ``series [..., length, tokens]``.

        Frames are right-aligned: the last one ends with the newest value, and the oldest
        ``(length - n_fft) % hop`` values are left out. When ``hop`` divides ``n_fft`` each frame
        is assembled from ``n_fft / hop`` blocks, so the series is never copied into frames.
        """
        cfg = self.config
        frames = self.frame_count(series.shape[-2])
        bins = cfg.bins
        if frames == 0:
            return series.new_zeros((*series.shape[:-2], 0, bins, series.shape[-1]))
        series = series[..., series.shape[-2] - (cfg.n_fft + (frames - 1) * cfg.hop) :, :]
        basis = self._basis(series.device).T  # [2 * bins, n_fft]
        if cfg.n_fft % cfg.hop == 0:
            parts = cfg.n_fft // cfg.hop
            blocks = series.reshape(*series.shape[:-2], frames + parts - 1, cfg.hop, series.shape[-1])
            out = basis[:, : cfg.hop].contiguous() @ blocks[..., :frames, :, :]
            for j in range(1, parts):
                out += basis[:, j * cfg.hop : (j + 1) * cfg.hop].contiguous() @ blocks[..., j : j + frames, :, :]
        else:
            windows = series.unfold(-2, cfg.n_fft, cfg.hop)  # [..., frames, tokens, n_fft]
            out = (windows @ basis.T).transpose(-1, -2)
        out = out.square_()
        return (out[..., :bins, :] + out[..., bins:, :]).sqrt_()

    def _fold(self, series: torch.Tensor, weights: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, kv_heads, tokens, bins]``: spectrogram frames of ``head`` (token-major) then
        ``series [batch, kv_heads, length, tokens]`` summed with ``weights [batch, kv_heads,
        frames, tokens]``, as one tile-wise operation (`folded_hann_spectrogram` when ``hop`` is
        half of ``n_fft`` and both hold whole blocks, else `folded_spectrogram`). For float32 CPU
        tensors and an even ``hop``, kvpolicy's native kernel computes the former (tested equal)."""
        cfg = self.config
        if cfg.n_fft == 2 * cfg.hop and all(
            n % cfg.hop == 0 for n in (series.shape[2], 0 if head is None else head.shape[3])
        ):
            if cfg.hop % 2 == 0 and native.usable(series, weights, *([] if head is None else [head])):
                return native.folded_hann_spectrogram(series, weights, head, cfg.hop)
            device = series.device
            if device not in self._half_dfts:
                self._half_dfts[device] = _half_frame_dft(cfg.n_fft, device)
            return folded_hann_spectrogram(series, weights, self._half_dfts[device], self.hann_tile, head)
        return folded_spectrogram(series, weights, self._basis(series.device), cfg.hop, self.tile, head)

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
            # The left context only continues this series if the previous update ended right before it.
            adjacent = (clock == int(query_positions[0]) - 1).to(torch.float32)
            head = context * adjacent.unsqueeze(-1)  # [batch, kv_heads, tokens, context]: series before these queries
            frames = self.frame_count(cfg.context + queries)
            ends = query_positions[queries - 1 - cfg.hop * torch.arange(frames - 1, -1, -1, device=attention.device)]
            a = cfg.gamma**cfg.hop
            weights = (1 - a) * a ** torch.arange(frames - 1, -1, -1, dtype=torch.float32, device=attention.device)
            exists = positions.unsqueeze(2) <= ends.view(1, 1, frames, 1)  # [batch, kv_heads, frames, tokens]
            folded = self._fold(attention, exists.to(torch.float32) * weights.view(1, 1, frames, 1), head)
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
            mean = self._mean.to(device=ema.device, dtype=torch.float32)
            std = self._var.sqrt().clamp_min(cfg.eps).to(device=ema.device, dtype=torch.float32)
            spectral = (ema - mean) / std
        if not cfg.recency_dims:
            return spectral
        recency = recency_embedding(view.seen - 1 - positions, cfg.recency_dims, cfg.recency_max_freq)
        return torch.cat([recency, spectral], dim=-1)

    @staticmethod
    def _state(view: LayerView, key: str, trailing: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The stored per-token state ``key`` (empty on a layer's first update), shape-checked."""
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
        for kernel in value:
            if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 3 or kernel % 2 == 0:
                raise ValueError(
                    f"votes_kernels must be odd integers >= 3 (span widths in cached tokens); got {value!r}"
                )
            if kernel > MAX_KERNEL:
                raise ValueError(f"votes_kernels must be at most {MAX_KERNEL} tokens wide; got {value!r}")

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

    name: ClassVar[str] = "stft_votes"
    Config = StftVotesConfig

    def __init__(self, config: StftVotesConfig | None = None) -> None:
        super().__init__(config or StftVotesConfig())

    def extract(self, view: LayerView) -> torch.Tensor:
        spectral = super().extract(view)
        window = view.attention[:, :, -self.config.votes_window :, :].to(torch.float32)
        votes = torch.log(window.sum(dim=2) + self.config.votes_eps).to(spectral.device)
        columns = [spectral, votes.unsqueeze(-1)]
        if self.config.votes_kernels:
            mask = padding_mask(view.positions)
            for kernel in self.config.votes_kernels:
                pooled = pool_neighbours(votes, kernel, "max", mask)
                if mask is not None:  # padded slots hold no token: give them a finite, ignored value
                    pooled = pooled.masked_fill(mask, 0.0)
                columns.append(pooled.unsqueeze(-1))
        return torch.cat(columns, dim=-1)


@hookimpl
def kvpolicy_register_extractors(register) -> None:
    register("stft", StftExtractor, description="NAMM attention spectrogram (STFT + EMA) with recency, 25 features")
    register(
        "stft_votes",
        StftVotesExtractor,
        description="NAMM spectrogram + log votes of the newest 32 queries (SnapKV's signal), 26 features",
    )
