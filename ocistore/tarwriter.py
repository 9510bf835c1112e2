"""Tar members for the streams ocistore writes (``export``, ``commit``): headers and data.

``pax_header`` returns, byte for byte, what ``tarfile.TarInfo.tobuf(tarfile.PAX_FORMAT,
"utf-8", "surrogateescape")`` returns for the same member (a test compares the two over
thousands of random members): a ustar header, preceded by a PAX extended header when a
field does not fit ustar. tarfile builds each header through a dict of fields, a ``sum()``
over 512 unpacked bytes for the checksum and a string encode per field; that was half of
the time ``ocistore export`` took. Here the common header is one ``%`` format, and the
checksum is the reader's :func:`~ocistore.tarreader.block_sum`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from ocistore.errors import StorageError
from ocistore.tarreader import (
    BLKTYPE,
    BLOCK,
    CHRTYPE,
    DIRTYPE,
    FIFOTYPE,
    LNKTYPE,
    REGTYPE,
    SYMTYPE,
    block_sum,
)

__all__ = [
    "BLKTYPE",
    "BLOCK",
    "CHRTYPE",
    "DIRTYPE",
    "FIFOTYPE",
    "LNKTYPE",
    "RECORD",
    "REGTYPE",
    "SYMTYPE",
    "copy_data",
    "pax_header",
    "pax_time",
]

RECORD = 20 * BLOCK  # tar(1) pads an archive to a whole record
_CHUNK = 1 << 20
XHDTYPE = b"x"

_MAX_ID = 8**7  # 7 octal digits: uid, gid, device numbers
_MAX_BIG = 8**11  # 11 octal digits: size, mtime
_EMPTY_DEVICE = bytes(8)
_NUL100 = bytes(100)
_NUL32 = bytes(32)
_USTAR = b"%s%07o\0%07o\0%07o\0%011o\0%011o\0        %s%sustar\x0000%s%s%s%s" + bytes(155 + 12)


def pax_header(
    name: str,
    kind: bytes,
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    size: int = 0,
    mtime: int = 0,
    linkname: str = "",
    uname: str = "",
    gname: str = "",
    devmajor: int = 0,
    devminor: int = 0,
    pax: dict[str, str] | None = None,
) -> bytes:
    """The header block(s) of one member, as tarfile writes them in PAX format with UTF-8.

    ``pax`` records come first, in their order, then what does not fit ustar (a long or
    non-ASCII ``path``/``linkpath``/``uname``/``gname``, an out-of-range ``uid``, ``gid``,
    ``size`` or ``mtime``), unless ``pax`` already gives it."""
    if kind == DIRTYPE and not name.endswith("/"):
        name += "/"
    records = dict(pax) if pax else {}
    # tarfile's order of records: the caller's, then path, linkpath, uname, gname, uid,
    # gid, size, mtime. An empty string always fits (most links and names are empty).
    if "path" not in records and (len(name) > 100 or not name.isascii()):
        records["path"] = name
    if linkname and "linkpath" not in records and (len(linkname) > 100 or not linkname.isascii()):
        records["linkpath"] = linkname
    if uname and "uname" not in records and (len(uname) > 32 or not uname.isascii()):
        records["uname"] = uname
    if gname and "gname" not in records and (len(gname) > 32 or not gname.isascii()):
        records["gname"] = gname
    uid = _number(records, "uid", uid, _MAX_ID)
    gid = _number(records, "gid", gid, _MAX_ID)
    size = _number(records, "size", size, _MAX_BIG)
    mtime = _number(records, "mtime", mtime, _MAX_BIG)
    # The extended header first, as tarfile builds it: an unencodable record fails before a
    # device number out of range does.
    extended = _extended(records) if records else b""
    if kind in (CHRTYPE, BLKTYPE):
        major, minor = _device(devmajor), _device(devminor)
    else:
        major = minor = _EMPTY_DEVICE
    header = _ustar(
        _field(name, 100),
        mode & 0o7777,
        uid,
        gid,
        size,
        mtime,
        kind,
        _field(linkname, 100) if linkname else _NUL100,
        _field(uname, 32) if uname else _NUL32,
        _field(gname, 32) if gname else _NUL32,
        major,
        minor,
    )
    return extended + header if extended else header


def pax_time(ns: int) -> str:
    """A nanosecond time as a PAX ``mtime`` value: seconds, and a fraction only if any."""
    sign = "-" if ns < 0 else ""
    seconds, frac = divmod(abs(ns), 1_000_000_000)
    if not frac:
        return f"{sign}{seconds}"
    return f"{sign}{seconds}.{frac:09d}".rstrip("0")


def _number(records: dict[str, str], keyword: str, value: int, limit: int) -> int:
    """The ustar field's value: ``value`` if it fits, else 0 and a record (unless the
    caller's records already give one)."""
    if 0 <= value < limit:
        return value
    records.setdefault(keyword, str(value))
    return 0


