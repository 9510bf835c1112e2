"""Small filesystem helpers: atomic writes, fsync of directories, file locks, and what a
new file gets without asking."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, NamedTuple


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


class CreationDefaults(NamedTuple):
    """What a file or directory created below some directory gets without asking: the
    creating process's owner (when owners are ours to set at all) and the umask.

    Where they already match what an entry should end with, the entry is created with
    its final mode and needs no fchown or fchmod: two syscalls of the few per file that
    unpacking and materializing a tree make."""

    owner: tuple[int, int] | None  # (euid, egid) when keeping owners, else None
    umask: int

    def gives_file(self, mode: int, uid: int, gid: int) -> bool:
        """Whether a file created with permission bits ``mode`` ends with them and with
        owner ``uid:gid`` (when owners are kept). No setuid/setgid/sticky bit: those
        are set after the chown that would clear them."""
        return not (mode & 0o7000 or mode & self.umask) and (
            self.owner is None or (uid, gid) == self.owner
        )

    def gives_dir(self, mode: int, uid: int, gid: int) -> bool:
        """As gives_file, for a directory that must also take its children (owner rwx)
        and that nobody else may write into while it does (no group or other w: such a
        directory stays 0700 until its children are in)."""
        return mode & 0o722 == 0o700 and self.gives_file(mode, uid, gid)


def creation_defaults(dir_fd: int, same_owner: bool) -> CreationDefaults | None:
    """The CreationDefaults below ``dir_fd``; None when they cannot be known: no umask in
    /proc (Linux < 4.7), a setgid or default-ACL directory that decides for itself, or
    (keeping owners) a directory not owned by euid:egid -- a file system that maps or
    picks owners itself (NFS root_squash, a grpid mount), where only fchown is sure."""
    umask = _umask()
    if umask is None:
        return None
    try:
        st = os.fstat(dir_fd)
        if st.st_mode & stat.S_ISGID or "system.posix_acl_default" in os.listxattr(dir_fd):
            return None
    except OSError:
        return None
    if same_owner and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        return None
    return CreationDefaults((os.geteuid(), os.getegid()) if same_owner else None, umask)


def _umask() -> int | None:
    """The process umask, read without changing it (``os.umask`` sets it, for every
    thread at once)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None
