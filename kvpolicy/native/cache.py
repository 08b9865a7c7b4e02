"""A build cache that heals: a killed build never blocks later runs, a damaged file is never loaded.

Two failures motivate it. torch's extension builder guards a build directory with a ``lock``
file that a killed build leaves behind, and every later build waits on it forever; and a
shared library truncated on disk (a full disk, a killed copy) kills the process that maps it
with SIGBUS, before any Python code can react. So builds here are serialised by an advisory
``flock`` on a file beside the build directory, which the kernel releases when its process
dies, with a bounded wait; and a built file is loaded only when its sha256 matches a manifest
written after the build completed. Anything else (a half-built directory, a truncated file, a
stale lock of torch's) is removed and built again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kvpolicy.atomic import atomic_write_text
from kvpolicy.errors import NativeBuildError

try:  # POSIX; elsewhere builds are not serialised across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_TIMEOUT_ENV = "KVPOLICY_NATIVE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 600.0  # a first build takes ~20 s on a laptop, minutes on two busy cores
MANIFEST_SUFFIX = ".sha256"


def lock_timeout() -> float:
    """Seconds to wait for another process's build, from ``$KVPOLICY_NATIVE_LOCK_TIMEOUT``."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise NativeBuildError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(library: Path) -> bool:
    """Whether ``library`` exists and matches the manifest written after its build completed."""
    manifest = library.with_name(library.name + MANIFEST_SUFFIX)
    try:
        return manifest.read_text().strip() == file_digest(library)
    except OSError:
        return False


@contextlib.contextmanager
def build_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` that dies with this process; wait at most ``timeout`` s."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise NativeBuildError(
                        f"another process (pid {owner}) has been building kvpolicy's native kernels for "
                        f"over {timeout:g} s (lock {path}); wait for it, raise {LOCK_TIMEOUT_ENV}, or set "
                        "KVPOLICY_NATIVE=off"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)  # who holds it, for the message above
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def load_cached(
    library: Path, build: Callable[[], None], load: Callable[[Path], None], *, timeout: float | None = None
) -> bool:
    """Load ``library``, building it first (``build`` writes it into its empty directory) when it
    is missing or fails its manifest. Returns whether a build ran. The directory is owned by this
    cache: whatever an unverified build left there is deleted before building again."""
    if verified(library):
        load(library)
        return False
    directory = library.parent
    with build_lock(directory.with_name(directory.name + ".lock"), lock_timeout() if timeout is None else timeout):
        built = not verified(library)  # another process may have built it while this one waited
        if built:
            shutil.rmtree(directory, ignore_errors=True)  # half-built, truncated, torch's stale `lock`
            directory.mkdir(parents=True)
            build()
            if not library.is_file():
                raise NativeBuildError(f"the build finished without writing {library}")
            atomic_write_text(library.with_name(library.name + MANIFEST_SUFFIX), file_digest(library) + "\n")
        load(library)
    return built
