"""The ``copy`` snapshot driver: the rootless fallback.

The composed image is materialised (reflinked where the filesystem can) into
``CDIR/rootfs`` and a compact manifest of what it held is kept, so changes are found by
comparing ``stat`` data, never by hashing. See ``docs/snapshots.md``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

from ocistore import compose
from ocistore.errors import StorageError
from ocistore.fsutil import atomic_write
from ocistore.snapshots.changes import (
    _WH_PREFIX,
    Change,
    ChangeKind,
    _dir_meta_differs,
    _sorted_changes,
    _TarWriter,
)
from ocistore.snapshots.driver import Availability, Layer, _begin, _remove_cdir, _require
from ocistore.snapshots.mounts import (
    Entry,
    _join,
    _open_child_dir,
    _open_root,
    _scandir,
    _walk,
    mounts_under,
    remove_tree,
)

# --- CDIR layout -----------------------------------------------------------------------------
#: the materialised root filesystem, the manifest taken right after, the file whose ctime
#: proves the clock moved past the manifest, and the "mounted" state marker.
ROOTFS, MANIFEST, STAMP, MOUNTED = "rootfs", "manifest", "stamp", "mounted"

_MANIFEST_MAGIC = b"ocistore copy-manifest 1\n"
# mode uid gid rdev size mtime_ns ctime_ns ino, then the path's length and bytes.
_RECORD = struct.Struct("<IIIQqqqQI")


@dataclass(frozen=True)
class _Rec:
    st_mode: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Rec:
        return cls(
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
        )


class _Manifest:
    """What ``CDIR/rootfs`` held right after it was materialised: path -> stat data (no
    content hashes). Stored as a zlib stream of fixed records plus path bytes."""

    def __init__(self, records: dict[str, _Rec]) -> None:
        self.records = records
        self.children: dict[str, list[str]] = {}
        for path in records:
            if path:
                parent, _, name = path.rpartition("/")
                self.children.setdefault(parent, []).append(name)

    @staticmethod
    def take(root: str) -> Iterator[Entry]:
        """Walk ``root`` (no symlink followed), parents first, names sorted."""
        root_fd = _open_root(root, "rootfs")
        try:
            yield "", os.fstat(root_fd)
            for _, _, rel, st in _walk(root_fd):
                yield rel, st
        finally:
            os.close(root_fd)

    @staticmethod
    def write(path: str, entries: Iterable[Entry]) -> int:
        """Write the manifest; returns the largest ctime recorded (ns)."""
        comp = zlib.compressobj(6)
        chunks = [_MANIFEST_MAGIC]
        newest = 0
        for rel, st in entries:
            raw = os.fsencode(rel)
            chunks.append(
                comp.compress(
                    _RECORD.pack(
                        st.st_mode,
                        st.st_uid,
                        st.st_gid,
                        st.st_rdev,
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ctime_ns,
                        st.st_ino,
                        len(raw),
                    )
                    + raw
                )
            )
            newest = max(newest, st.st_ctime_ns)
        chunks.append(comp.flush())
        atomic_write(path, b"".join(chunks), mode=0o600)
        return newest

    @classmethod
    def load(cls, path: str) -> _Manifest:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise StorageError(f"cannot read copy manifest {path}: {exc.strerror}") from exc
        if not data.startswith(_MANIFEST_MAGIC):
            raise StorageError(f"{path} is not a copy manifest")
        try:
            body = zlib.decompress(data[len(_MANIFEST_MAGIC) :])
        except zlib.error as exc:
            raise StorageError(f"copy manifest {path} is damaged: {exc}") from exc
        records: dict[str, _Rec] = {}
        pos, size = 0, _RECORD.size
        try:
            while pos < len(body):
                *fields, length = _RECORD.unpack_from(body, pos)
                pos += size
                rel = os.fsdecode(body[pos : pos + length])
                pos += length
                records[rel] = _Rec(*fields)
        except struct.error as exc:
            raise StorageError(f"copy manifest {path} is damaged: {exc}") from exc
        return cls(records)


def _nondir_changed(rec: _Rec, st: os.stat_result) -> bool:
    """Docker's rule (type, mode, owner, device, size, mtime) plus the inode and its ctime:
    the same inode untouched since the manifest was taken, or a change. ctime catches an
    in-place rewrite that restored size and mtime; a replaced file has another inode."""
    return rec != _Rec.of(st)


@dataclass
class _DirDiff:
    kind: ChangeKind | None
    deleted: list[str]


@dataclass
class _CopyDiff:
    changes: list[Change] = field(default_factory=list)
    #: directories to visit when exporting (changed, added, or holding changes).
    dirs: dict[str, _DirDiff] = field(default_factory=dict)
    #: added or changed non-directories.
    files: set[str] = field(default_factory=set)
    #: mount points (volumes) that the image does not have: exported as empty directories.
    mounts: set[str] = field(default_factory=set)
    size: int = 0


@dataclass
class _CopyFrame:
    fd: int
    rel: str
    kind: ChangeKind | None
    entries: list[tuple[str, os.stat_result]]
    deleted: list[str]
    index: int = 0
    changed: bool = False


class CopyDriver:
    """Rootless fallback: the composed image copied (reflinked where possible) into
    ``CDIR/rootfs``, with ``CDIR/manifest`` recording what it held. See
    ``docs/snapshots.md``."""

    name = "copy"

    def available(self, layers: Sequence[Layer]) -> Availability:
        return Availability(True)

    def rootfs(self, cdir: str) -> str:
        return os.path.join(cdir, ROOTFS)

    def prepare(self, layers: Sequence[Layer], cdir: str) -> str:
        _begin(cdir, self.name, (ROOTFS, MANIFEST, STAMP, MOUNTED))
        rootfs = self.rootfs(cdir)
        manifest = os.path.join(cdir, MANIFEST)
        try:
            compose.materialize(compose.ComposedTree(list(layers)), rootfs, reflink=True)
            newest = _Manifest.write(manifest, _Manifest.take(rootfs))
            _wait_past(os.path.join(cdir, STAMP), newest)
        except BaseException:
            for path in (rootfs, manifest, os.path.join(cdir, STAMP)):
                with contextlib.suppress(StorageError):
                    remove_tree(path)
            raise
        return rootfs

    def mount(self, cdir: str, layers: Sequence[Layer]) -> str:
        """Nothing to mount: the rootfs is always there. Only the state is recorded
        (``CDIR/mounted``), so that the lifecycle reads the same as overlay's."""
        _require(cdir, self.name)
        rootfs = self.rootfs(cdir)
        if not os.path.isdir(rootfs):
            raise StorageError(f"copy snapshot {cdir} has no rootfs")
        marker = os.path.join(cdir, MOUNTED)
        if not os.path.exists(marker):
            atomic_write(marker, b"", mode=0o644)
        return rootfs

    def umount(self, cdir: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(os.path.join(cdir, MOUNTED))

    def is_mounted(self, cdir: str) -> bool:
        return os.path.isfile(os.path.join(cdir, MOUNTED))

    def remove(self, cdir: str) -> None:
        _remove_cdir(cdir)

    def _diff(self, cdir: str) -> _CopyDiff:
        _require(cdir, self.name)
        manifest = _Manifest.load(os.path.join(cdir, MANIFEST))
        records = manifest.records
        rootfs = self.rootfs(cdir)
        real = os.path.realpath(rootfs)
        skip = {os.path.relpath(p, real) for p in mounts_under(real, include_self=False)}
        diff = _CopyDiff()
        inodes: set[int] = set()
        root_fd = _open_root(rootfs, "rootfs")
        stack: list[_CopyFrame] = []

        def frame(fd: int, rel: str, kind: ChangeKind | None, in_image: bool) -> _CopyFrame:
            entries = _scandir(fd)
            deleted: list[str] = []
            if in_image:
                present = {name for name, _ in entries}
                deleted = sorted(
                    (n for n in manifest.children.get(rel, ()) if n not in present),
                    key=os.fsencode,
                )
                for name in deleted:
                    diff.changes.append(Change("D", "/" + _join(rel, name)))
            return _CopyFrame(fd, rel, kind, entries, deleted, changed=bool(deleted))

        try:
            try:
                stack.append(frame(root_fd, "", None, "" in records))
            except BaseException:
                os.close(root_fd)
                raise
            while stack:
                fr = stack[-1]
                if fr.index < len(fr.entries):
                    name, st = fr.entries[fr.index]
                    fr.index += 1
                    rel = _join(fr.rel, name)
                    rec = records.get(rel)
                    if rel in skip:  # a mount point (volume): never looked into
                        if rec is None:
                            diff.changes.append(Change("A", "/" + rel))
                            diff.mounts.add(rel)
                            fr.changed = True
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        kind: ChangeKind | None = None
                        if rec is None:
                            kind = "A"
                        elif not stat.S_ISDIR(rec.st_mode) or _dir_meta_differs(rec, st):
                            kind = "C"
                        in_image = rec is not None and stat.S_ISDIR(rec.st_mode)
                        cfd = _open_child_dir(fr.fd, name, rel)
                        try:
                            stack.append(frame(cfd, rel, kind, in_image))
                        except BaseException:
                            os.close(cfd)
                            raise
                        continue
                    if rec is None or _nondir_changed(rec, st):
                        diff.changes.append(Change("A" if rec is None else "C", "/" + rel))
                        diff.files.add(rel)
                        fr.changed = True
                        if st.st_ino not in inodes:
                            inodes.add(st.st_ino)
                            diff.size += st.st_size
                    continue
                stack.pop()
                os.close(fr.fd)
                if fr.kind is None and fr.changed and fr.rel:
                    fr.kind = "C"
                if fr.kind is not None or fr.changed:
                    diff.dirs[fr.rel] = _DirDiff(fr.kind, fr.deleted)
                if fr.kind is not None and fr.rel:
                    diff.changes.append(Change(fr.kind, "/" + fr.rel))
                if stack and (fr.kind is not None or fr.changed):
                    stack[-1].changed = True
        except OSError as exc:
            raise StorageError(f"cannot read the changes of {cdir}: {exc}") from exc
        finally:
            for fr in stack:
                os.close(fr.fd)
        diff.changes = _sorted_changes(diff.changes)
        return diff

    def changes(self, cdir: str, layers: Sequence[Layer]) -> list[Change]:
        """``docker diff`` by comparing ``rootfs`` with the manifest (see ``_diff``)."""
        return self._diff(cdir).changes

    def writable_size(self, cdir: str) -> int:
        """Bytes of the added and changed non-directories (each inode once)."""
        return self._diff(cdir).size

    def export_changes(self, cdir: str, layers: Sequence[Layer], out: IO[bytes]) -> None:
        """Added/changed entries with their metadata, the directories holding them, and a
        ``.wh.NAME`` for each deleted path (explicit whiteouts, as the OCI spec prefers; a
        directory deleted and recreated gets a whiteout per vanished child)."""
        diff = self._diff(cdir)
        writer = _TarWriter(out)
        if "" not in diff.dirs:
            writer.close()
            return
        root_fd = _open_root(self.rootfs(cdir), "rootfs")

        def enter(fd: int, rel: str) -> list[Entry]:
            if diff.dirs[rel].kind is not None:
                writer.directory(rel, fd)
            for name in diff.dirs[rel].deleted:
                writer.marker(rel, _WH_PREFIX + name)
            return _scandir(fd)

        def descend(rel: str, st: os.stat_result) -> bool:
            return rel in diff.dirs

        try:
            for fd, name, rel, st in _walk(root_fd, enter=enter, descend=descend):
                if rel in diff.files:
                    writer.nondirectory(fd, name, rel, st, check_metacopy=False)
                elif rel in diff.mounts:
                    writer.empty_directory(rel)
            writer.close()
        except OSError as exc:
            raise StorageError(f"cannot export the changes of {cdir}: {exc}") from exc
        finally:
            os.close(root_fd)


def _wait_past(stamp: str, newest_ns: int, timeout: float = 2.0) -> None:
    """Return once the filesystem clock has moved past ``newest_ns``, so that any later
    write gives a ctime the manifest cannot hold (kernel timestamps are coarse: a write in
    the same tick as the manifest would otherwise keep the recorded ctime)."""
    deadline = time.monotonic() + timeout
    with open(stamp, "wb"):
        pass
    while True:
        os.utime(stamp)
        if os.stat(stamp).st_ctime_ns > newest_ns or time.monotonic() > deadline:
            return
        time.sleep(0.001)
