"""A strict, streaming reader of tar headers, for unpacking layers.

Python's ``tarfile`` spends most of a small-file layer's unpack time on itself: two
checksum passes through ``struct``, a string decode per field, a copy of every data
block through its stream buffer. This reader keeps tarfile's interpretation of the formats
layers use (ustar, GNU long names and old sparse files, PAX extended and global headers,
GNU PAX sparse 0.0/0.1/1.0), decodes only what the unpacker reads, and hands file data
out as slices of the bytes it already holds.

It is stricter than tarfile where tarfile guesses: any header that is not a valid header
(after the first, tarfile calls that the end of the archive) and any stream that ends
before the end-of-archive block is a :class:`LayerFormatError`; extended headers are
bounded in size and in how many may come in a row.
"""

from __future__ import annotations

import re
from typing import Protocol
from zlib import adler32 as _adler32

from ocistore.errors import LayerFormatError

__all__ = [
    "AREGTYPE",
    "BLKTYPE",
    "CHRTYPE",
    "CONTTYPE",
    "DIRTYPE",
    "FIFOTYPE",
    "LNKTYPE",
    "REGTYPE",
    "SYMTYPE",
    "TarEntry",
    "TarReader",
]

BLOCK = 512
REGTYPE = b"0"
AREGTYPE = b"\0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
_GNU_LONGNAME = b"L"
_GNU_LONGLINK = b"K"
_GNU_SPARSE = b"S"
_PAX_EXTENDED = b"x"
_PAX_GLOBAL = b"g"
_SOLARIS_EXTENDED = b"X"

_REGULAR = frozenset({REGTYPE, AREGTYPE, CONTTYPE, _GNU_SPARSE})
_SUPPORTED = frozenset(
    {
        REGTYPE,
        AREGTYPE,
        LNKTYPE,
        SYMTYPE,
        DIRTYPE,
        FIFOTYPE,
        CONTTYPE,
        CHRTYPE,
        BLKTYPE,
        _GNU_LONGNAME,
        _GNU_LONGLINK,
        _GNU_SPARSE,
    }
)
_META = frozenset({_GNU_LONGNAME, _GNU_LONGLINK, _PAX_EXTENDED, _PAX_GLOBAL, _SOLARIS_EXTENDED})
_ZERO_BLOCK = bytes(BLOCK)
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_PAX_SPARSE_OFFSET = re.compile(rb"\d+ GNU.sparse.offset=(\d+)\n")
_PAX_SPARSE_NUMBYTES = re.compile(rb"\d+ GNU.sparse.numbytes=(\d+)\n")
_PAX_INT_FIELDS = frozenset({"uid", "gid", "size"})
_PAX_FIELDS = frozenset({"path", "linkpath", "size", "mtime", "uid", "gid", "uname", "gname"})

#: Largest PAX / GNU long-name header read into memory.
MAX_META_HEADER = 1 << 20
#: Most extended headers (PAX, GNU long name/link) in a row before a real header.
MAX_META_CHAIN = 16
#: Read size on the caller's stream.
READ_SIZE = 1 << 20


