"""Stream an image's composed root filesystem as one PAX tar (``ocistore export``).

Apart from :mod:`ocistore.compose`, which the commands that only compose (``create``,
``ls``, ``rootfs``) use alone. Headers come from :mod:`ocistore.tarwriter` (tarfile's
bytes, at a fraction of its cost). See ``docs/compose.md``.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from typing import IO

from ocistore import tarwriter as tw
from ocistore.compose import ComposedTree, kept_xattr
from ocistore.errors import StorageError

__all__ = ["export_tar"]

_OPEN_SOURCE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NS = 1_000_000_000
# From this size a file's bytes go from the page cache to ``out`` with sendfile(2), not
# through a Python bytes object (two copies); below it one read and a buffered write win.
_SENDFILE_MIN = 1 << 20
# sendfile(2) cannot write to this kind of output: fall back to read and write.
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})

_TAR_TYPES = {
    stat.S_IFREG: tw.REGTYPE,
    stat.S_IFDIR: tw.DIRTYPE,
    stat.S_IFLNK: tw.SYMTYPE,
    stat.S_IFCHR: tw.CHRTYPE,
    stat.S_IFBLK: tw.BLKTYPE,
    stat.S_IFIFO: tw.FIFOTYPE,
}


def export_tar(tree: ComposedTree, out: IO[bytes]) -> None:
    """Write the composed tree to ``out`` as one PAX tar, streamed from the layer
    directories (nothing is built on disk). The root is the entry ``./``; hardlinks of one
    layer are ``LNKTYPE`` members; whiteouts never appear; xattrs (``user.*``,
    ``security.capability``) are ``SCHILY.xattr.*`` records; mtimes keep nanoseconds."""
    links: dict[tuple[int, int, int], str] = {}
    written = 0
    sink = _sendfile_sink(out)  # None: not a plain descriptor, or sendfile refused it
    for node in tree.walk():
        st = node.stat
        kind = _TAR_TYPES.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            continue  # sockets: tar has no type for them
        mtime = st.st_mtime_ns
        pax: dict[str, str] = {}
        if mtime % _NS:
            pax["mtime"] = tw.pax_time(mtime)
        size = 0
        linkname = ""
        if kind != tw.DIRTYPE and st.st_nlink > 1:
            key = (node.layer, st.st_dev, st.st_ino)
            first = links.get(key)
            if first is None:
                links[key] = node.path
            else:
                kind = tw.LNKTYPE
                linkname = first
        if kind == tw.REGTYPE:
            size = st.st_size
        elif kind == tw.SYMTYPE:
            linkname = _read_link(node.source)
        # A file with data is opened once: its xattrs and its bytes are read through that
        # descriptor, not by path twice.
        fd = _open(node.source) if size else None
        try:
            if kind in (tw.REGTYPE, tw.DIRTYPE):
                _xattr_records(node.source if fd is None else fd, node.source, pax)
            header = tw.pax_header(
                node.path or ".",
                kind,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                size=size,
                mtime=mtime // _NS,
                linkname=linkname,
                devmajor=os.major(st.st_rdev),
                devminor=os.minor(st.st_rdev),
                pax=pax,
            )
            out.write(header)
            written += len(header)
            if fd is not None:
                if sink is not None and size >= _SENDFILE_MIN:
                    out.flush()  # what is buffered comes first
                    if not _send_file(fd, sink, node.source, size):
                        sink = None
                        tw.copy_data(fd, size, out.write, node.source)
                else:
                    tw.copy_data(fd, size, out.write, node.source)
                written += size
                pad = -size % tw.BLOCK
                if pad:
                    out.write(bytes(pad))
                    written += pad
        finally:
            if fd is not None:
                os.close(fd)
    # Two zero blocks end the archive; pad to a whole record as tar(1) does.
    end = 2 * tw.BLOCK
    end += -(written + end) % tw.RECORD
    out.write(bytes(end))


def _read_link(source: str) -> str:
    try:
        return os.readlink(source)
    except OSError as exc:
        raise StorageError(f"cannot read symlink {source}: {exc.strerror}") from exc


def _xattr_records(target: str | int, source: str, pax: dict[str, str]) -> None:
    """``pax`` gets the kept xattrs of ``target``: a path (not followed) or a descriptor."""
    try:
        if isinstance(target, int):
            names = os.listxattr(target)
        else:
            names = os.listxattr(target, follow_symlinks=False)
        for attr in sorted(names):
            if kept_xattr(attr):
                if isinstance(target, int):
                    value = os.getxattr(target, attr)
                else:
                    value = os.getxattr(target, attr, follow_symlinks=False)
                pax["SCHILY.xattr." + attr] = value.decode("utf-8", "surrogateescape")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise StorageError(f"cannot read xattrs of {source}: {exc.strerror}") from exc


def _open(source: str) -> int:
    try:
        return os.open(source, _OPEN_SOURCE)
    except OSError as exc:
        raise StorageError(f"cannot open {source}: {exc.strerror}") from exc


def _sendfile_sink(out: IO[bytes]) -> int | None:
    """The descriptor behind ``out`` if sendfile(2) may write to it directly: a plain
    file object (``open()``'s, ``sys.stdout.buffer``) on a blocking descriptor. A wrapper
    that transforms what is written (``gzip.GzipFile``...) may pass its file's ``fileno``
    through, and a socket with a timeout is non-blocking: both get ``out.write``."""
    raw: object = out
    if type(out) in (io.BufferedWriter, io.BufferedRandom):
        raw = out.raw  # type: ignore[attr-defined]  # IO[bytes] does not declare it
    if type(raw) is not io.FileIO:
        return None
    try:
        fd = raw.fileno()
        return fd if os.get_blocking(fd) else None
    except (OSError, ValueError):
        return None


def _send_file(fd: int, sink: int, source: str, size: int) -> bool:
    """Send exactly ``size`` bytes of ``fd`` to ``sink``; False if sendfile(2) cannot
    write there (nothing was sent then)."""
    sent = 0
    while sent < size:
        try:
            n = os.sendfile(sink, fd, sent, size - sent)
        except BrokenPipeError:
            raise  # the reader went away: as out.write says it
        except OSError as exc:
            if sent == 0 and exc.errno in _NO_SENDFILE:
                return False
            raise StorageError(f"cannot export {source}: {exc.strerror}") from exc
        if n == 0:
            raise StorageError(f"{source} changed size while being exported")
        sent += n
    return True
