"""Stream an image's composed root filesystem as one PAX tar (``ocistore export``).

Apart from :mod:`ocistore.compose` so that the commands which only compose (``create``,
``ls``, ``rootfs``) do not import ``tarfile``. See ``docs/compose.md``.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from typing import IO

from ocistore.compose import CHUNK_SIZE, ComposedTree, kept_xattr
from ocistore.errors import StorageError

__all__ = ["export_tar"]

_OPEN_SOURCE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NS = 1_000_000_000

_TAR_TYPES = {
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}


def export_tar(tree: ComposedTree, out: IO[bytes]) -> None:
    """Write the composed tree to ``out`` as one PAX tar, streamed from the layer
    directories (nothing is built on disk). The root is the entry ``./``; hardlinks of one
    layer are ``LNKTYPE`` members; whiteouts never appear; xattrs (``user.*``,
    ``security.capability``) are ``SCHILY.xattr.*`` records; mtimes keep nanoseconds."""
    links: dict[tuple[int, int, int], str] = {}
    written = 0
    for node in tree.walk():
        st = node.stat
        kind = _TAR_TYPES.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            continue  # sockets: tar has no type for them
        info = tarfile.TarInfo(node.path or ".")
        info.type = kind
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid = st.st_uid
        info.gid = st.st_gid
        info.uname = info.gname = ""
        mtime = st.st_mtime_ns
        info.mtime = mtime // _NS
        pax: dict[str, str] = {}
        if mtime % _NS:
            pax["mtime"] = _pax_time(mtime)
        size = 0
        if kind != tarfile.DIRTYPE and st.st_nlink > 1:
            key = (node.layer, st.st_dev, st.st_ino)
            first = links.get(key)
            if first is None:
                links[key] = node.path
            else:
                info.type = kind = tarfile.LNKTYPE
                info.linkname = first
        if kind == tarfile.REGTYPE:
            size = info.size = st.st_size
        elif kind == tarfile.SYMTYPE:
            info.linkname = _read_link(node.source)
        elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor = os.major(st.st_rdev)
            info.devminor = os.minor(st.st_rdev)
        if kind in (tarfile.REGTYPE, tarfile.DIRTYPE):
            _xattr_records(node.source, pax)
        if pax:
            info.pax_headers = pax
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        out.write(header)
        written += len(header)
        if size:
            _stream_file(node.source, size, out)
            written += size
            pad = -size % tarfile.BLOCKSIZE
            if pad:
                out.write(b"\0" * pad)
                written += pad
    # Two zero blocks end the archive; pad to a whole record as tar(1) does.
    end = 2 * tarfile.BLOCKSIZE
    end += -(written + end) % tarfile.RECORDSIZE
    out.write(b"\0" * end)


def _pax_time(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    whole, frac = divmod(abs(ns), _NS)
    return f"{sign}{whole}.{frac:09d}".rstrip("0")


def _read_link(source: str) -> str:
    try:
        return os.readlink(source)
    except OSError as exc:
        raise StorageError(f"cannot read symlink {source}: {exc.strerror}") from exc


def _xattr_records(source: str, pax: dict[str, str]) -> None:
    try:
        names = os.listxattr(source, follow_symlinks=False)
        for attr in sorted(names):
            if kept_xattr(attr):
                value = os.getxattr(source, attr, follow_symlinks=False)
                pax["SCHILY.xattr." + attr] = value.decode("utf-8", "surrogateescape")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise StorageError(f"cannot read xattrs of {source}: {exc.strerror}") from exc


def _stream_file(source: str, size: int, out: IO[bytes]) -> None:
    """Write exactly ``size`` bytes of ``source`` to ``out`` (the size its header gave)."""
    try:
        fd = os.open(source, _OPEN_SOURCE)
    except OSError as exc:
        raise StorageError(f"cannot open {source}: {exc.strerror}") from exc
    try:
        left = size
        while left:
            try:
                data = os.read(fd, min(left, CHUNK_SIZE))
            except OSError as exc:
                raise StorageError(f"cannot read {source}: {exc.strerror}") from exc
            if not data:
                raise StorageError(f"{source} changed size while being exported")
            out.write(data)
            left -= len(data)
    finally:
        os.close(fd)
