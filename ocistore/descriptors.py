"""The process's file-descriptor budget, for the CLI commands that unpack layers.

An unpack keeps up to a few hundred directory descriptors open (unpack.py's cache), one
per concurrent unpack. Two process-wide settings matter for that, and only the CLI
changes them: a library caller's process keeps its own.

- The soft RLIMIT_NOFILE is often 1024 while the hard one is far higher: it is raised to
  the hard limit, as Go programs (containerd, podman, skopeo) do at start.
- Linux grows a process's descriptor table in steps (64, 128, 256, 512 slots), and once
  the process has threads each step waits for an RCU grace period: 10-22 ms on the
  benchmark VM, in the unpacking thread, where a pull's critical path runs. Growing the
  table once while the process is still single-threaded costs microseconds.
"""

from __future__ import annotations

import contextlib
import os
import resource

#: Descriptor slots a pull needs: one unpack's directory cache, plus sockets, blob files,
#: locks and the database.
_TABLE_SLOTS = 512


def open_file_limit() -> int:
    """The soft limit on open descriptors (what EMFILE is measured against)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def prepare_for_unpacking() -> None:
    """Raise the soft descriptor limit to the hard one and grow the descriptor table.

    Call while the process has a single thread: that is when growing the table is cheap.
    Best effort: where either step is refused, unpacking still works (its cache shrinks to
    what the limit allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux caps the descriptor limit at fs.nr_open (2**20 by default), even under an
    # "unlimited" hard limit.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and target > soft:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    slots = min(_TABLE_SLOTS, open_file_limit())
    with contextlib.suppress(OSError):
        os.fstat(slots - 1)
        return  # that descriptor is open (inherited): the table is that large already
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if fd != slots - 1:  # else it is the lowest free slot: the table holds it
            # The table grows to hold the highest descriptor and never shrinks back.
            os.dup2(fd, slots - 1, inheritable=False)
            os.close(slots - 1)
    except OSError:
        pass
    finally:
        os.close(fd)
