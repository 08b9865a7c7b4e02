"""The native kernels' build cache heals: a killed build, a truncated library or a held lock never
hangs or crashes a later run, and the public kernels refuse inputs they would read out of bounds.

The cache logic (`kvpolicy.native.cache.load_cached`) is exercised with a stand-in library (a
two-line C file, built in well under a second) in subprocesses, each with its own cache
directory, so nothing here touches the user's cache or needs torch's extension builder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kvpolicy import native
from kvpolicy.errors import NativeBuildError, ShapeError
from kvpolicy.native.cache import build_lock, load_cached, verified

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

#: a subprocess that loads (building if needed) the stand-in library and prints what it returns
STAND_IN = textwrap.dedent(
    """
    import ctypes, subprocess, sys, time
    from pathlib import Path
    from kvpolicy.native.cache import load_cached

    library, stall = Path(sys.argv[1]), float(sys.argv[2])

    def build():
        source = library.with_suffix(".c")
        source.write_text("int answer(void) { return 42; }\\n")
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
        if stall:  # a build killed half-way: half a library on disk, then the process dies
            data = library.read_bytes()
            library.write_bytes(data[: len(data) // 2])
            print("stalling", flush=True)
            time.sleep(stall)

    loaded = []
    built = load_cached(library, build, lambda path: loaded.append(ctypes.CDLL(str(path))), timeout=float(sys.argv[3]))
    print("built" if built else "cached", loaded[0].answer())
    """
)


def _stand_in(library: Path, stall: float = 0.0, timeout: float = 30.0, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", STAND_IN, str(library), str(stall), str(timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _finish(process: subprocess.Popen, limit: float = 60.0) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=limit)
    return process.returncode, out, err


@needs_cc
def test_a_build_killed_half_way_neither_hangs_nor_is_loaded(tmp_path):
    library = tmp_path / "cache" / "stand_in" / "stand_in.so"
    killed = _stand_in(library, stall=120)
    assert killed.stdout.readline().strip() == "stalling"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=10)
    assert library.exists() and not verified(library), "a half-written library is left behind"
    (library.parent / "lock").write_text("")  # what torch's builder leaves when killed: waited on forever
    start = time.monotonic()
    code, out, err = _finish(_stand_in(library))
    assert code == 0, err
    assert out.split() == ["built", "42"], "the half-built library is rebuilt, not loaded"
    assert time.monotonic() - start < 30
    assert not (library.parent / "lock").exists()
    code, out, err = _finish(_stand_in(library))
    assert out.split() == ["cached", "42"], err


@needs_cc
def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path):
    library = tmp_path / "stand_in" / "stand_in.so"
    assert _finish(_stand_in(library))[1].split() == ["built", "42"]
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 3])
    code, out, err = _finish(_stand_in(library))
    assert code == 0, f"the process died ({code}): {err}"
    assert out.split() == ["built", "42"]
    assert verified(library)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")
def test_a_lock_held_by_a_live_build_is_waited_on_for_a_bounded_time(tmp_path):
    lock = tmp_path / "stand_in.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from kvpolicy.native.cache import build_lock\n"
            "with build_lock(Path(sys.argv[1]), 5):\n    print('held', flush=True); time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(NativeBuildError, match=rf"pid {holder.pid}.*KVPOLICY_NATIVE_LOCK_TIMEOUT"):
            load_cached(tmp_path / "stand_in" / "x.so", lambda: None, lambda path: None, timeout=0.5)
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
    with build_lock(lock, 5):  # the holder died: its lock died with it
        pass


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvpolicy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_require_without_a_compiler_is_a_named_error_without_a_traceback(tmp_path):
    result = _cli(
        "plugins", KVPOLICY_NATIVE="require", KVPOLICY_NATIVE_CACHE=str(tmp_path), CXX=str(tmp_path / "no-compiler")
    )
    assert result.returncode == 2
    assert "kvpolicy: error: KVPOLICY_NATIVE=require, but kvpolicy's native kernels did not build" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_native_mode_is_refused_before_any_work():
    result = _cli("plugins", KVPOLICY_NATIVE="fastest")
    assert result.returncode == 2
    assert "KVPOLICY_NATIVE must be one of auto, off, require, got 'fastest'" in result.stderr
    assert "Traceback" not in result.stderr


def _spectrogram_inputs(tokens=32, frames=3, hop=16):
    return torch.randn(1, 2, 64, tokens), torch.rand(1, 2, frames, tokens), None, hop


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s, w, h, hop: (s, w[..., :-1], h, hop), "needs weights"),  # fewer tokens of weights
        (lambda s, w, h, hop: (s, torch.rand(1, 3, 3, 32), h, hop), "needs weights"),  # other heads
        (lambda s, w, h, hop: (s, torch.rand(1, 2, 9, 32), h, hop), "frames need"),  # more frames than values
        (lambda s, w, h, hop: (s, w, torch.zeros(1, 2, 5, 16), hop), "head"),  # head of other tokens
        (lambda s, w, h, hop: (s, w.double(), h, hop), "float32"),
        (lambda s, w, h, hop: (s[0], w, h, hop), "4-d"),
        (lambda s, w, h, hop: (s, w, h, 15), "even"),
        (lambda s, w, h, hop: (s[:, :, :40], w, h, hop), "whole blocks"),
    ],
)
def test_the_public_spectrogram_kernel_refuses_inputs_it_would_read_out_of_bounds(change, message):
    with pytest.raises(ShapeError, match=message):
        native.folded_hann_spectrogram(*change(*_spectrogram_inputs()))


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((1, 4, 3, 8), (1, 2, 10, 8), (1, 2, 9, 8)), "key"),  # value of fewer tokens
        (((1, 4, 3, 8), (1, 2, 10, 4), (1, 2, 10, 4)), "key"),  # other head width
        (((1, 3, 3, 8), (1, 2, 10, 8), (1, 2, 10, 8)), "query heads"),
        (((1, 4, 12, 8), (1, 2, 10, 8), (1, 2, 10, 8)), "queries over"),
    ],
)
def test_the_public_attention_kernel_refuses_mismatched_shapes(shapes, message):
    query, key, value = (torch.randn(*shape) for shape in shapes)
    with pytest.raises(ShapeError, match=message):
        native.attend(query, key, value, None, scaling=1.0, softcap=None, rows=1, columns=True, step=16)


def test_the_attention_kernel_refuses_a_mask_of_other_tokens():
    query, key = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(ShapeError, match="valid"):
        native.attend(
            query,
            key,
            key,
            torch.ones(1, 2, 9, dtype=torch.bool),
            scaling=1.0,
            softcap=None,
            rows=1,
            columns=True,
            step=16,
        )