def _field(value: str, length: int) -> bytes:
    data = value.encode("ascii", "replace")[:length]  # the PAX record has the real value
    return data + bytes(length - len(data))


_PAX_NAME = _field("././@PaxHeader", 100)


def _device(number: int) -> bytes:
    if not 0 <= number < _MAX_ID:
        raise ValueError("overflow in number field")  # tarfile's refusal, word for word
    return b"%07o\0" % number


def _ustar(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    kind: bytes,
    linkname: bytes,
    uname: bytes,
    gname: bytes,
    devmajor: bytes,
    devminor: bytes,
) -> bytes:
    block = _USTAR % (
        name,
        mode,
        uid,
        gid,
        size,
        mtime,
        kind,
        linkname,
        uname,
        gname,
        devmajor,
        devminor,
    )
    # The checksum field holds its 8 spaces while the block is summed, as tar counts it.
    return b"%s%06o\0%s" % (block[:148], block_sum(block), block[155:])


def _extended(records: dict[str, str]) -> bytes:
    """A PAX extended header (type ``x``) and its records, padded to whole blocks."""
    # A value that is not valid UTF-8 (surrogate escapes of raw bytes) switches the whole
    # header to hdrcharset=BINARY, values as their original bytes.
    binary = False
    for value in records.values():
        if not value.isascii():  # ASCII is always valid UTF-8
            try:
                value.encode("utf-8", "strict")
            except UnicodeEncodeError:
                binary = True
                break
    parts = [b"21 hdrcharset=BINARY\n"] if binary else []
    errors = "surrogateescape" if binary else "strict"
    for keyword, value in records.items():
        key = keyword.encode("utf-8")
        data = value.encode("utf-8", errors)
        body = len(key) + len(data) + 3  # " ", "=", "\n"
        # The record's length counts its own digits: grow until it is a fixed point.
        length = total = 0
        while True:
            total = body + len(str(length))
            if total == length:
                break
            length = total
        parts.append(b"%d %s=%s\n" % (length, key, data))
    payload = b"".join(parts)
    return _extended_block(len(payload)) + payload + bytes(-len(payload) % BLOCK)


@functools.lru_cache(maxsize=64)
def _extended_block(size: int) -> bytes:
    """The header block of a PAX extended header of ``size`` bytes. Only the size varies,
    and few sizes recur (a nanosecond ``mtime`` record is 22 to 30 bytes)."""
    return _ustar(
        _PAX_NAME,
        0,
        0,
        0,
        size,
        0,
        XHDTYPE,
        _NUL100,
        _NUL32,
        _NUL32,
        _EMPTY_DEVICE,
        _EMPTY_DEVICE,
    )


def copy_data(fd: int, size: int, write: Callable[[bytes], object], name: str) -> None:
    """Write exactly ``size`` bytes of the open file ``fd`` (the size the member's header
    gave: a file that grew since is cut there, one that shrank is an error)."""
    left = size
    while left:
        try:
            data = os.read(fd, min(left, _CHUNK))
        except OSError as exc:
            raise StorageError(f"cannot read {name}: {exc.strerror}") from exc
        if not data:
            raise StorageError(f"{name} changed size while being exported")
        write(data)
        left -= len(data)