class ByteSource(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _InvalidHeader(Exception):
    pass


class TarEntry:
    """One member: what the unpacker needs of a header, with extended headers applied."""

    __slots__ = (
        "_extent",
        "devmajor",
        "devminor",
        "gid",
        "linkname",
        "mode",
        "mtime",
        "name",
        "pax_headers",
        "size",
        "sparse",
        "type",
        "uid",
    )

    def __init__(self) -> None:
        self.pax_headers: dict[str, str] = {}
        self.sparse: list[tuple[int, int]] | None = None

    name: str
    type: bytes
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    linkname: str
    devmajor: int
    devminor: int
    _extent: int  # bytes of data blocks that follow the header (padding included)

    def isreg(self) -> bool:
        return self.type in _REGULAR


def _block(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _nts(field: bytes) -> str:
    end = field.find(0)
    if end >= 0:
        field = field[:end]
    return field.decode("utf-8", "surrogateescape")


def _nti(field: bytes) -> int:
    first = field[0]
    if not first:
        return 0  # what the general path makes of a field that starts with NUL
    last = field[-1]
    if last == 0 or last == 32:
        # The usual "0000644\0" or "0012345 ": one int() call. Where it succeeds, the
        # general path below returns the same number; where it fails (another NUL
        # inside, base-256, garbage) the general path decides.
        try:
            return int(field[:-1], 8)
        except ValueError:
            pass
    if first == 0o200 or first == 0o377:  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        if first == 0o377:
            n -= 256 ** (len(field) - 1)
        return n
    end = field.find(0)
    if end >= 0:
        field = field[:end]
    try:
        # int() refuses non-ASCII bytes itself (tarfile decodes them as ASCII first: the
        # same refusal), and takes surrounding whitespace as tarfile's strip() does.
        return int(field or b"0", 8) if field.strip() else 0
    except ValueError:
        pass
    try:  # str.strip() also strips \x1c-\x1f, which bytes.strip() keeps
        return int(field.decode("ascii").strip() or "0", 8)
    except ValueError:
        raise _InvalidHeader("invalid number field") from None


def block_sum(block: bytes) -> int:
    """The sum of a 512-byte block's bytes, in C: Adler-32's low half is 1 + the byte sum of
    its input modulo 65521, and 256 bytes sum to at most 65280, so each half cannot wrap.
    sum() over the 512 bytes walks them as Python ints, 5x slower: 0.2 s of an 84k-entry
    layer. The tar writer computes its checksums with it too."""
    return (_adler32(block[:256]) & 0xFFFF) + (_adler32(block[256:]) & 0xFFFF) - 2


def _checksum_ok(header: bytes) -> bool:
    field = header[148:156]
    stored = _nti(field)
    # The checksum field itself counts as 8 spaces (256).
    unsigned = block_sum(header) + 256 - sum(field)
    if stored == unsigned:
        return True
    # Some old tars summed signed chars.
    high = sum(1 for b in header[:148] if b >= 128) + sum(1 for b in header[156:] if b >= 128)
    return stored == unsigned - 256 * high


def _decode_pax(value: bytes, encoding: str) -> str:
    try:
        return value.decode(encoding, "strict")
    except UnicodeDecodeError:
        return value.decode("utf-8", "surrogateescape")


class TarReader:
    """``next()`` returns the next member (None at the end-of-archive block), positioned at
    its data; ``read(n)`` returns up to ``n`` bytes of that data, ``b""`` when it is done.
    Data not read is skipped by the next ``next()``."""

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        self._buf = b""
        self._pos = 0
        self._data_left = 0  # of the current member's data, not yet read
        self._skip = 0  # padding (and unread data) before the next header
        self._globals: dict[str, str] = {}
        self._chain = 0
        self._first = True
        self._current = ""

    # --- bytes ------------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer at the end of the stream."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= n:
            self._pos = pos + n
            return buf[pos : pos + n]
        # Across a chunk boundary, join only the bytes asked for: joining the leftover
        # with the whole next chunk copied a megabyte at most boundaries (inflated chunks
        # do not end on 512-byte blocks, so a header often straddles one).
        parts = [buf[pos:]]
        got = len(buf) - pos
        self._buf, self._pos = b"", 0
        while got < n:
            data = self._source.read(max(READ_SIZE, n - got))
            if not data:
                break
            need = n - got
            if len(data) > need:
                parts.append(data[:need])
                self._buf, self._pos = data, need
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _discard(self, n: int) -> bool:
        while n > 0:
            have = len(self._buf) - self._pos
            if have >= n:
                self._pos += n
                return True
            n -= have
            self._buf, self._pos = b"", 0
            data = self._source.read(min(READ_SIZE, max(n, BLOCK)))
            if not data:
                return False
            self._buf = data
        return True

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member's data (fewer only at its end)."""
        n = min(n, self._data_left)
        if n <= 0:
            return b""
        have = len(self._buf) - self._pos
        if have >= n:
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
        elif have == 0:
            out = self._source.read(max(min(n, 64 * READ_SIZE), READ_SIZE))
            if len(out) > n:
                self._buf, self._pos = out, n
                out = out[:n]
        else:
            out = self._buf[self._pos :]
            self._buf, self._pos = b"", 0
        self._data_left -= len(out)
        if not out:
            raise LayerFormatError(
                f"layer tar is truncated in the data of {_printable(self._current)!r}"
            )
        return out

    def read_view(self, n: int) -> memoryview:
        """``read`` without the copy: a view into the stream's chunk (it keeps the chunk
        alive while it is referenced). The unpacker writes file data from it; slicing
        bytes instead copied every file's data once more."""
        n = min(n, self._data_left)
        if n <= 0:
            return memoryview(b"")
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf, pos = self._source.read(max(min(n, 64 * READ_SIZE), READ_SIZE)), 0
            if not buf:
                raise LayerFormatError(
                    f"layer tar is truncated in the data of {_printable(self._current)!r}"
                )
        end = min(pos + n, len(buf))
        self._buf, self._pos = buf, end
        self._data_left -= end - pos
        return memoryview(buf)[pos:end]

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes of the current member's data."""
        first = self.read(n)
        if len(first) == n:
            return first
        parts = [first]
        got = len(first)
        while got < n:
            more = self.read(n - got)
            if not more:  # the member's data ends before n: a sparse map that claims more
                raise LayerFormatError(
                    f"layer tar is truncated in the data of {_printable(self._current)!r}"
                )
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    # --- headers ----------------------------------------------------------------------

    def next(self) -> TarEntry | None:
        if self._data_left or self._skip:
            if not self._discard(self._data_left + self._skip):
                if self._data_left:
                    raise LayerFormatError(
                        f"layer tar is truncated in the data of {_printable(self._current)!r}"
                    )
                raise LayerFormatError("layer tar is truncated: unexpected end of data")
            self._data_left = self._skip = 0
        try:
            entry = self._member()
        except _InvalidHeader as exc:
            raise LayerFormatError(f"layer tar has an invalid header: {exc}") from None
        if entry is None:
            return None
        self._current = entry.name
        if entry._extent < 0:
            raise LayerFormatError(f"layer entry {_printable(entry.name)!r} has a negative size")
        if entry.isreg() or entry.type not in _SUPPORTED:
            if entry.sparse is None and entry.size > entry._extent:
                # a global size (or sparse size) over the header's: tarfile would read
                # the data past the member's blocks, then fail to seek back
                raise LayerFormatError(
                    f"layer entry {_printable(entry.name)!r} has more data than its blocks"
                )
            data = entry.size if entry.sparse is None else entry._extent
            self._data_left = max(data, 0)
            self._skip = max(entry._extent - self._data_left, 0)
        return entry

    def _header(self) -> bytes | None:
        """The next 512-byte header; None for a zero block (the end)."""
        if len(self._buf) - self._pos >= BLOCK:
            header = self._buf[self._pos : self._pos + BLOCK]
            self._pos += BLOCK
        else:
            header = self._take(BLOCK)
            if not header:
                raise LayerFormatError(
                    "layer tar is empty or truncated: the stream ends before the "
                    "end-of-archive block"
                )
            if len(header) != BLOCK:
                raise LayerFormatError("layer tar is truncated inside a header")
        if header == _ZERO_BLOCK:
            return None
        if not _checksum_ok(header):
            raise _InvalidHeader("bad checksum")
        return header

    def _member(self) -> TarEntry | None:
        header = self._header()
        if header is None:
            return None
        kind = header[156:157]
        if kind in _META:
            for start in (100, 108, 116, 136, 329, 337):
                _nti(header[start : start + 8 if start < 136 or start > 300 else start + 12])
            self._chain += 1
            if self._chain > MAX_META_CHAIN:
                raise LayerFormatError("layer tar has too many extended headers in a row")
            size = _nti(header[124:136])
            if size > MAX_META_HEADER or size < 0:
                raise LayerFormatError(
                    f"layer tar has an extended header of {size} bytes (limit {MAX_META_HEADER})"
                )
            body = self._take(_block(size))
            if len(body) != _block(size):
                raise LayerFormatError("layer tar is truncated inside an extended header")
            if kind in (_GNU_LONGNAME, _GNU_LONGLINK):
                entry = self._member_after_meta()
                if kind == _GNU_LONGNAME:
                    entry.name = _nts(body)
                else:
                    entry.linkname = _nts(body)
                if entry.type == DIRTYPE:
                    entry.name = entry.name.removesuffix("/")
                return entry
            return self._pax(kind, body)
        self._chain = 0
        entry = self._entry(header, kind)
        if self._globals and kind != _GNU_SPARSE:
            self._apply_pax(entry, self._globals)
        if entry.type == DIRTYPE:
            entry.name = entry.name.rstrip("/")
        return entry

    def _member_after_meta(self) -> TarEntry:
        entry = self._member()
        if entry is None:
            raise LayerFormatError("layer tar ends right after an extended header")
        return entry

    def _entry(self, header: bytes, kind: bytes) -> TarEntry:
        entry = TarEntry()
        name = _nts(header[0:100])
        entry.mode = _nti(header[100:108])
        entry.uid = _nti(header[108:116])
        entry.gid = _nti(header[116:124])
        size = _nti(header[124:136])
        entry.mtime = _nti(header[136:148])
        entry.linkname = _nts(header[157:257]) if header[157] else ""
        entry.devmajor = _nti(header[329:337])
        entry.devminor = _nti(header[337:345])
        if kind == AREGTYPE and name.endswith("/"):
            kind = DIRTYPE  # old V7 tars: a directory is a file whose name ends in "/"
        entry.type = kind
        if kind == _GNU_SPARSE:
            size = self._gnu_sparse(entry, header, size)
        else:
            entry._extent = _block(size) if (kind in _REGULAR or kind not in _SUPPORTED) else 0
        entry.size = size
        if kind == DIRTYPE:
            name = name.rstrip("/")
        prefix = header[345:500]
        if prefix[0] and kind != _GNU_SPARSE:
            name = _nts(prefix) + "/" + name
        entry.name = name
        return entry

    def _gnu_sparse(self, entry: TarEntry, header: bytes, stored: int) -> int:
        """Old GNU sparse: up to 4 (offset, size) pairs in the header, more in extension
        blocks; the member's size is the file's, its data extent the stored bytes."""
        structs = []
        for pos in range(386, 386 + 4 * 24, 24):
            structs.append((_nti(header[pos : pos + 12]), _nti(header[pos + 12 : pos + 24])))
        extended = header[482]
        real_size = _nti(header[483:495])
        while extended:
            block = self._take(BLOCK)
            if len(block) != BLOCK:
                raise LayerFormatError("layer tar is truncated in a GNU sparse extension")
            for pos in range(0, 21 * 24, 24):
                offset, numbytes = _nti(block[pos : pos + 12]), _nti(block[pos + 12 : pos + 24])
                if offset and numbytes:
                    structs.append((offset, numbytes))
            extended = block[504]
        entry.sparse = structs
        entry._extent = _block(stored)
        return real_size

    def _pax(self, kind: bytes, body: bytes) -> TarEntry:
        headers = self._globals if kind == _PAX_GLOBAL else dict(self._globals)
        # Values are UTF-8; what is not (hdrcharset=BINARY, or old GNU tars that wrote raw
        # names without saying so) is kept byte for byte as surrogate escapes.
        charset = re.search(rb"\d+ hdrcharset=([^\n]+)\n", body)
        if charset is not None:
            try:
                headers["hdrcharset"] = charset.group(1).decode("utf-8")
            except UnicodeDecodeError:
                raise LayerFormatError("layer tar has a PAX hdrcharset that is not UTF-8") from None
        pos = 0
        while True:
            match = _PAX_RECORD.match(body, pos)
            if not match:
                break
            length = int(match.group(1))
            if length == 0:
                raise _InvalidHeader("PAX record of length 0")
            keyword = _decode_pax(match.group(2), "utf-8")
            value = body[match.end(2) + 1 : match.start(1) + length - 1]
            headers[keyword] = _decode_pax(value, "utf-8")
            pos += length
        entry = self._member_after_meta()
        self._pax_sparse(entry, headers, body)
        if kind == _PAX_GLOBAL:
            return entry  # _member applied the (updated) globals already
        self._apply_pax(entry, headers)
        if "size" in headers and (entry.type in _REGULAR or entry.type not in _SUPPORTED):
            entry._extent = _block(entry.size)
        return entry

    def _pax_sparse(self, entry: TarEntry, headers: dict[str, str], body: bytes) -> None:
        try:
            if "GNU.sparse.map" in headers:  # GNU PAX sparse 0.1
                numbers = [int(x) for x in headers["GNU.sparse.map"].split(",")]
                entry.sparse = list(zip(numbers[::2], numbers[1::2], strict=False))
            elif "GNU.sparse.size" in headers:  # 0.0
                offsets = [int(m.group(1)) for m in _PAX_SPARSE_OFFSET.finditer(body)]
                sizes = [int(m.group(1)) for m in _PAX_SPARSE_NUMBYTES.finditer(body)]
                entry.sparse = list(zip(offsets, sizes, strict=False))
            elif headers.get("GNU.sparse.major") == "1" and headers.get("GNU.sparse.minor") == "0":
                self._pax_sparse_10(entry)
        except ValueError:
            raise LayerFormatError(
                f"layer entry {_printable(entry.name)!r} has an invalid sparse map"
            ) from None

    def _pax_sparse_10(self, entry: TarEntry) -> None:
        """GNU PAX sparse 1.0: the map is at the start of the data, in decimal lines."""
        taken = 0

        def line() -> int:
            nonlocal taken
            parts: list[bytes] = []
            while True:
                byte = self._take(1)
                taken += 1
                if not byte:
                    raise LayerFormatError("layer tar is truncated in a sparse map")
                if byte == b"\n":
                    return int(b"".join(parts))
                parts.append(byte)
                if len(parts) > 20:
                    raise ValueError("sparse map number too long")

        count = line()
        numbers = [line() for _ in range(2 * count)]
        pad = _block(taken) - taken
        if pad and len(self._take(pad)) != pad:
            raise LayerFormatError("layer tar is truncated in a sparse map")
        if _block(taken) > entry._extent:
            raise LayerFormatError(
                f"layer entry {_printable(entry.name)!r} has a sparse map longer than its data"
            )
        entry._extent -= _block(taken)
        entry.sparse = list(zip(numbers[::2], numbers[1::2], strict=False))

    @staticmethod
    def _apply_pax(entry: TarEntry, headers: dict[str, str]) -> None:
        for keyword, value in headers.items():
            if keyword in _PAX_FIELDS:
                if keyword in _PAX_INT_FIELDS:
                    try:
                        number = int(value)
                    except ValueError:
                        number = 0
                    if keyword == "size":
                        entry.size = number
                    elif keyword == "uid":
                        entry.uid = number
                    else:
                        entry.gid = number
                elif keyword == "mtime":
                    try:
                        entry.mtime = float(value)
                    except ValueError:
                        entry.mtime = 0
                elif keyword == "path":
                    entry.name = value.rstrip("/")
                elif keyword == "linkpath":
                    entry.linkname = value
            elif keyword == "GNU.sparse.name":
                entry.name = value
            elif keyword == "GNU.sparse.size" or keyword == "GNU.sparse.realsize":
                try:
                    entry.size = int(value)
                except ValueError:
                    raise LayerFormatError(
                        f"layer entry {_printable(entry.name)!r} has an invalid sparse size"
                    ) from None
        entry.pax_headers = dict(headers)


def _printable(path: str) -> str:
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") or "."
