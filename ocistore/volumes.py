"""Volumes: directories outside the layer store, bind-mounted into a container's rootfs.

A volume ``NAME`` is ``VOLROOT/NAME/_data`` (``VOLROOT`` is ``ROOT/volumes``); it is never
part of a layer, a diff or a commit. This module holds the mechanics only: which container
uses which volume is recorded by the caller (the metadata database).

Mount points are found inside the rootfs the way a chroot would see them: symlinks in the
image are followed *inside* the rootfs (an absolute target is relative to the rootfs, ``..``
stops at its root), one component at a time through ``O_PATH|O_NOFOLLOW`` descriptors, so
no symlink can redirect a mount point to the host. The bind mount is made on that very
descriptor (``/proc/self/fd/N``, not canonicalised), so swapping a path component between
the lookup and the mount does not help either. See ``docs/snapshots.md``.
"""

from __future__ import annotations

import builtins
import os
import re
import stat
from collections import deque

from ocistore.errors import MountError, StorageError, UsageError
from ocistore.snapshots import mount_points, remove_tree, run_mount

__all__ = [
    "ResolvedPath",
    "bind",
    "create",
    "is_bound",
    "list",
    "path",
    "remove",
    "resolve_in_root",
    "unbind",
    "validate_name",
]

DATA = "_data"
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_MAX_NAME = 255
#: Most symlinks followed while resolving one mount point (Linux's MAXSYMLINKS).
MAX_SYMLINKS = 40

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def validate_name(name: str) -> str:
    """``name`` if it is a valid volume name (``[a-zA-Z0-9][a-zA-Z0-9_.-]*``, at most 255
    characters), else :class:`UsageError`."""
    if not (_NAME.fullmatch(name) and len(name) <= _MAX_NAME and name.isascii()):
        raise UsageError(
            f"invalid volume name {name!r}: letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def path(volroot: str, name: str) -> str:
    """``VOLROOT/NAME/_data`` (the name is validated; existence is not checked)."""
    return os.path.join(volroot, validate_name(name), DATA)


def create(volroot: str, name: str) -> str:
    """Create volume ``name`` if it does not exist (idempotent); returns its data path."""
    data = path(volroot, name)
    try:
        os.makedirs(volroot, mode=0o701, exist_ok=True)
        for directory in (os.path.dirname(data), data):
            try:
                os.mkdir(directory, 0o755)
            except FileExistsError:
                if os.path.islink(directory) or not os.path.isdir(directory):
                    raise StorageError(f"{directory} exists and is not a directory") from None
    except OSError as exc:
        raise StorageError(f"cannot create volume {name!r}: {exc}") from exc
    return data


def list(volroot: str) -> builtins.list[str]:
    """Names of the volumes under ``volroot`` (directories with a valid name and a
    ``_data`` directory), sorted."""
    try:
        entries = os.listdir(volroot)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot list volumes in {volroot}: {exc.strerror}") from exc
    names = []
    for name in entries:
        if not (_NAME.fullmatch(name) and name.isascii()):
            continue
        data = os.path.join(volroot, name, DATA)
        if os.path.isdir(data) and not os.path.islink(data):
            names.append(name)
    return sorted(names)


def remove(volroot: str, name: str) -> None:
    """Delete volume ``name`` and its data (a missing volume is fine). Refuses with
    ``InUseError`` while anything is mounted inside it; never follows a symlink."""
    remove_tree(os.path.join(volroot, validate_name(name)))


# --- mount points inside a rootfs ------------------------------------------------------------


def _close(fds: builtins.list[int]) -> None:
    while fds:
        os.close(fds.pop())


class ResolvedPath:
    """The final component of a resolved path: its parent directory (an O_PATH descriptor)
    and its name there, plus an O_PATH descriptor of the entry itself."""

    def __init__(self, parent_fd: int, name: str, fd: int, shown: str) -> None:
        self.parent_fd = parent_fd
        self.name = name
        self.fd = fd
        self.shown = shown

    def reopen(self) -> int:
        """A new O_PATH descriptor of the entry (crossing into whatever is mounted on it)."""
        return os.open(self.name, _O_PATH_NOFOLLOW, dir_fd=self.parent_fd)

    def host_path(self) -> str:
        return os.readlink(f"/proc/self/fd/{self.fd}")

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.parent_fd)


