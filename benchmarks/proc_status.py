"""Memory figures of the running process, read from ``/proc/self/status`` (Linux), shared by the
benchmarks that report a peak above the loaded model (``VmHWM`` after a reset, minus ``VmRSS``)."""

from __future__ import annotations

import ctypes
import gc


def status_kib(field: str) -> int:
    """``field`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM``…) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def start_peak() -> int:
    """The base a peak is measured from, in KiB: free memory handed back first (Python's garbage,
    then glibc's ``malloc_trim``), so the base is the loaded model itself and not also what an
    earlier warm-up left in the allocator's free lists — that amount differs from run to run
    (tens of MiB at 8k) and made peaks of equal runs differ by as much. Then ``VmHWM`` is reset
    to the current ``VmRSS``."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # VmHWM := VmRSS
        handle.write("5")
    return base
