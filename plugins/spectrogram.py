"""The math of NAMM's attention spectrogram (Cetin et al., "An Evolved Universal Transformer
Memory", arXiv 2410.13166, section 3); `kvpolicy_plugins.stft` turns it into features.

Every cached token has a series of attention values, one per query. It is cut into frames of
``n_fft`` values every ``hop`` (periodic Hann window, no centring), right-aligned so that the last
frame ends with the newest value; each frame's magnitudes give ``n_fft // 2 + 1`` bins, and
`folded` returns their weighted sum over frames, ``[batch, kv_heads, tokens, bins]``, one tile of
tokens at a time, so no ``[frames, bins, tokens]`` intermediate larger than a tile ever exists.

Two implementations, tested equal to ``torch.stft`` and to each other: `folded_spectrogram` for
any ``n_fft`` and ``hop``, and `folded_hann_spectrogram` for NAMM's ``hop = n_fft / 2`` with about
half the multiplications (for float32 CPU tensors `kvpolicy.native` computes the latter).

Shapes: ``series [batch, kv_heads, length, tokens]`` (query-major, as attention rows come),
``weights [batch, kv_heads, frames, tokens]`` and an optional ``head [batch, kv_heads, tokens, h]``
holding values that come before ``series`` in every token's series (NAMM's left context, stored
token-major), so the two are never concatenated on the fast path.
"""

from __future__ import annotations

import functools
import math

import torch

from kvpolicy import native
from kvpolicy.errors import ShapeError

#: Tokens per tile of `folded_spectrogram`: a tile's frames stay in cache (measured fastest of 32,
#: 64 and 128 on CPU for NAMM's 32 frames).
FRAMES_TILE = 64
#: Tokens per tile of `folded_hann_spectrogram` (measured fastest of 64, 128 and 256).
HANN_TILE = 128


def frame_count(length: int, n_fft: int, hop: int) -> int:
    """Frames of ``n_fft`` every ``hop`` that fit in a series of ``length`` values."""
    return (length - n_fft) // hop + 1 if length >= n_fft else 0


@functools.cache
def windowed_dft_basis(n_fft: int, device: torch.device) -> torch.Tensor:
    """``[n_fft, 2 * bins]``: the Hann-windowed one-sided DFT, real columns then imaginary
    (torch.stft's sign)."""
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64).unsqueeze(1)
    n = torch.arange(n_fft, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64).unsqueeze(0)
    angle = 2 * math.pi * n * k / n_fft
    real, imag = window * torch.cos(angle), -window * torch.sin(angle)
    return torch.cat([real.to(torch.float32), imag.to(torch.float32)], dim=1).to(device)


@functools.cache
def half_frame_dft(n_fft: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


def folded(
    series: torch.Tensor, weights: torch.Tensor, n_fft: int, hop: int, head: torch.Tensor | None = None
) -> torch.Tensor:
    """``[batch, kv_heads, tokens, bins]``: the frames of ``head`` then ``series`` summed with
    ``weights``, by the fastest implementation that applies: `folded_hann_spectrogram` (or its
    native kernel) when ``hop`` is half of ``n_fft`` and both hold whole blocks of ``hop``, else
    `folded_spectrogram`."""
    lengths = (series.shape[2], 0 if head is None else head.shape[3])
    if n_fft == 2 * hop and all(n % hop == 0 for n in lengths):
        if hop % 2 == 0 and native.usable(series, weights, *([] if head is None else [head])):
            return native.folded_hann_spectrogram(series, weights, head, hop)
        return folded_hann_spectrogram(series, weights, half_frame_dft(n_fft, series.device), HANN_TILE, head)
    return folded_spectrogram(series, weights, windowed_dft_basis(n_fft, series.device), hop, FRAMES_TILE, head)


def folded_spectrogram(
    series: torch.Tensor,
    weights: torch.Tensor,
    basis: torch.Tensor,
    hop: int,
    tile: int,
    head: torch.Tensor | None = None,
) -> torch.Tensor:
    """Any ``hop``: Σ_f ``weights[f, t]`` · |windowed DFT of frame f of token t's series|, with
    ``basis`` from `windowed_dft_basis`. A tile's frames are a strided view of the series, one
    matmul with the basis gives every frame's spectrum, and the magnitudes are folded at once."""
    if head is not None:
        series = torch.cat([head.transpose(2, 3), series], dim=2)
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
    (−1)^k B[k] for the plain DFTs A and B of its two halves (`half_frame_dft`; bins −1 and
    n_fft/2 + 1 mirror bins 1 and n_fft/2 − 1 of a real series). Every block of ``hop`` values is
    transformed once by ``2 · (bins + 2)`` rows instead of the windowed basis's ``2 · 2 · bins``,
    and |Y| = ¼ |X[k−1] + X[k+1] − 2X[k]| costs two elementwise passes. ``series`` and ``head``
    hold whole blocks; ``dft`` from `half_frame_dft`.
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