def resolve_in_root(
    rootfs: str, target: str, *, create: bool = False, directory: bool | None = None
) -> ResolvedPath | None:
    """Find ``target`` (a path in the container) below ``rootfs`` as the container sees it.

    Symlinks are followed inside ``rootfs`` only (absolute ones restart at ``rootfs``,
    ``..`` never climbs above it); no lookup ever leaves it. With ``create``, missing
    directories are made (0755) and a missing final component becomes a directory, or an
    empty file when ``directory`` is False. ``directory`` True / False also requires the
    final entry to be a directory / a non-directory (None: anything). Returns None when
    something is missing and not ``create``. The caller closes the result.
    """
    parts = [p for p in target.split("/") if p and p != "."]
    if not parts or all(p == ".." for p in parts):
        raise UsageError(f"invalid mount point {target!r}: it names the container's root")
    try:
        root_fd = os.open(rootfs, _O_PATH_DIR)
    except OSError as exc:
        raise StorageError(f"cannot open rootfs {rootfs}: {exc.strerror}") from exc
    stack = [root_fd]  # descriptors of the directories resolved so far
    pending = deque(parts)
    links = 0
    try:
        while pending:
            name = pending.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            here = stack[-1]
            last = not pending
            try:
                st = os.stat(name, dir_fd=here, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    return None
                if last and directory is False:
                    os.close(
                        os.open(
                            name,
                            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                            0o644,
                            dir_fd=here,
                        )
                    )
                else:
                    os.mkdir(name, 0o755, dir_fd=here)
                st = os.stat(name, dir_fd=here, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise MountError(f"mount point {target!r}: too many levels of symlinks")
                link = os.readlink(name, dir_fd=here)
                if link.startswith("/"):
                    _close(stack[1:])
                    del stack[1:]
                pending.extendleft(reversed(link.split("/")))
                continue
            if last:
                if directory is True and not stat.S_ISDIR(st.st_mode):
                    raise MountError(f"mount point {target!r} exists and is not a directory")
                if directory is False and stat.S_ISDIR(st.st_mode):
                    raise MountError(f"mount point {target!r} is a directory, the source a file")
                fd = os.open(name, _O_PATH_NOFOLLOW, dir_fd=here)
                parent = stack.pop()
                return ResolvedPath(parent, name, fd, target)
            if not stat.S_ISDIR(st.st_mode):
                raise MountError(f"mount point {target!r}: {name!r} is not a directory")
            stack.append(os.open(name, _O_PATH_DIR | os.O_NOFOLLOW, dir_fd=here))
        # Only ".." components were left: the root itself.
        raise UsageError(f"invalid mount point {target!r}: it names the container's root")
    except OSError as exc:
        raise StorageError(f"cannot resolve mount point {target!r} in {rootfs}: {exc}") from exc
    finally:
        _close(stack)


def _mounted(resolved: ResolvedPath) -> bool:
    return resolved.host_path() in set(mount_points())


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise MountError(f"{what}: bind mounts need root (running as uid {os.geteuid()})")


def bind(src: str, rootfs: str, target_in_container: str, readonly: bool) -> str:
    """Bind-mount ``src`` (a volume's ``_data``, or any host directory or file) at
    ``target_in_container`` inside ``rootfs``; read-only when ``readonly``. The mount point
    is created if missing (see :func:`resolve_in_root`). Returns the mount point's host
    path."""
    what = f"cannot mount {src} at {target_in_container}"
    _need_root(what)
    try:
        src_st = os.stat(src)
    except OSError as exc:
        raise MountError(f"{what}: {exc.strerror}") from exc
    resolved = resolve_in_root(
        rootfs, target_in_container, create=True, directory=stat.S_ISDIR(src_st.st_mode)
    )
    assert resolved is not None
    try:
        host = resolved.host_path()
        run_mount(
            ["mount", "--bind", "--no-canonicalize", src, f"/proc/self/fd/{resolved.fd}"],
            what,
            pass_fds=(resolved.fd,),
        )
        if readonly:
            # The old descriptor names the directory under the new mount; remounting it
            # would change the rootfs mount. A fresh lookup lands on the bind mount.
            top = resolved.reopen()
            try:
                run_mount(
                    ["mount", "-o", "remount,bind,ro", "--no-canonicalize", f"/proc/self/fd/{top}"],
                    f"{what} read-only",
                    pass_fds=(top,),
                )
            except MountError:
                run_mount(
                    ["umount", "--lazy", "--no-canonicalize", f"/proc/self/fd/{top}"],
                    f"{what}: cannot undo the mount",
                    pass_fds=(top,),
                )
                raise
            finally:
                os.close(top)
    finally:
        resolved.close()
    return host


def is_bound(rootfs: str, target_in_container: str) -> bool:
    """Whether something is mounted at ``target_in_container`` inside ``rootfs``."""
    resolved = resolve_in_root(rootfs, target_in_container)
    if resolved is None:
        return False
    try:
        return _mounted(resolved)
    finally:
        resolved.close()


def unbind(rootfs: str, target_in_container: str) -> None:
    """Unmount what :func:`bind` mounted at ``target_in_container`` (nothing mounted is
    fine). The mount is detached through a descriptor of the resolved mount point
    (``umount --lazy``): no path is looked up again, and processes still using the volume
    keep it until they let go."""
    what = f"cannot unmount {target_in_container}"
    _need_root(what)
    for _ in range(16):  # a point bound twice holds two mounts
        resolved = resolve_in_root(rootfs, target_in_container)
        if resolved is None:
            return
        try:
            if not _mounted(resolved):
                return
            run_mount(
                ["umount", "--lazy", "--no-canonicalize", f"/proc/self/fd/{resolved.fd}"],
                what,
                pass_fds=(resolved.fd,),
            )
        finally:
            resolved.close()
    raise MountError(f"{what}: still mounted")
