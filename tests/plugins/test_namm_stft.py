"""The ``stft`` extractor against torch.stft and the EMA recurrence written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.types import LayerView
from kvpolicy_plugins import spectrogram
from kvpolicy_plugins.spectrogram import (
    folded_hann_spectrogram,
    folded_spectrogram,
    frame_count,
    half_frame_dft,
    windowed_dft_basis,
)
from kvpolicy_plugins.stft import CLOCK_KEY, CONTEXT_KEY, EMA_KEY, StftConfig, StftExtractor

GAMMA = 0.99


def causal_attention(batch: int, heads: int, query_positions: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    """Softmax rows ``[batch, heads, queries, tokens]``; 0 for tokens newer than the query."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, len(query_positions), tokens, generator=generator) * 2
    hidden = torch.arange(tokens).view(1, 1, 1, tokens) > query_positions.view(1, 1, -1, 1)
    return torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)


def view_of(attention: torch.Tensor, query_positions: torch.Tensor, positions: torch.Tensor, state=None) -> LayerView:
    return LayerView(
        layer=0,
        num_layers=1,
        positions=positions,
        seen=int(positions.max()) + 1,
        attention=attention,
        query_positions=query_positions,
        state=state if state is not None else {},
    )


def expected_features(attention: torch.Tensor, query_positions: torch.Tensor, cfg: StftConfig) -> torch.Tensor:
    """One eviction pass from an empty state, computed token by token with torch.stft and the recurrence
    ema_f = a · ema_(f-1) + (1 - a) · exists_f · |STFT|_f, a = γ^hop."""
    batch, heads, queries, tokens = attention.shape
    a = cfg.gamma**cfg.hop
    window = torch.hann_window(cfg.n_fft, periodic=True)
    out = torch.zeros(batch, heads, tokens, cfg.recency_dims + cfg.bins)
    newest = int(query_positions[-1])
    for b in range(batch):
        for h in range(heads):
            for t in range(tokens):
                series = torch.cat([torch.zeros(cfg.n_fft - cfg.hop), attention[b, h, :, t]])
                spec = torch.stft(
                    series, n_fft=cfg.n_fft, hop_length=cfg.hop, window=window, center=False, return_complex=True
                ).abs()  # [bins, frames]
                ema = torch.zeros(cfg.bins)
                for f in range(spec.shape[1]):
                    frame_end = int(query_positions[f * cfg.hop + cfg.hop - 1])
                    exists = 1.0 if t <= frame_end else 0.0
                    ema = a * ema + (1 - a) * exists * spec[:, f]
                recency = newest - t
                half = cfg.recency_dims // 2
                angles = [recency * cfg.recency_max_freq ** (-k / half) for k in range(half)]
                embedding = torch.tensor([math.sin(x) for x in angles] + [math.cos(x) for x in angles])
                out[b, h, t] = torch.cat([embedding, ema])
    return out


def test_features_equal_torch_stft_and_the_ema_recurrence():
    cfg = StftConfig(normalize=False)
    queries = 64
    query_positions = torch.arange(queries)
    attention = causal_attention(1, 2, query_positions, queries, seed=0)
    positions = torch.arange(queries).expand(1, 2, queries)
    features = StftExtractor(cfg).extract(view_of(attention, query_positions, positions))
    assert features.shape == (1, 2, queries, 25)
    torch.testing.assert_close(features, expected_features(attention, query_positions, cfg), atol=2e-6, rtol=1e-5)


