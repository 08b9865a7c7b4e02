"""kvpolicy's native CPU kernels equal their torch references, and fall back cleanly.

`kvpolicy.native.attend` against `in_pass.attend` run inside `native.disabled()` (the torch path),
and `kvpolicy.native.folded_hann_spectrogram` against `kvpolicy_plugins.spectrogram.folded_hann_spectrogram`,
over shapes that exercise every branch: GQA groups, batch rows, rows of part of the queries, a
window wider than the call, padded cached slots, soft-capping, one-query decode steps, chunks
that do not divide the queries, head blocks of the spectrogram and tiles that do not divide the
tokens. The whole suite also runs with the kernels in use (the default), so every exactness
test of the integration and of NAMM covers them too.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from kvpolicy import native
from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.integrations.hf import in_pass
from kvpolicy_plugins.spectrogram import folded_hann_spectrogram, half_frame_dft

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernels did not build here")

ATTEND_CASES = [
    # batch, heads, kv_heads, queries, tokens, rows, columns, softcap, padded cached slots
    (1, 9, 3, 96, 300, 96, False, None, False),
    (2, 4, 2, 37, 100, 5, True, None, True),
    (2, 4, 4, 7, 7, 7, True, 30.0, False),
    (1, 8, 2, 1, 50, 1, True, None, True),
    (3, 6, 3, 20, 64, 0, True, None, False),
    (1, 2, 1, 130, 140, 129, False, 20.0, True),
    # few queries over many keys: the keys are split among the threads (decoding)
    (1, 8, 2, 1, 600, 1, True, None, True),
    (1, 4, 2, 3, 1100, 2, True, 20.0, False),
    (1, 9, 3, 1, 4096, 1, True, None, False),
]


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "queries", "tokens", "rows", "columns", "softcap", "padded"), ATTEND_CASES
)
def test_attend_equals_torch_path(batch, heads, kv_heads, queries, tokens, rows, columns, softcap, padded):
    generator = torch.Generator().manual_seed(queries * tokens)
    query = torch.randn(batch, heads, queries, 16, generator=generator)
    key = torch.randn(batch, kv_heads, tokens, 16, generator=generator)
    value = torch.randn(batch, kv_heads, tokens, 16, generator=generator)
    valid = None
    if padded:
        valid = torch.rand(batch, kv_heads, tokens, generator=generator) > 0.3
        valid[..., tokens - queries :] = True  # padded cached slots only: new tokens are real
    kwargs = {"valid": valid, "scaling": 0.25, "softcap": softcap, "rows": rows, "columns": columns}
    calls = []
    original = native.attend

    def counted(*args, **kw):
        calls.append(kw["step"])
        return original(*args, **kw)

    native.attend = counted
    try:
        got = in_pass.attend(query, key, value, max_elements=16 * heads // kv_heads * tokens, **kwargs)
        with native.disabled():
            want = in_pass.attend(query, key, value, **kwargs)
    finally:
        native.attend = original
    assert calls == [16], "the native kernel ran once, in chunks of its minimum size (16 queries)"
    for name, a, b in zip(("output", "rows", "columns"), got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    if rows:
        assert got[1].sum(-1).sub(1).abs().max() < 1e-5, "each row is a distribution"


def test_attend_leaves_unsupported_cases_to_torch():
    """Padded new tokens (a left-padded batch's first chunk) and float64 go the torch way."""
    query, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    valid = torch.ones(2, 2, 9, dtype=torch.bool)
    valid[1, :, 4:6] = False  # padded new tokens of row 1
    calls = []
    original = native.attend
    native.attend = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        in_pass.attend(query, key, value, valid=valid, scaling=0.3, rows=5)
        in_pass.attend(query.double(), key.double(), value.double(), valid=None, scaling=0.3, rows=5)
        with native.disabled():
            in_pass.attend(query, key, value, valid=None, scaling=0.3, rows=5)
        assert calls == []
        in_pass.attend(query, key, value, valid=None, scaling=0.3, rows=5)
        assert calls == [1]
    finally:
        native.attend = original


@pytest.mark.parametrize(
    ("length", "head", "frames", "tokens", "hop", "tile"),
    [
        (512, 16, 32, 300, 16, 64),
        (48, 16, 3, 70, 16, 64),
        (16, 16, 1, 5, 16, 2),
        (512, 0, 31, 10, 16, 64),
        (40, 8, 5, 33, 8, 7),
        (32, 32, 0, 4, 16, 64),
    ],
)
def test_spectrogram_equals_torch_path(length, head, frames, tokens, hop, tile):
    generator = torch.Generator().manual_seed(length + tokens)
    series = torch.rand(2, 3, length, tokens, generator=generator)
    before = torch.rand(2, 3, tokens, head, generator=generator) if head else None
    weights = torch.rand(2, 3, frames, tokens, generator=generator)
    want = folded_hann_spectrogram(series, weights, half_frame_dft(2 * hop, torch.device("cpu")), 128, before)
    got = native.folded_hann_spectrogram(series, weights, before, hop, tile)
    assert got.shape == want.shape == (2, 3, tokens, hop + 1)
    torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, float(want.abs().max())), rtol=1e-5)
    if frames:
        assert float(want.abs().max()) > 0, "a vacuous comparison"


