"""Optional compiled CPU kernels for the costs a policy adds to a forward pass.

On CPU, a policy that reads attention pays for it twice over in plain torch: the in-pass
statistics (`kvpolicy.integrations.hf.in_pass`) run as a chain of small operations that two
threads split badly, and NAMM's spectrogram (`kvpolicy_plugins.spectrogram`) spends most of its time
in a matmul of 16 values per block; and a per-step policy (TOVA) moves every layer's kept keys
and values at every token. The kernels here (``attend.cpp``, ``spectrogram.cpp``, ``keep.cpp``)
do the same computations with one coarse task per thread, the way a fused attention kernel does,
the spectrogram with half the multiplications, and the moves of every layer due at a step in
one call; each is tested equal to its torch reference, which stays the path for every case
they do not cover (GPU tensors, dtypes other than float32, padded new tokens).

They are compiled once per machine with torch's own extension builder (a C++ compiler and
ninja are needed; ninja is a dependency) into ``$KVPOLICY_NATIVE_CACHE`` (default
``~/.cache/kvpolicy/native``), named by a hash of the sources, the torch and Python versions and
the flags, so an upgrade rebuilds. ``KVPOLICY_NATIVE`` chooses: ``auto`` (default: use them if
they build, else warn once and use torch), ``off`` (torch only) or ``require`` (an error if they
do not build).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from kvpolicy.errors import InvalidConfigError, NativeBuildError, ShapeError
from kvpolicy.native.cache import load_cached

ENV = "KVPOLICY_NATIVE"
CACHE_ENV = "KVPOLICY_NATIVE_CACHE"
MODES = ("auto", "off", "require")
SOURCES = ("attend.cpp", "spectrogram.cpp", "keep.cpp")

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_failure: str | None = None
_warned = False
_suspended = 0


class NativeBuildWarning(UserWarning):
    """The kernels did not build; kvpolicy runs on its torch path (same results, slower on CPU)."""


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise InvalidConfigError(f"{ENV} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvpolicy" / "native")


def _flags() -> list[str]:
    flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")()
    if capability in ("AVX2", "AVX512"):  # what this machine runs; the build is for this machine only
        flags += ["-mavx2", "-mfma"]
    return flags


def _build() -> None:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the ninja wheel's binary, when its venv is not activated
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

    here = Path(__file__).parent
    sources = [here / name for name in SOURCES]
    flags = _flags()
    built_for = f"manifest-v1 {torch.__version__} {sys.version_info[:2]} {platform.machine()} {' '.join(flags)}"
    digest = hashlib.sha256(built_for.encode())
    for source in sources:
        digest.update(source.read_bytes())
    name = f"kvpolicy_native_{digest.hexdigest()[:16]}"
    directory = cache_dir() / name

    def build() -> None:
        print(f"kvpolicy: compiling native CPU kernels into {directory} (once, ~20 s)", file=sys.stderr, flush=True)
        cpp_extension.load(
            name,
            [str(source) for source in sources],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )

    load_cached(directory / f"{name}.so", build, lambda library: torch.ops.load_library(str(library)))


def available() -> bool:
    """Whether the kernels are in use: built (or loaded from the cache) on first call, unless
    ``KVPOLICY_NATIVE=off`` or inside `disabled`."""
    global _loaded, _failure, _warned
    if _suspended or mode() == "off":
        return False
    if _loaded is None:
        with _lock:
            if _loaded is None:
                try:
                    _build()
                    _loaded = True
                except Exception as error:  # noqa: BLE001 - any build failure falls back to torch
                    message = " ".join(str(error).split())  # the compiler's complaint comes last
                    _loaded, _failure = False, f"{type(error).__name__}: ...{message[-600:]}"
    if not _loaded:
        if mode() == "require":
            raise NativeBuildError(f"{ENV}=require, but kvpolicy's native kernels did not build: {_failure}")
        if not _warned:
            _warned = True
            warnings.warn(
                f"kvpolicy's native CPU kernels did not build ({_failure}); using the torch path "
                f"(same results, slower on CPU). Set {ENV}=off to skip the attempt.",
                NativeBuildWarning,
                stacklevel=2,
            )
    return bool(_loaded)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: all float32 on the CPU and outside autograd (the
    kernels define no gradient), kernels available."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)
        and available()
    )


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the torch path inside this block (the reference the kernels are tested against)."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    scaling: float,
    softcap: float | None,
    rows: int,
    columns: bool,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`kvpolicy.integrations.hf.in_pass.attend` for float32 CPU tensors whose new tokens are all
    valid (``valid`` masks cached slots only)."""
    _check_tensors("attend", query=query, key=key, value=value)
    batch, heads, queries, width = query.shape
    kv_heads, tokens = key.shape[1], key.shape[2]
    if key.shape != (batch, kv_heads, tokens, width) or value.shape != key.shape:
        raise ShapeError(
            f"attend: key {tuple(key.shape)} and value {tuple(value.shape)} must both be "
            f"[{batch}, kv_heads, tokens, {width}] for query {tuple(query.shape)}"
        )
    if kv_heads == 0 or heads % kv_heads or tokens < queries:
        raise ShapeError(
            f"attend: {heads} query heads over {kv_heads} KV heads, {queries} queries over {tokens} tokens"
        )
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (batch, kv_heads, tokens)):
        raise ShapeError(
            f"attend: valid must be bool [{batch}, {kv_heads}, {tokens}], got {valid.dtype} {tuple(valid.shape)}"
        )
    if int(step) < 1 or int(rows) < 0:
        raise ShapeError(f"attend: step must be >= 1 and rows >= 0, got step {step}, rows {rows}")
    output, row_out, col_out = torch.ops.kvpolicy_native.attend(
        query, key, value, valid, float(scaling), float(softcap or 0.0), int(rows), bool(columns), int(step)
    )
    return output, (row_out if rows else None), (col_out if columns else None)


