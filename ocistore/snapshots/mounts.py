"""Mounts and descriptor walks shared by both snapshot drivers (and ``volumes.py``).

Mount points from ``/proc/self/mountinfo``, running ``mount``/``umount``, deleting a tree
without following symlinks or crossing into a mount, and the ``O_NOFOLLOW`` descriptor
helpers every walk of a container's files goes through.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence

from ocistore.errors import InUseError, MountError, StorageError

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a regular file swapped for a FIFO behind our back must not hang us.
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_OPEN_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# --- mounts ----------------------------------------------------------------------------------

_OCTAL = re.compile(rb"\\([0-7]{3})")


def mount_points() -> list[str]:
    """Mount points of this mount namespace (``/proc/self/mountinfo``), in mount order."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            data = f.read()
    except OSError as exc:
        raise MountError(f"cannot read /proc/self/mountinfo: {exc.strerror}") from exc
    points = []
    for line in data.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4:
            raw = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
            points.append(os.fsdecode(raw))
    return points


def mounts_under(path: str, *, include_self: bool = True) -> list[str]:
    """Mount points at ``path`` (if ``include_self``) or anywhere below it."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    return [p for p in mount_points() if (include_self and p == real) or p.startswith(prefix)]


def run_mount(
    argv: Sequence[str], what: str, *, cwd: str | None = None, pass_fds: Sequence[int] = ()
) -> None:
    """Run ``mount``/``umount`` (util-linux); a failure is a MountError saying ``what`` and
    the first line of the tool's stderr."""
    import subprocess  # here: creating or removing a container runs no tool

    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            check=False,
        )
    except OSError as exc:
        raise MountError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = lines[0].strip() if lines else f"{argv[0]} exited with status {proc.returncode}"
        raise MountError(f"{what}: {detail}")


# --- safe removal ----------------------------------------------------------------------------


def remove_tree(path: str) -> None:
    """Delete ``path`` and everything below it, read-only directories included.

    Never follows a symlink (a symlink is unlinked, not its target), and refuses with
    :class:`InUseError` to delete anything while a mount point lies at or below ``path`` —
    deleting through a bind mount would delete the mounted data (a volume). Directories on
    another device are refused too. A missing ``path`` is fine.
    """
    if not os.path.lexists(path):
        return
    busy = mounts_under(path)
    if busy:
        raise InUseError(f"cannot remove {path}: {busy[0]} is still mounted")
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent or "/", _OPEN_DIR & ~os.O_NOFOLLOW)
    except OSError as exc:
        raise StorageError(f"cannot remove {path}: {exc.strerror}") from exc
    try:
        _remove_at(pfd, name, path)
    except OSError as exc:
        raise StorageError(f"cannot remove {path}: {exc}") from exc
    finally:
        os.close(pfd)


def _remove_at(pfd: int, name: str, shown: str) -> None:
    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=pfd)
        return
    device = st.st_dev
    root = _open_dir_writable(pfd, name)
    # (fd, names still to look at); post-order, iterative (trees can be deep).
    stack: list[tuple[int, list[str]]] = [(root, _names(root))]
    try:
        while stack:
            fd, names = stack[-1]
            if not names:
                stack.pop()
                os.close(fd)
                if stack:
                    os.rmdir(_pending_name(stack), dir_fd=stack[-1][0])
                continue
            child = names[-1]
            try:
                cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                names.pop()
                continue
            if not stat.S_ISDIR(cst.st_mode):
                os.unlink(child, dir_fd=fd)
                names.pop()
                continue
            if cst.st_dev != device:
                raise InUseError(f"cannot remove {shown}: a mount point lies below it")
            cfd = _open_dir_writable(fd, child)
            # the child's name stays on the parent's list until the child is empty.
            stack.append((cfd, _names(cfd)))
    finally:
        for fd, _ in stack:
            os.close(fd)
    os.rmdir(name, dir_fd=pfd)


