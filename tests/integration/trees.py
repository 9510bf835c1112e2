"""Snapshots of directory trees, for comparing what ocistore wrote with an oracle's.

A snapshot maps each relative path (bytes) to a tuple describing the entry: type, mode,
owner, size, content hash, symlink target, ``user.*`` xattrs, mtime, and a hardlink-group
id. Layer directories hold whiteouts in one of two forms; ``normalise_whiteouts`` maps the
overlayfs-native form (0/0 char device, ``trusted.overlay.opaque``) to the OCI ``.wh.``
form so that both compare with a plain ``tar -x`` of the same layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from dataclasses import dataclass

WHITEOUT = ("whiteout",)


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    sha256: str | None
    target: bytes | None
    xattrs: tuple[tuple[str, bytes], ...]
    mtime: int | None  # seconds; None for directories (implicit parents differ)
    link_group: int | None  # the smallest path index sharing this inode, if nlink > 1


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "dir"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown"


def _user_xattrs(path: bytes) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        if name.startswith("user."):
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
    return tuple(out)


def snapshot(root: str | os.PathLike[str], *, whiteouts: str = "oci") -> dict[bytes, object]:
    """Describe every entry below ``root``. With ``whiteouts="overlay"`` the overlay form is
    rewritten to ``.wh.`` names first, so the result compares with an OCI-form tree."""
    base = os.fsencode(os.fspath(root))
    entries: dict[bytes, object] = {}
    inodes: dict[tuple[int, int], bytes] = {}
    members: dict[int, list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, base)
        for name in sorted(dirnames + filenames) + ([b"."] if dirpath == base else []):
            full = os.path.join(dirpath, name) if name != b"." else dirpath
            rel = os.path.normpath(os.path.join(rel_dir, name)) if name != b"." else b"."
            st = os.lstat(full)
            kind = _kind(st.st_mode)
            if whiteouts == "overlay":
                if kind == "char" and st.st_rdev == 0:
                    entries[os.path.join(os.path.dirname(rel), b".wh." + os.path.basename(rel))] = (
                        WHITEOUT
                    )
                    continue
                if kind == "dir":
                    try:
                        opaque = os.getxattr(full, "trusted.overlay.opaque")
                    except OSError:
                        opaque = b""
                    if opaque == b"y":
                        entries[os.path.normpath(os.path.join(rel, b".wh..wh..opq"))] = WHITEOUT
            if kind == "file" and os.path.basename(rel).startswith(b".wh."):
                entries[rel] = WHITEOUT
                continue
            digest = None
            if kind == "file":
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                digest = h.hexdigest()
            group = None
            if kind != "dir" and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                inodes.setdefault(key, rel)
                group = hash(inodes[key])
                members.setdefault(group, []).append(rel)
            entries[rel] = Entry(
                kind=kind,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                size=st.st_size if kind == "file" else 0,
                sha256=digest,
                target=os.readlink(full) if kind == "symlink" else None,
                xattrs=_user_xattrs(full),
                mtime=None if kind in ("dir", "symlink") else int(st.st_mtime),
                link_group=group,
            )
    # A "group" of one visible name is no group: the other names may be hidden by a
    # whiteout (overlayfs still reports the lower inode's link count), or outside the tree.
    for paths in members.values():
        if len(paths) == 1:
            entry = entries[paths[0]]
            assert isinstance(entry, Entry)
            entries[paths[0]] = dataclasses.replace(entry, link_group=None)
    return entries


def diff(a: dict[bytes, object], b: dict[bytes, object], limit: int = 20) -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    out = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            out.append(f"{path!r}: {a.get(path)} != {b.get(path)}")
            if len(out) >= limit:
                break
    return out