def keep_in_place(stores: list[torch.Tensor], indices: torch.Tensor) -> None:
    """Keep ``indices [layers, batch, kv_heads, kept]`` of every layer's two ``stores`` (keys,
    values: contiguous CPU ``[batch, kv_heads, slots, width]``, any dtype) at the front of each,
    in place, in one call (`kvpolicy.integrations.hf.layer.EvictingLayer._take_in_place` for many
    layers). Each row of ``indices`` must be strictly ascending (a `Selection` in stored order);
    a `ShapeError` otherwise, with nothing written."""
    try:
        torch.ops.kvpolicy_native.keep_in_place(stores, indices)
    except RuntimeError as error:
        raise ShapeError(str(error).splitlines()[0]) from None


def _check_tensors(kernel: str, **tensors: torch.Tensor) -> None:
    """The kernels read raw memory: anything but 4-d float32 CPU tensors would be read wrongly."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ShapeError(f"{kernel}: {name} must be a 4-d tensor, got {getattr(tensor, 'shape', type(tensor))}")
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ShapeError(f"{kernel}: {name} must be float32 on the CPU, got {tensor.dtype} on {tensor.device}")


def folded_hann_spectrogram(
    series: torch.Tensor, weights: torch.Tensor, head: torch.Tensor | None, hop: int, tile: int = 64
) -> torch.Tensor:
    """`kvpolicy_plugins.spectrogram.folded_hann_spectrogram` (n_fft = 2·hop, ``hop`` even) for float32
    CPU tensors: ``[batch, kv_heads, tokens, hop + 1]``."""
    if head is None:
        _check_tensors("folded_hann_spectrogram", series=series, weights=weights)
        head = series.new_zeros((*series.shape[:2], series.shape[3], 0))
    _check_tensors("folded_hann_spectrogram", series=series, weights=weights, head=head)
    batch, kv_heads, length, tokens = series.shape
    frames, carried = weights.shape[2], head.shape[3]
    if weights.shape != (batch, kv_heads, frames, tokens) or head.shape[:3] != (batch, kv_heads, tokens):
        raise ShapeError(
            f"folded_hann_spectrogram: series {tuple(series.shape)} needs weights [{batch}, {kv_heads}, frames, "
            f"{tokens}] and head [{batch}, {kv_heads}, {tokens}, values], got {tuple(weights.shape)} and {tuple(head.shape)}"
        )
    if int(hop) < 2 or int(hop) % 2 or int(tile) < 1:
        raise ShapeError(f"folded_hann_spectrogram: hop must be even and >= 2 and tile >= 1, got {hop}, {tile}")
    if length % hop or carried % hop or (frames and (frames + 1) * hop > length + carried):
        raise ShapeError(
            f"folded_hann_spectrogram: series ({length}) and head ({carried}) must hold whole blocks of {hop}, "
            f"and {frames} frames need {(frames + 1) * hop} values"
        )
    return torch.ops.kvpolicy_native.folded_hann(series, weights, head, int(hop), int(tile))
