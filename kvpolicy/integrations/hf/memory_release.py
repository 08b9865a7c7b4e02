"""Handing the memory that eviction freed back to the operating system.

Evicting tokens frees their keys and values, but glibc's allocator keeps most freed blocks of a
few MiB in its heap for reuse instead of returning them: a cache whose stores are reallocated as
prefill chunks arrive and tokens leave leaves that memory resident, so the process's resident set
(what a container's memory limit counts) stays near what it held before the eviction. On
Qwen2.5-Coder-0.5B at 8k tokens (25 %), what stayed resident after the prefill fell from
134–256 MiB above the model to 65–68 for 48 MiB of keys and values (StreamingLLM, TOVA), and
the full cache's from 277–291 to 197 for 192 (docs/benchmarks.md); the peak, a chunk's own
working memory on top of the cache, moves much less. `EvictingCache`
calls `release_freed_memory` after every forward call of more than one token (a prefill chunk:
decoding steps free too little to be worth it), for the full cache too.
``KVPOLICY_RELEASE_MEMORY=0`` turns it off (a call costs ≈ 5–10 ms per 100 MiB handed back,
counted in the report's time in the policy, and the next allocations fault their pages in again).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

ENV = "KVPOLICY_RELEASE_MEMORY"


def enabled() -> bool:
    """Whether passes hand freed memory back (``KVPOLICY_RELEASE_MEMORY``, default on)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the allocator's free pages to the operating system; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
