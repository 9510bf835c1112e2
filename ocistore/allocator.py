"""Process-wide tuning of the C allocator for the CLI commands that stream layers.

A pull passes every layer through megabyte-sized ``bytes`` objects (network chunks, inflated
chunks, tar reads), allocated on one thread and freed on another. With glibc's defaults a
freed chunk at the top of the heap beyond the trim threshold goes back to the kernel and the
next one faults its pages in again: a Debian pull took 16-17k page faults, 9.3k with the
heap kept (and, with two threads, each unmap also costs a cross-CPU TLB flush).

Only the CLI calls this: the process is ours and short-lived. A library caller's process
keeps its own allocator settings.
"""

from __future__ import annotations

# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_SETTINGS = (
    # Buffers up to 32 MiB (glibc's maximum) come from the heap, not a fresh mapping each.
    (_M_MMAP_THRESHOLD, 32 << 20),
    # Keep freed memory for reuse; it is bounded by the pipeline's own peak (about 50 MB).
    (_M_TRIM_THRESHOLD, 256 << 20),
    # Grow the heap in big steps: fewer brk calls while the first layer starts.
    (_M_TOP_PAD, 64 << 20),
)


def tune_for_streaming() -> None:
    """Keep freed heap memory for reuse instead of returning it to the kernel at once.
    Does nothing where the C library has no mallopt (musl)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    for param, value in _SETTINGS:
        mallopt(param, value)
