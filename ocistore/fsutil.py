"""Small durable-filesystem helpers: atomic writes, fsync of directories, file locks."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str) -> None:
    """Flush the whole filesystem holding ``path``: one call instead of an fsync per file
    of a freshly unpacked layer (falls back to sync(2) where syncfs is unavailable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc_syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _libc_syncfs(fd: int) -> int:
    global _SYNCFS
    if _SYNCFS is None:
        import ctypes

        # dlopen(NULL): the interpreter's own symbols, libc's among them. Not
        # ctypes.util.find_library, which imports subprocess and runs ldconfig -p: 20 ms
        # of the first layer's unpack.
        try:
            _SYNCFS = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            try:
                _SYNCFS = ctypes.CDLL("libc.so.6", use_errno=True).syncfs
            except (OSError, AttributeError):
                _SYNCFS = False
    if _SYNCFS is False:
        return -1
    return int(_SYNCFS(fd))


_SYNCFS: Any = None


def atomic_write(path: str, data: bytes, *, tmp_dir: str | None = None, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never half."""
    directory = os.path.dirname(path)
    fd, tmp = _create_temp(tmp_dir or directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def _create_temp(directory: str) -> tuple[int, str]:
    """A new, empty ``.tmp-`` file in ``directory`` (mode 0600), like ``tempfile.mkstemp``
    but without importing ``tempfile`` and ``random`` (4 ms of ``create``'s start-up)."""
    for _ in range(100):
        tmp = os.path.join(directory, ".tmp-" + os.urandom(8).hex())
        try:
            return os.open(tmp, _CREATE_TEMP, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name in {directory}")


_CREATE_TEMP = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def file_lock(path: str, *, shared: bool = False) -> Iterator[None]:
    """An advisory lock across processes (fcntl): blocks until it is ours."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock
