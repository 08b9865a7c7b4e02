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


def make_resident(model) -> None:
    """Read every parameter and buffer of ``model`` once, so its weights are in the resident set.

    transformers maps safetensors weights from the file; a page of them joins the resident set
    only once something reads it. An input embedding that is not tied to the output head is read
    one row per token id, so a long prompt pages in its rows as new ids arrive (Qwen2.5-Coder-0.5B:
    a 519 MiB embedding, of which a 512-token warm-up reads a few MiB; 30 MiB more by 4k tokens,
    the same for every variant). Without this, a peak "above the loaded model" counts that part of
    the model too, for the full cache and every policy alike."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.numel():
                tensor.detach().reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()


def start_peak(model=None) -> int:
    """The base a peak is measured from, in KiB: the ``model``'s weights made resident
    (`make_resident`), then free memory handed back (Python's garbage, then glibc's
    ``malloc_trim``), so the base is the loaded model itself and not also what an earlier
    warm-up left in the allocator's free lists — that amount differs from run to run (tens of
    MiB at 8k) and made peaks of equal runs differ by as much. Then ``VmHWM`` is reset to the
    current ``VmRSS``."""
    if model is not None:
        make_resident(model)
    gc.collect()
    try:  # not kvpolicy's release_freed_memory: this file also runs in the kvpress venv, without kvpolicy
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # VmHWM := VmRSS
        handle.write("5")
    return base
