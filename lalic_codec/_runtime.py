"""Process-level tuning for CPU inference, applied by the command-line entry points."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

_done = False


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset, cgroup cpusets and
    container runtimes narrow), not all the machine has: ``os.cpu_count()`` where there is no mask."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tune_allocator() -> bool:
    """Keep freed memory mapped instead of returning every large block to the OS.

    glibc serves allocations above 32 MiB with mmap and unmaps them on free, so each
    new large tensor page-faults afresh: on a 2-core machine this made the BiWKV
    reference 2.5-3x slower (measured 1.5-1.8 s vs 0.55 s at T=98304, C=96).
    Disabling mmap'd chunks and heap trimming removes that cost; memory that was
    used stays reserved by the process until it exits.  Linux/glibc only; a no-op
    elsewhere.  Returns whether the settings were applied.
    """
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    _done = ok
    return ok


@contextlib.contextmanager
def denormals_flushed():
    """Within this block, subnormal floats (below 1.2e-38 in float32) count as zero on this thread:
    flush-to-zero and denormals-are-zero in the SSE control register (``torch.set_flush_denormal``);
    plain computation again after it.

    Training meets them in the gradients of the latent residual prediction, where x86 cores take a
    slow microcode path for every operation that touches one: its convolutions' backward passes took
    0.3-0.7 s each instead of 4-13 ms.  On real 512 crops (one thread) a step is 1.24x faster with
    them flushed, 1.5x at qualities 6-8 and the same at 1-4.  Coding is unaffected either way (the same files and pixels, the same speed), so it
    keeps plain computation.  The setting belongs to a thread, and threads inherit it when they are
    created: enter this before torch's first parallel operation starts its thread pool, or the
    pool's threads compute in full."""
    import torch

    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