def _pending_name(stack: list[tuple[int, list[str]]]) -> str:
    return stack[-1][1].pop()


def _names(fd: int) -> list[str]:
    return os.listdir(fd)


def _open_dir_writable(pfd: int, name: str) -> int:
    """Open a directory (no follow) so that its entries can be listed and removed: as
    non-root, a directory we own but may not read or write is made 0700 first."""
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=pfd)
    except PermissionError:
        pathfd = os.open(name, _OPEN_PATH_DIR, dir_fd=pfd)
        try:
            os.chmod(f"/proc/self/fd/{pathfd}", 0o700)
            fd = os.open(".", _OPEN_DIR, dir_fd=pathfd)
        finally:
            os.close(pathfd)
    if os.geteuid() != 0 and os.fstat(fd).st_mode & 0o700 != 0o700:
        os.fchmod(fd, 0o700)
    return fd


# --- descriptor walks ------------------------------------------------------------------------

#: A directory entry: its name and its lstat.
Entry = tuple[str, os.stat_result]


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _xattr(target: int | str, name: str) -> bytes | None:
    """An xattr of an open descriptor, or of a path without following a final symlink."""
    try:
        if isinstance(target, int):
            return os.getxattr(target, name)
        return os.getxattr(target, name, follow_symlinks=False)
    except OSError:
        return None


def _scandir(fd: int) -> list[Entry]:
    """Entries of the directory ``fd`` with their lstat, sorted by name (as bytes). Entries
    that vanish while we look are left out."""
    items = []
    with os.scandir(fd) as it:
        for entry in it:
            try:
                items.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    items.sort(key=lambda item: os.fsencode(item[0]))
    return items


def _open_child_dir(fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _OPEN_DIR, dir_fd=fd)
    except OSError as exc:
        raise StorageError(
            f"cannot open {shown!r}: {exc.strerror} (changed while reading?)"
        ) from exc


def _open_root(path: str, what: str) -> int:
    try:
        return os.open(path, _OPEN_DIR)
    except OSError as exc:
        raise StorageError(f"cannot open {what} {path}: {exc.strerror}") from exc


def _list(fd: int, rel: str) -> Iterable[Entry]:
    return _scandir(fd)


def _is_dir(rel: str, st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)


def _walk(
    root_fd: int,
    *,
    enter: Callable[[int, str], Iterable[Entry]] = _list,
    descend: Callable[[str, os.stat_result], bool] = _is_dir,
) -> Iterator[tuple[int, str, str, os.stat_result]]:
    """Depth first below the open directory ``root_fd``: ``(parent fd, name, rel, lstat)``
    for each entry, ``rel`` relative to the root without ``./``, a directory before its
    contents. The caller keeps ``root_fd`` (and closes it); the walk closes the rest.

    ``enter(fd, rel)`` gives a directory's entries in the order to visit them (default: all,
    sorted by name); it is called for the root first, then for each directory the walk goes
    into, right after opening it. ``descend(rel, lstat)`` says whether to go into an entry
    (default: directories); it is asked once the caller has handled the entry. Iterative,
    with one descriptor open per level: trees can be deep.
    """
    # stack[0] is the root (the caller's descriptor); the walk opened the others.
    stack: list[tuple[int, str, Iterator[Entry]]] = [(root_fd, "", iter(enter(root_fd, "")))]
    try:
        while stack:
            fd, rel, it = stack[-1]
            item = next(it, None)
            if item is None:
                stack.pop()
                if stack:
                    os.close(fd)
                continue
            name, st = item
            crel = _join(rel, name)
            yield fd, name, crel, st
            if descend(crel, st):
                cfd = _open_child_dir(fd, name, crel)
                # On the stack before enter() runs, so that it is closed if enter() fails.
                stack.append((cfd, crel, iter(())))
                stack[-1] = (cfd, crel, iter(enter(cfd, crel)))
    finally:
        for fd, _, _ in stack[1:]:
            os.close(fd)