def _torch_stft_magnitudes(signals: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """``|torch.stft|`` of ``signals [n, length]`` with a periodic Hann window, no centering: the reference."""
    window = torch.hann_window(n_fft, periodic=True)
    return torch.stft(signals, n_fft=n_fft, hop_length=hop, window=window, center=False, return_complex=True).abs()


@pytest.mark.parametrize(("n_fft", "hop", "tile"), [(32, 16, 32), (32, 16, 7), (16, 6, 4)])
def test_folded_spectrogram_equals_the_weighted_sum_of_torch_stft_frames(n_fft, hop, tile):
    """The tile-wise operation (strided frames, one matmul, magnitudes folded over frames) equals
    torch.stft's magnitudes weighted and summed frame by frame, for tiles that do not divide the
    tokens and a series whose oldest values fall outside every frame."""
    generator = torch.Generator().manual_seed(9)
    series = torch.rand(2, 3, 75, 23, generator=generator)
    frames = frame_count(75, n_fft, hop)
    weights = torch.rand(2, 3, frames, 23, generator=generator)
    usable = n_fft + (frames - 1) * hop
    magnitudes = torch.stft(
        series[..., 75 - usable :, :].permute(0, 1, 3, 2).reshape(-1, usable),
        n_fft=n_fft,
        hop_length=hop,
        window=torch.hann_window(n_fft, periodic=True),
        center=False,
        return_complex=True,
    ).abs()  # [batch * heads * tokens, bins, frames]
    magnitudes = magnitudes.view(2, 3, 23, n_fft // 2 + 1, frames)
    expected = (magnitudes * weights.permute(0, 1, 3, 2).unsqueeze(3)).sum(-1)
    folded = folded_spectrogram(series, weights, windowed_dft_basis(n_fft, series.device), hop, tile)
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("n_fft", "tile", "head_values"), [(32, 32, 16), (32, 7, 16), (32, 5, 0), (16, 4, 24), (8, 3, 4)]
)
def test_hann_spectrogram_in_the_frequency_domain_equals_the_windowed_basis(n_fft, tile, head_values):
    """The Hann window applied in the frequency domain to half-frame DFTs gives the windowed
    basis's folded magnitudes (and torch.stft's), with the frames reaching into a token-major
    head or not, for tiles that do not divide the tokens."""
    hop = n_fft // 2
    generator = torch.Generator().manual_seed(10)
    series = torch.softmax(torch.randn(2, 3, 4 * hop, 23, generator=generator) * 2, dim=-1)
    head = torch.rand(2, 3, 23, head_values, generator=generator) * 0.1 if head_values else None
    frames = frame_count(4 * hop + head_values, n_fft, hop)
    weights = torch.rand(2, 3, frames, 23, generator=generator)
    expected = folded_spectrogram(series, weights, windowed_dft_basis(n_fft, series.device), hop, tile, head)
    folded = folded_hann_spectrogram(series, weights, half_frame_dft(n_fft, series.device), tile, head)
    torch.testing.assert_close(folded, expected, atol=1e-6, rtol=1e-5)
    whole = series if head is None else torch.cat([head.transpose(2, 3), series], dim=2)
    magnitudes = _torch_stft_magnitudes(whole.permute(0, 1, 3, 2).reshape(-1, whole.shape[2]), n_fft, hop)
    magnitudes = magnitudes.view(2, 3, 23, n_fft // 2 + 1, frames)
    reference = (magnitudes * weights.permute(0, 1, 3, 2).unsqueeze(3)).sum(-1)
    torch.testing.assert_close(folded, reference, atol=1e-5, rtol=1e-5)


def test_half_hops_are_folded_in_the_frequency_domain(monkeypatch):
    """NAMM's n_fft 32 / hop 16 goes through `folded_hann_spectrogram` (its native kernel for
    float32 CPU tensors where that built, else torch's); other hops do not."""
    from kvpolicy import native

    calls = []
    original, original_native = spectrogram.folded_hann_spectrogram, native.folded_hann_spectrogram
    monkeypatch.setattr(
        spectrogram, "folded_hann_spectrogram", lambda *a, **k: calls.append("torch") or original(*a, **k)
    )
    monkeypatch.setattr(
        native, "folded_hann_spectrogram", lambda *a, **k: calls.append("native") or original_native(*a, **k)
    )
    series, weights = torch.rand(1, 2, 64, 5), torch.rand(1, 2, 3, 5)
    with native.disabled():
        spectrogram.folded(series, weights, 32, 16)
    assert calls == ["torch"]
    spectrogram.folded(series, weights, 32, 16)
    assert calls == ["torch", "native" if native.available() else "torch"]
    calls.clear()
    spectrogram.folded(series, torch.rand(1, 2, 5, 5), 32, 8)
    assert calls == []


def run_updates(extractor: StftExtractor, attention: torch.Tensor, splits: list[int], keep=None) -> LayerView:
    """Feed the queries of ``attention`` in consecutive eviction passes, as the integration would."""
    tokens_total = attention.shape[-1]
    state: dict[str, torch.Tensor] = {}
    start = 0
    kept = torch.arange(tokens_total)
    view = None
    for i, size in enumerate(splits):
        stop = start + size
        query_positions = torch.arange(start, stop)
        # cache: kept older tokens plus this chunk's new ones
        cached = torch.cat([kept[kept < start], torch.arange(start, stop)])
        positions = cached.expand(1, attention.shape[1], -1)
        rows = attention[:, :, start:stop][..., cached]
        view = view_of(rows, query_positions, positions, state)
        features = extractor.extract(view)
        view.state["features"] = features  # gathered with the rest below
        if keep is not None and i < len(splits) - 1:
            chosen = keep(cached)
            index = chosen.expand(1, attention.shape[1], -1)
            state = {
                k: v.gather(2, index.view(*index.shape, *([1] * (v.dim() - 3))).expand(*index.shape, *v.shape[3:]))
                for k, v in view.state.items()
            }
            kept = cached[chosen]
        else:
            state = view.state
            kept = cached
        start = stop
    return view


def test_two_updates_carry_state_exactly_like_one_update_over_the_joined_series():
    torch.manual_seed(1)
    extractor = StftExtractor(StftConfig(normalize=False, period=128))
    attention = causal_attention(1, 2, torch.arange(128), 128, seed=1)
    once = run_updates(extractor, attention, [128])
    twice = run_updates(extractor, attention, [64, 64])
    thrice = run_updates(extractor, attention, [32, 48, 48])
    torch.testing.assert_close(twice.state["features"], once.state["features"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(thrice.state["features"], once.state["features"], atol=1e-6, rtol=1e-5)
    # the carried left context is the last n_fft - hop attention values of every token
    torch.testing.assert_close(twice.state[CONTEXT_KEY], attention[:, :, -16:, :].transpose(2, 3))
    assert bool((twice.state[CLOCK_KEY] == 127).all())


def test_state_follows_tokens_through_eviction():
    """Evicting between eviction passes (gathering every state entry) leaves the survivors' features as
    if nothing had been evicted — the hand-made attention does not renormalise here."""
    extractor = StftExtractor(StftConfig(normalize=False, period=96))
    attention = causal_attention(1, 2, torch.arange(96), 96, seed=2)
    full = run_updates(extractor, attention, [48, 48])
    kept_positions = None

    def keep_odd_and_recent(cached: torch.Tensor) -> torch.Tensor:
        nonlocal kept_positions
        chosen = torch.nonzero((cached % 2 == 1) | (cached >= 40)).flatten()
        kept_positions = cached[chosen]
        return chosen

    evicted = run_updates(extractor, attention, [48, 48], keep=keep_odd_and_recent)
    survivors = torch.cat([kept_positions, torch.arange(48, 96)])
    assert evicted.positions.shape[-1] == len(survivors) < 96
    torch.testing.assert_close(evicted.state["features"], full.state["features"][:, :, survivors])


def test_previous_average_decays_by_gamma_to_the_elapsed_queries():
    """A token that gets no attention in the second eviction pass keeps γ^queries of its average; a gap
    between eviction passes (queries the window did not keep) decays it as well and drops the stale context."""
    extractor = StftExtractor(StftConfig(normalize=False, recency_dims=0, period=64))
    attention = causal_attention(1, 1, torch.arange(32), 32, seed=3)
    view = view_of(attention, torch.arange(32), torch.arange(32).view(1, 1, 32))
    first = extractor.extract(view).clone()
    quiet = torch.zeros(1, 1, 48, 80)
    quiet[..., 32:] = causal_attention(1, 1, torch.arange(32, 80), 80, seed=4)[..., 32:]
    gap_positions = torch.arange(100, 148)  # 68 queries passed since the last eviction pass, 48 kept
    later = view_of(quiet, gap_positions, torch.arange(80).view(1, 1, 80), dict(view.state))
    second = extractor.extract(later)
    # tokens 0..31 received no attention and their (stale) context is dropped: pure decay by γ^(147 - 31)
    torch.testing.assert_close(second[:, :, :32], first * GAMMA ** (147 - 31), atol=1e-7, rtol=1e-5)


def test_calibration_collects_per_bin_statistics_then_freezes():
    extractor = StftExtractor()
    extractor.start_calibration()
    emas = []
    for seed in range(3):
        attention = causal_attention(2, 3, torch.arange(48), 48, seed=seed)
        view = view_of(attention, torch.arange(48), torch.arange(48).expand(2, 3, 48))
        extractor.extract(view)
        emas.append(view.state[EMA_KEY].reshape(-1, 17))
    extractor.freeze()
    values = torch.cat(emas).double()
    state = extractor.state_dict()
    assert extractor.calibrated and not extractor.calibrating
    torch.testing.assert_close(state["mean"], values.mean(0))
    torch.testing.assert_close(state["var"], values.var(0, unbiased=False))
    assert state["count"].item() == values.shape[0]

    # frozen: more eviction passes do not move the normalisation moments, and features are z-scored with them
    attention = causal_attention(1, 3, torch.arange(48), 48, seed=9)
    view = view_of(attention, torch.arange(48), torch.arange(48).expand(1, 3, 48))
    features = extractor.extract(view)
    torch.testing.assert_close(extractor.state_dict()["mean"], state["mean"])
    z = (view.state[EMA_KEY] - state["mean"].float()) / state["var"].sqrt().float()
    torch.testing.assert_close(features[..., 8:], z, atol=1e-4, rtol=1e-4)

    other = StftExtractor()
    assert not other.calibrated
    other.load_state_dict(state)
    torch.testing.assert_close(other.extract(view_of(attention, torch.arange(48), view.positions)), features)
    with pytest.raises(ValueError, match="n_fft=64"):
        StftExtractor(StftConfig(n_fft=64, hop=32)).load_state_dict(state)


def test_requirements_and_bad_input():
    extractor = StftExtractor()
    assert extractor.requirements.attention_window == 512
    assert extractor.num_features == 25
    no_attention = LayerView(layer=0, num_layers=1, positions=torch.arange(4).view(1, 1, 4), seen=4)
    with pytest.raises(ShapeError, match="needs view.attention"):
        extractor.extract(no_attention)
    wrong = view_of(torch.rand(1, 1, 8, 5), torch.arange(8), torch.arange(4).view(1, 1, 4))
    with pytest.raises(ShapeError, match="tokens=4"):
        extractor.extract(wrong)
    with pytest.raises(InvalidConfigError, match="hop"):
        StftConfig(n_fft=16, hop=32)
    with pytest.raises(InvalidConfigError, match="gamma"):
        StftConfig(gamma=1.5)
    with pytest.raises(InvalidConfigError, match="recency_dims"):
        StftConfig(recency_dims=7)


def test_frames_that_end_before_a_token_existed_do_not_count():
    """The contract gives 0 attention before a token exists; even if an integration left noise
    there, frames ending before the token's position are ignored (only straddling frames see it)."""
    extractor = StftExtractor(StftConfig(normalize=False, period=64))
    query_positions = torch.arange(64)
    attention = causal_attention(1, 1, query_positions, 64, seed=5)
    positions = torch.arange(64).view(1, 1, 64)
    clean = extractor.extract(view_of(attention, query_positions, positions))
    noisy = attention.clone()
    noisy[..., :32, 48:] = 0.5  # queries 0..31 (frames ending at 15 and 31) before tokens 48..63 exist
    torch.testing.assert_close(extractor.extract(view_of(noisy, query_positions, positions)), clean)
