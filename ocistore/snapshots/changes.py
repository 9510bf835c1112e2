"""A container's changes: the ``docker diff`` list and the OCI layer tar that commit stores.

Both drivers report :class:`Change` lists in docker's order and by docker's rules, and write
their changes through :class:`_TarWriter`; how each finds its changes is the driver's own
(``overlay.py`` reads the upper directory, ``copy.py`` compares with its manifest).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any, Literal, Protocol

from ocistore import tarwriter as tw
from ocistore.compose import kept_xattr
from ocistore.errors import StorageError
from ocistore.snapshots.mounts import _OPEN_FILE, _join, _xattr

_WH_PREFIX = ".wh."
_WH_OPAQUE = ".wh..wh..opq"
_METACOPY_XATTR = "trusted.overlay.metacopy"
_NS = 1_000_000_000


# --- the change list -------------------------------------------------------------------------

ChangeKind = Literal["A", "C", "D"]


@dataclass(frozen=True)
class Change:
    """One line of ``docker diff``: A added, C changed, D deleted; ``path`` is absolute in
    the container ("/etc/passwd")."""

    kind: ChangeKind
    path: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def _path_key(path: str) -> list[bytes]:
    return os.fsencode(path).split(b"/")


def _sorted_changes(changes: Iterable[Change]) -> list[Change]:
    """docker diff order: by path, component by component (parents before children)."""
    return sorted(changes, key=lambda c: _path_key(c.path))


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class _StatLike(Protocol):
    @property
    def st_mode(self) -> int: ...

    @property
    def st_uid(self) -> int: ...

    @property
    def st_gid(self) -> int: ...


def _dir_meta_differs(a: _StatLike, b: _StatLike) -> bool:
    """Docker's rule for directories: type, mode, owner (never size or mtime)."""
    return (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid)


# --- the tar writer --------------------------------------------------------------------------


class _TarWriter:
    """Writes an OCI layer tar (uncompressed, PAX) to a stream, entry by entry.

    Names are relative without ``./``; owner names are empty; metadata is the entry's own
    (mode, numeric owner, mtime to the nanosecond, ``user.*`` and ``security.capability``
    xattrs). A non-directory seen again through another name (same inode) becomes a
    hardlink to the first name written. Whiteout markers are empty 0644 files owned by
    0:0 with mtime 0, so the same changes give the same bytes. Headers are tarfile's bytes
    (:mod:`ocistore.tarwriter`), so the layers are those tarfile's stream mode wrote.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.written = 0
        self.closed = False
        self.links: dict[tuple[int, int], str] = {}

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.written += len(data)

    def close(self) -> None:
        """Two zero blocks end the archive, padded to a whole record as tar(1) does (once,
        as tarfile's close)."""
        if self.closed:
            return
        self.closed = True
        end = 2 * tw.BLOCK
        self._write(bytes(end + -(self.written + end) % tw.RECORD))

    def _add(self, rel: str, kind: bytes, st: os.stat_result, **fields: Any) -> None:
        seconds, frac = divmod(st.st_mtime_ns, _NS)
        pax: dict[str, str] = fields.pop("pax", {})
        if frac or not 0 <= seconds < 8**11:
            pax = {"mtime": tw.pax_time(st.st_mtime_ns), **pax}
        self._write(
            tw.pax_header(
                rel,
                kind,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime=seconds,
                pax=pax,
                **fields,
            )
        )

    @staticmethod
    def _xattrs(fd: int) -> dict[str, str]:
        try:
            names = os.listxattr(fd)
        except OSError:
            return {}
        pax = {}
        for name in sorted(names):
            if kept_xattr(name):
                value = _xattr(fd, name)
                if value is not None:
                    pax["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
        return pax

    @staticmethod
    def _check_name(rel: str) -> None:
        """A real entry named ``.wh.*`` would read as a whiteout once applied (the OCI spec
        says such names cannot exist in a layer): refuse rather than silently delete."""
        if rel.rpartition("/")[2].startswith(_WH_PREFIX):
            raise StorageError(
                f"cannot export /{rel}: names starting with {_WH_PREFIX!r} cannot be stored in "
                "an OCI layer (they mean deletions); rename or remove it"
            )

    def marker(self, rel_dir: str, base: str) -> None:
        self._write(tw.pax_header(_join(rel_dir, base), tw.REGTYPE, mode=0o644))

    def directory(self, rel: str, fd: int) -> None:
        self._check_name(rel)
        self._add(rel, tw.DIRTYPE, os.fstat(fd), pax=self._xattrs(fd))

    def empty_directory(self, rel: str) -> None:
        """A directory we cannot look at (a mount point): 0755, 0:0, mtime 0."""
        self._check_name(rel)
        self._write(tw.pax_header(rel, tw.DIRTYPE, mode=0o755))

    def nondirectory(
        self, parent_fd: int, name: str, rel: str, st: os.stat_result, *, check_metacopy: bool
    ) -> None:
        mode = st.st_mode
        if stat.S_ISSOCK(mode) or _is_whiteout(st):
            # tar cannot hold sockets (docker skips them too); a 0/0 char device made in a
            # copy rootfs would read as a whiteout, and unpack rejects it.
            return
        self._check_name(rel)
        key = (st.st_dev, st.st_ino)
        first = self.links.get(key) if st.st_nlink > 1 else None
        if first is not None:
            self._write(
                tw.pax_header(
                    rel,
                    tw.LNKTYPE,
                    linkname=first,
                    mode=stat.S_IMODE(mode),
                    uid=st.st_uid,
                    gid=st.st_gid,
                    mtime=st.st_mtime_ns // _NS,
                )
            )
            return
        if stat.S_ISREG(mode):
            self._regular(parent_fd, name, rel, check_metacopy)
        elif stat.S_ISLNK(mode):
            self._add(rel, tw.SYMTYPE, st, linkname=os.readlink(name, dir_fd=parent_fd))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            self._add(
                rel,
                tw.CHRTYPE if stat.S_ISCHR(mode) else tw.BLKTYPE,
                st,
                devmajor=os.major(st.st_rdev),
                devminor=os.minor(st.st_rdev),
            )
        elif stat.S_ISFIFO(mode):
            self._add(rel, tw.FIFOTYPE, st)
        else:  # pragma: no cover - no other file types on Linux
            return
        if st.st_nlink > 1:
            self.links[key] = rel

    def _regular(self, parent_fd: int, name: str, rel: str, check_metacopy: bool) -> None:
        try:
            fd = os.open(name, _OPEN_FILE, dir_fd=parent_fd)
        except OSError as exc:
            raise StorageError(
                f"cannot read {rel!r}: {exc.strerror} (changed while reading?)"
            ) from exc
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                raise StorageError(f"{rel!r} changed while it was being exported")
            if check_metacopy and _xattr(fd, _METACOPY_XATTR) is not None:
                raise StorageError(
                    f"{rel!r} is an overlay metacopy (its data lives in a lower layer); "
                    "mount with metacopy=off"
                )
            size = fst.st_size
            self._add(rel, tw.REGTYPE, fst, size=size, pax=self._xattrs(fd))
            tw.copy_data(fd, size, self._write, repr(rel))
            if size % tw.BLOCK:
                self._write(bytes(tw.BLOCK - size % tw.BLOCK))
        finally:
            os.close(fd)
