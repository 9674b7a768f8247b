"""Peak memory of a piece of work: the kernel's peak resident set on CPU, the allocator's peak on CUDA.

Used by the benchmarks (``benchmarks/bench_vtc_train.py``) and by :class:`mmembed.callbacks.memory.PeakMemory`
(the peak memory of every training run, logged to MLflow: Table 9 compares it across compression factors).
"""

from __future__ import annotations

from pathlib import Path

import torch


def proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS``: resident now, ``VmHWM``: peak resident).

    Why not tracemalloc or ``resource``: torch allocates its tensors outside Python's allocator, so tracemalloc
    misses them, and ``ru_maxrss`` has no way to be read relative to a baseline. The kernel's ``VmHWM`` covers
    every allocation, and a fresh process per configuration makes its baseline clean.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            value, unit = line.split(":", 1)[1].split()
            if unit != "kB":
                raise RuntimeError(f"unexpected unit {unit!r} for {field} in /proc/self/status")
            return int(value) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (not Linux?); run with --memory off")


def release_and_reset_peak_rss() -> int:
    """Return freed heap memory to the OS, restart the kernel's peak-RSS counter, and return the resident set now.

    Lets one process measure several configurations in turn: glibc keeps freed small and mid-sized blocks (up to
    its 32 MiB dynamic mmap threshold) in its heap, which would otherwise inflate the next baseline and be reused
    unseen; ``malloc_trim(0)`` hands them back. Writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) resets
    ``VmHWM`` to the current resident set, so the next ``VmHWM`` read is the peak since this call.

    Raises:
        OSError: the peak counter cannot be reset here (not Linux, or ``/proc`` read-only); use a fresh process
            per configuration instead (``--memory subprocess``).
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc_name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None
    if trim is not None:
        trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_bytes("VmRSS")


def reset_peak(device: torch.device | str) -> int:
    """Start measuring a peak on ``device``; returns the baseline in bytes (memory in use now)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return release_and_reset_peak_rss()


def read_peak(device: torch.device | str) -> int:
    """The peak in bytes since :func:`reset_peak` (absolute: subtract the baseline for the work's own share)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return proc_status_bytes("VmHWM")