def test_spectrogram_rejects_too_short_series():
    with pytest.raises(ShapeError, match="frames need"):
        native.folded_hann_spectrogram(torch.rand(1, 1, 32, 4), torch.rand(1, 1, 5, 4), None, 16)


def test_kernels_run_under_inference_mode_and_outside_it():
    """The worker threads inherit the caller's inference mode (cached keys are often inference
    tensors, made under `torch.inference_mode`, and used outside it)."""
    with torch.inference_mode():
        key, value = torch.randn(1, 2, 70, 8), torch.randn(1, 2, 70, 8)
        inside = native.attend(
            torch.randn(1, 4, 40, 8), key, value, None, scaling=0.3, softcap=None, rows=40, columns=True, step=16
        )
    outside = native.attend(
        torch.randn(1, 4, 40, 8), key, value, None, scaling=0.3, softcap=None, rows=40, columns=True, step=16
    )
    assert inside[0].is_inference() and not outside[0].is_inference()


def test_mode_is_validated_and_off_means_torch(monkeypatch):
    monkeypatch.setenv(native.ENV, "sometimes")
    with pytest.raises(InvalidConfigError, match="KVPOLICY_NATIVE must be one of auto, off, require"):
        native.available()
    monkeypatch.setenv(native.ENV, "off")
    assert not native.available()
    assert not native.usable(torch.zeros(1))


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken() -> None:
        raise RuntimeError("c++: command not found")

    monkeypatch.setenv(native.ENV, "auto")  # CI runs with "require"
    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "_warned", False)
    with pytest.warns(native.NativeBuildWarning, match="command not found"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()  # once is enough
    monkeypatch.setenv(native.ENV, "require")
    with pytest.raises(RuntimeError, match="KVPOLICY_NATIVE=require.*command not found"):
        native.available()


def test_attaching_a_policy_that_reads_attention_builds_the_kernels_before_any_forward(monkeypatch):
    """A first build (~20 s) happens when the policy attaches, never inside a timed forward call;
    a key-only policy does not ask for the kernels at all."""
    import kvpolicy
    from kvpolicy.integrations.hf.tiny import random_ids, tiny_model

    model = tiny_model("llama")
    asked = []
    original = native.available
    monkeypatch.setattr(native, "available", lambda: asked.append(len(asked)) or original())
    with kvpolicy.build("h2o", budget=8).attach(model) as handle:
        assert asked, "attach asks for the kernels"
        before_forward = len(asked)
        handle.feed(random_ids(1, 12))
    assert len(asked) > before_forward, "the attention pass uses them"
    asked.clear()
    with kvpolicy.build("l2", budget=8).attach(model) as handle:
        handle.feed(random_ids(1, 12))
    assert asked == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layers, batch, heads, slots, kept", [(3, 1, 3, 50, 40), (2, 2, 2, 9, 9), (1, 1, 1, 5, 0)])
def test_keep_in_place_equals_gathering_each_store(dtype, layers, batch, heads, slots, kept):
    generator = torch.Generator().manual_seed(slots + kept)
    stores = [torch.randn(batch, heads, slots, 8, generator=generator).to(dtype) for _ in range(2 * layers)]
    indices = torch.stack(
        [torch.randperm(slots, generator=generator)[:kept].sort().values for _ in range(layers * batch * heads)]
    ).view(layers, batch, heads, kept)
    expected = [store.gather(2, indices[i // 2][..., None].expand(-1, -1, -1, 8)) for i, store in enumerate(stores)]
    native.keep_in_place(stores, indices)
    for store, front in zip(stores, expected, strict=True):
        assert torch.equal(store[:, :, :kept], front)


@pytest.mark.parametrize("bad", ["unsorted", "repeated", "beyond"])
def test_keep_in_place_refuses_indices_out_of_stored_order_and_writes_nothing(bad):
    stores = [torch.randn(1, 2, 10, 4) for _ in range(2)]
    before = [store.clone() for store in stores]
    rows = {"unsorted": [[0, 5, 3], [1, 2, 3]], "repeated": [[0, 4, 4], [1, 2, 3]], "beyond": [[0, 4, 10], [1, 2, 3]]}
    with pytest.raises(ShapeError, match="strictly ascending"):
        native.keep_in_place(stores, torch.tensor([[rows[bad]]]))
    assert all(torch.equal(store, old) for store, old in zip(stores, before, strict=True))
