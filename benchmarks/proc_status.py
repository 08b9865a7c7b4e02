"""Memory figures of the running process, read from ``/proc/self/status`` (Linux), shared by the
benchmarks that report a peak above the loaded model (``VmHWM`` after a reset, minus ``VmRSS``)."""

from __future__ import annotations


def status_kib(field: str) -> int:
    """``field`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM``…) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
