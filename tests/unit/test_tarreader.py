"""Differential tests of ocistore.tarreader against CPython's tarfile and GNU tar.

``TarReader`` must read every archive exactly as tarfile (stream mode ``"r|"``, UTF-8 with
surrogateescape) reads it, except that it is stricter: where tarfile would take a bad header
after the first for the end of the archive, crash with an exception that is not a tarfile
error, or silently accept a truncated stream, TarReader raises a one-line
:class:`LayerFormatError`. tarfile is the oracle here; GNU tar (if installed) is a second,
independent writer, and the files it archived are the oracle for the data.

Each disagreement found (and fixed) has its own regression test in the last section.
"""

from __future__ import annotations

import io
import math
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from ocistore.errors import LayerFormatError
from ocistore.tarreader import TarReader

BLOCK = 512
END = bytes(2 * BLOCK)
MTIME = 1_600_000_000

# --- reading an archive both ways ---------------------------------------------------------

Member = dict[str, Any]


@dataclass
class Outcome:
    """The members read (header and data both complete), then the error that stopped it."""

    members: list[Member]
    error: BaseException | None
    #: tarfile only: it stopped at a zero block (not at a bad or truncated header).
    clean_end: bool = False


class Source:
    """A byte source over ``data`` that returns at most ``chunk`` bytes a read (all it is
    asked for if None) and fails the test if it is read again and again at its end."""

    def __init__(self, data: bytes, chunk: int | None = None) -> None:
        self._io = io.BytesIO(data)
        self._chunk = chunk
        self.empty_reads = 0

    def read(self, n: int = -1, /) -> bytes:
        if self._chunk is not None:
            n = self._chunk if n < 0 else min(n, self._chunk)
        out = self._io.read(n)
        if not out:
            self.empty_reads += 1
            if self.empty_reads > 50:
                raise AssertionError("reader keeps reading at the end of its source")
        return out


class Trickle(Source):
    """One byte a read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data, chunk=1)


def _has_data(m: Any) -> bool:
    # tarfile.extractfile() hands out data for these; TarReader.next() positions at it.
    return bool(m.isreg() or m.type not in tarfile.SUPPORTED_TYPES)


def _expandable(sparse: list[tuple[int, int]], size: int) -> bool:
    """Regions in order, not overlapping, inside a file of at most 64 MiB (empty regions
    aside): a map whose stored bytes both readers agree on and extractfile() expands
    sanely (it loops forever on some maps, and fills every hole in memory)."""
    if size > 64 << 20:
        return False
    end = 0
    for offset, length in sparse:
        if length == 0:
            continue  # GNU 'S' headers pad their 4 slots with (0, 0)
        if offset < end or length < 0 or offset + length > size:
            return False
        end = offset + length
    return True


def _mtime(value: float) -> int | str:
    return int(value) if math.isfinite(value) else repr(float(value))


def _describe(m: Any) -> Member:
    return {
        "name": m.name,
        "type": m.type,
        "size": m.size,
        "mode": m.mode,
        "uid": m.uid,
        "gid": m.gid,
        "mtime": _mtime(m.mtime),
        "linkname": m.linkname,
        "devmajor": m.devmajor,
        "devminor": m.devminor,
        "pax_headers": dict(m.pax_headers),
        "sparse": None if m.sparse is None else [tuple(r) for r in m.sparse],
    }


def _bound(data: bytes) -> int:
    # Every member takes at least one 512-byte header: more would be a runaway loop.
    return len(data) // BLOCK + 2


def read_with_tarfile(data: bytes) -> Outcome:
    members: list[Member] = []
    try:
        with tarfile.open(
            fileobj=io.BytesIO(data), mode="r|", encoding="utf-8", errors="surrogateescape"
        ) as tar:
            while (m := _next(tar, data)) is not None:
                assert len(members) < _bound(data), "tarfile runs away"
                info = _describe(m)
                # typeshed says bytes; tarfile keeps the map as (offset, length) pairs.
                sparse = cast("list[tuple[int, int]] | None", m.sparse)
                if _has_data(m):
                    if sparse is None:
                        info["data"] = _read_all(tar, m)
                    elif _expandable(sparse, m.size):
                        # extractfile() expands the holes; keep the stored bytes, as
                        # TarReader hands them out.
                        full = _read_all(tar, m)
                        info["data"] = b"".join(full[o : o + n] for o, n in sparse)
                members.append(info)
            clean_end = data[tar.offset : tar.offset + BLOCK] == bytes(BLOCK)
    except Exception as exc:  # the oracle may fail any way it likes; it is compared below
        return Outcome(members, exc)
    return Outcome(members, None, clean_end)


def _next(tar: tarfile.TarFile, data: bytes) -> tarfile.TarInfo | None:
    """tar.next(), except where it would spin: in stream mode, tarfile skips a member's
    data by reading it block by block, past the end of the stream too, and a (damaged)
    size can promise 2**88 bytes. Past the end, it ends with this error."""
    fileobj = tar.fileobj
    assert fileobj is not None
    # TarFile.firstmember is private (not in typeshed): the member read ahead, if any.
    firstmember: tarfile.TarInfo | None = vars(tar)["firstmember"]
    if firstmember is None and tar.offset - 1 >= len(data) and tar.offset > fileobj.tell():
        raise tarfile.ReadError("unexpected end of data")
    return tar.next()


def _read_all(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(m)
    assert f is not None
    return f.read()


def read_with_tarreader(data: bytes, source: Source | None = None) -> Outcome:
    reader = TarReader(source if source is not None else Source(data))
    members: list[Member] = []
    try:
        while (entry := reader.next()) is not None:
            assert len(members) < _bound(data), "TarReader runs away"
            info = _describe(entry)
            if _has_data(entry):
                if entry.sparse is None:
                    # More than the archive holds can only end in "truncated"; do not ask
                    # for 2**88 bytes (see test_read_exact_of_more_than_maxsize).
                    size = min(entry.size, len(data) + 1)
                    info["data"] = reader.read_exact(size) if size > 0 else b""
                elif _expandable(entry.sparse, entry.size):
                    info["data"] = reader.read_exact(sum(n for _, n in entry.sparse))
            members.append(info)
    except AssertionError:
        raise
    except Exception as exc:
        return Outcome(members, exc)
    return Outcome(members, None)


def assert_same(data: bytes, *, trickle: bool = True) -> list[Member]:
    """Both readers read the whole archive, to the same members; returns them."""
    ref = read_with_tarfile(data)
    assert ref.error is None, f"tarfile failed: {ref.error!r}"
    got = read_with_tarreader(data)
    assert got.error is None, f"TarReader failed: {got.error!r}"
    assert got.members == ref.members
    if trickle:
        slow = read_with_tarreader(data, Trickle(data))
        assert slow.error is None, f"TarReader (1 byte a read) failed: {slow.error!r}"
        assert slow.members == ref.members
    return ref.members


# What TarReader refuses on purpose although tarfile reads it to its end-of-archive block:
# the module's documented bounds on extended headers, and numbers of more than 20 digits in
# a GNU 1.0 sparse map.
DOCUMENTED_BOUNDS = ("too many extended headers", "has an extended header of", "sparse map")


def disagreement(data: bytes) -> str | None:
    """The fuzz rule: TarReader returns a prefix of what tarfile returns, then either ends
    where tarfile ends (both without error) or raises a one-line LayerFormatError; it never
    returns a member tarfile did not return. Stricter than that rule, it must not refuse
    an archive that tarfile read to a real end-of-archive block, documented bounds aside.
    None if the rule holds, else what broke it."""
    ref = read_with_tarfile(data)
    got = read_with_tarreader(data)
    if got.error is not None:
        if not isinstance(got.error, LayerFormatError):
            return f"TarReader raised {got.error!r}"
        if "\n" in str(got.error):
            return f"message is not one line: {str(got.error)!r}"
    n = len(got.members)
    if n > len(ref.members):
        return f"TarReader read {n} members, tarfile {len(ref.members)} ({ref.error!r})"
    for i, (mine, theirs) in enumerate(zip(got.members, ref.members, strict=False)):
        if mine != theirs:
            diff = {k: (mine.get(k), theirs.get(k)) for k in theirs if mine.get(k) != theirs[k]}
            return f"member {i} differs (TarReader, tarfile): {diff}"
    if got.error is None and (ref.error is not None or n != len(ref.members)):
        return f"TarReader accepted what tarfile did not: {ref.error!r}"
    refused = got.error is not None and ref.error is None and ref.clean_end
    if refused and not any(bound in str(got.error) for bound in DOCUMENTED_BOUNDS):
        return f"TarReader refused what tarfile read to its end block: {got.error}"
    return None


# --- writing archives ---------------------------------------------------------------------


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def raw_header(
    name: bytes,
    kind: bytes = b"0",
    size: int | bytes = 0,
    *,
    mode: int = 0o644,
    mtime: int = MTIME,
    linkname: bytes = b"",
    prefix: bytes = b"",
    magic: bytes = b"ustar\x0000",
    fields: dict[int, bytes] | None = None,
) -> bytes:
    """One header block, for what tarfile will not write. ``size`` and ``fields`` (offset
    to raw bytes) may hold invalid values; the checksum is always right."""
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    h[100:108] = octal(mode, 8)
    h[108:116] = octal(0, 8)
    h[116:124] = octal(0, 8)
    h[124:136] = size if isinstance(size, bytes) else octal(size, 12)
    h[136:148] = octal(mtime, 12)
    h[156:157] = kind
    h[157 : 157 + len(linkname)] = linkname
    h[257:265] = magic
    h[345 : 345 + len(prefix)] = prefix
    for offset, value in (fields or {}).items():
        h[offset : offset + len(value)] = value
    return fix_checksum(h)


def fix_checksum(header: bytes | bytearray) -> bytes:
    h = bytearray(header)
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def pax_records(records: list[tuple[bytes, bytes]]) -> bytes:
    out = b""
    for keyword, value in records:
        rest = b" " + keyword + b"=" + value + b"\n"
        n = len(rest) + 1
        while len(b"%d" % n) + len(rest) != n:
            n += 1
        out += b"%d" % n + rest
    return out


def pax(records: list[tuple[bytes, bytes]], kind: bytes = b"x") -> bytes:
    body = pax_records(records)
    return raw_header(b"PaxHeader", kind, len(body)) + pad(body)


def gnu_long(kind: bytes, value: bytes) -> bytes:
    return raw_header(b"././@LongLink", kind, len(value) + 1, magic=b"ustar  \0") + pad(
        value + b"\0"
    )


def sparse_content(regions: list[tuple[int, int]]) -> bytes:
    return b"".join(bytes([65 + i % 26]) * n for i, (_, n) in enumerate(regions))


def old_gnu_sparse(name: bytes, regions: list[tuple[int, int]], realsize: int) -> bytes:
    """A GNU 'S' member: 4 regions in the header, 21 more in each extension block."""
    stored = sparse_content(regions)
    fields = {482: b"\1" if len(regions) > 4 else b"\0", 483: octal(realsize, 12)}
    for i, (offset, length) in enumerate(regions[:4]):
        fields[386 + 24 * i] = octal(offset, 12)
        fields[398 + 24 * i] = octal(length, 12)
    out = raw_header(name, b"S", len(stored), magic=b"ustar  \0", fields=fields)
    rest = regions[4:]
    while rest:
        chunk, rest = rest[:21], rest[21:]
        block = bytearray(BLOCK)
        for i, (offset, length) in enumerate(chunk):
            block[24 * i : 24 * i + 12] = octal(offset, 12)
            block[24 * i + 12 : 24 * i + 24] = octal(length, 12)
        block[504] = 1 if rest else 0
        out += bytes(block)
    return out + pad(stored)


def pax_sparse(version: str, name: bytes, regions: list[tuple[int, int]], realsize: int) -> bytes:
    """A GNU PAX sparse member, version 0.0, 0.1 or 1.0."""
    stored = sparse_content(regions)
    numbers = [x for region in regions for x in region]
    if version == "1.0":
        records = [
            (b"GNU.sparse.major", b"1"),
            (b"GNU.sparse.minor", b"0"),
            (b"GNU.sparse.name", name),
            (b"GNU.sparse.realsize", b"%d" % realsize),
        ]
        sparse_map = pad(b"".join(b"%d\n" % x for x in [len(regions), *numbers]))
        body = sparse_map + stored
        return pax(records) + raw_header(b"GNUSparseFile.0/" + name, size=len(body)) + pad(body)
    records = [
        (b"GNU.sparse.size", b"%d" % realsize),
        (b"GNU.sparse.numblocks", b"%d" % len(regions)),
    ]
    if version == "0.1":
        records += [
            (b"GNU.sparse.name", name),
            (b"GNU.sparse.map", b",".join(b"%d" % x for x in numbers)),
        ]
    else:
        for offset, length in regions:
            records += [
                (b"GNU.sparse.offset", b"%d" % offset),
                (b"GNU.sparse.numbytes", b"%d" % length),
            ]
    # GNU tar keeps the real name in the header for 0.0, in GNU.sparse.name for 0.1.
    header_name = name if version == "0.0" else b"GNUSparseFile.0/" + name
    return pax(records) + raw_header(header_name, size=len(stored)) + pad(stored)


def expand(stored: bytes, sparse: list[tuple[int, int]], size: int) -> bytes:
    out = bytearray(size)
    pos = 0
    for offset, length in sparse:
        out[offset : offset + length] = stored[pos : pos + length]
        pos += length
    return bytes(out)


def build(
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    fmt: int,
    pax_headers: dict[str, str] | None = None,
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=fmt,
        encoding="utf-8",
        errors="surrogateescape",
        pax_headers=pax_headers,
    ) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = attrs.pop("mode", 0o644)
    ti.mtime = attrs.pop("mtime", MTIME)
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti


def F(name: str, data: bytes = b"", **attrs: Any) -> tuple[tarfile.TarInfo, bytes | None]:
    return info(name, attrs.pop("kind", tarfile.REGTYPE), **attrs), data


def D(name: str, **attrs: Any) -> tuple[tarfile.TarInfo, bytes | None]:
    return info(name, tarfile.DIRTYPE, mode=0o755, **attrs), None


def L(name: str, kind: bytes, target: str, **attrs: Any) -> tuple[tarfile.TarInfo, bytes | None]:
    return info(name, kind, linkname=target, **attrs), None


def DEV(name: str, kind: bytes, major: int, minor: int) -> tuple[tarfile.TarInfo, bytes | None]:
    return info(name, kind, devmajor=major, devminor=minor), None


# --- the corpus: archives tarfile writes --------------------------------------------------

LATIN1 = "caf\udce9"  # b"caf\xe9": latin-1, not UTF-8, kept through surrogateescape
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000").decode(
    "utf-8", "surrogateescape"
)


def common_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """What every format can hold."""
    return [
        D("dir"),
        F("dir/hello", b"hello\n", uid=1000, gid=1000, mode=0o4755),
        F("dir/empty"),
        F("dir/b512", b"x" * 512),
        F("dir/b513", bytes(range(256)) * 2 + b"!"),
        F("dir/b1024", b"y" * 1024),
        F("dir/b1025", b"z" * 1025, mode=0o1777),
        L("dir/sym", tarfile.SYMTYPE, "hello", mode=0o777),
        L("dir/hard", tarfile.LNKTYPE, "dir/hello"),
        (info("dir/fifo", tarfile.FIFOTYPE), None),
        DEV("dev/null", tarfile.CHRTYPE, 1, 3),
        DEV("dev/big", tarfile.BLKTYPE, 0o7777777, 0o7777776),
        F("p" * 80 + "/" + "q" * 90, b"prefix split"),  # ustar prefix + name
        F("uni/ünïcødé-名前", b"utf-8 name"),
        F(LATIN1, b"latin-1 name"),
        F("times/zero", mtime=0),
        F("times/max", mtime=8**11 - 1),
        F("ids/max", uid=8**7 - 1, gid=8**7 - 1),
        F("cont", b"contiguous", kind=tarfile.CONTTYPE),
        F("unknown-Z", b"data of an unknown type" * 30, kind=b"Z"),
        F("unknown-V", b"volume", kind=b"V"),
        F("tail", b"last"),
    ]


def long_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """What only GNU and PAX can hold: long names and link names."""
    deep = "/".join(["d" * 60] * 4)  # 243 bytes of directories
    return [
        D(deep),
        F(deep + "/" + "f" * 120, b"over 255"),  # > 255 bytes
        F("n" * 150, b"over 100, no slash"),
        D("x" * 130),
        L("longsym", tarfile.SYMTYPE, "t" * 150, mode=0o777),
        L("l" * 200, tarfile.LNKTYPE, "n" * 150),
        F(LATIN1 + "/" + "é" * 70 + LATIN1, b"long non-UTF-8"),
    ]


def gnu_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """GNU base-256 numbers: big ids, negative times, big device numbers."""
    return [
        F("gnu/bigid", b"b256", uid=2**30, gid=2**40),
        F("gnu/negtime", mtime=-1000),
        F("gnu/hugetime", mtime=2**40),
        DEV("gnu/bigdev", tarfile.BLKTYPE, 2**25, 2**30),
    ]


def pax_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Per-member PAX records: numbers tarfile must parse, xattrs, binary values."""
    return [
        F("pax/bigid", uid=2**40, gid=2**33),
        F("pax/frac", mtime=1_600_000_000.25),
        F("pax/neg", mtime=-1.5),
        F("pax/records", b"r", pax_headers={"uid": "4242", "gid": "bogus", "mtime": "-0.75"}),
        F("pax/huge", pax_headers={"uid": "9" * 30, "mtime": "1e400"}),
        F("pax/nan", pax_headers={"mtime": "nan"}),
        F("pax/ws", pax_headers={"uid": " 12 ", "mtime": "1_000"}),
        F(
            "pax/xattr",
            b"caps",
            pax_headers={
                "SCHILY.xattr.user.x": "hi",
                "SCHILY.xattr.user.empty": "",
                "SCHILY.xattr.security.capability": CAPABILITY,
            },
        ),
        F("pax/comment", pax_headers={"comment": "a = b\nwith newline", "ünï": "ÿ"}),
        F("pax/binary-path", pax_headers={"path": "bin-\udcff\udcfe"}),
        L("pax/linkpath", tarfile.SYMTYPE, "x", pax_headers={"linkpath": "t" * 120}),
        D("pax/dirpath", pax_headers={"path": "pax/renamed-dir///"}),
        F("pax/size-record", b"s" * 700, pax_headers={"size": "700"}),
    ]


def v7_members() -> bytes:
    """Raw headers tarfile will not write: V7 directories, unknown types with data."""
    return (
        raw_header(b"olddir/", b"\0", magic=bytes(8))
        + raw_header(b"olddir/file", b"\0", 3, magic=bytes(8))
        + pad(b"abc")
        + raw_header(b"olddir/sub//", b"\0", mode=0o700, magic=bytes(8))
        + raw_header(b"newdir//", b"5")
        + raw_header(b"unknownZ", b"Z", 600)
        + pad(b"Z" * 600)
        + raw_header(b"unknownV", b"V", 5)
        + pad(b"VVVVV")
        + raw_header(b"spaces", size=b" 12 \0       ", mode=0)
        + pad(b"twelve bytes")
        + raw_header(b"base256-size", size=b"\x80" + bytes(10) + b"\x05")
        + pad(b"fives")
        + raw_header(b"neg-1-size", size=b"\xff" * 12)
        + raw_header(b"dir-with-data", b"5", 700)  # dirs have no data: 700 is ignored
        + raw_header(b"prefixed", prefix=b"some/prefix")
        + raw_header(b"inprefix/", b"5", prefix=b"prefixdir")
        + END
    )


CORPUS: dict[str, Callable[[], bytes]] = {
    "ustar": lambda: build(common_members(), tarfile.USTAR_FORMAT),
    "gnu": lambda: build(common_members() + long_members() + gnu_members(), tarfile.GNU_FORMAT),
    "pax": lambda: build(common_members() + long_members() + pax_members(), tarfile.PAX_FORMAT),
    "pax-global-comment": lambda: build(
        common_members(), tarfile.PAX_FORMAT, pax_headers={"comment": "global", "x": "ÿ"}
    ),
    "pax-global-fields": lambda: build(
        [F("a", b"A"), F("b", b"B", pax_headers={"path": "own-path", "uid": "5"}), D("c")],
        tarfile.PAX_FORMAT,
        pax_headers={"path": "global/path", "uid": "77", "gid": "88", "mtime": "123.5"},
    ),
    "pax-global-binary": lambda: build(
        [F("a", b"A")], tarfile.PAX_FORMAT, pax_headers={"comment": "\udcff"}
    ),
    "v7-raw": v7_members,
    "global-then-more-globals": lambda: (
        pax([(b"uid", b"1"), (b"comment", b"first")], b"g")
        + raw_header(b"a")
        + pax([(b"uid", b"2")], b"g")
        + pax([(b"gid", b"3")])
        + raw_header(b"b")
        + raw_header(b"c")
        + END
    ),
    "solaris-X": lambda: pax([(b"path", b"solaris-path")], b"X") + raw_header(b"x") + END,
    "chained-meta": lambda: (
        pax([(b"uid", b"9")])
        + gnu_long(b"K", b"k" * 150)
        + gnu_long(b"L", b"first" * 40)
        + gnu_long(b"L", b"second" * 40)
        + raw_header(b"short", b"1", linkname=b"short-link")
        + END
    ),
    "old-gnu-sparse": lambda: (
        old_gnu_sparse(b"few", [(0, 10), (4096, 512), (9000, 0)], 9000)
        + old_gnu_sparse(b"many", [(i * 1024, 100 + i) for i in range(30)], 40_000)
        + raw_header(b"after")
        + END
    ),
    "pax-sparse": lambda: (
        b"".join(
            pax_sparse(v, b"sp" + v.encode(), [(i * 2048, 300 + i) for i in range(45)], 100_000)
            for v in ("0.0", "0.1", "1.0")
        )
        + raw_header(b"after")
        + END
    ),
    "empty": lambda: END,
    "one-zero-block": lambda: bytes(BLOCK),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_matches_tarfile(name: str) -> None:
    data = CORPUS[name]()
    members = assert_same(data)
    if name not in ("empty", "one-zero-block"):
        assert members


def test_corpus_reads_what_was_written() -> None:
    """Spot checks that the comparison is not vacuous: the fields made it through."""
    by_name = {m["name"]: m for m in assert_same(CORPUS["pax"]())}
    assert by_name["dir"]["type"] == tarfile.DIRTYPE
    assert by_name[LATIN1]["data"] == b"latin-1 name"
    assert by_name["pax/bigid"]["uid"] == 2**40
    assert by_name["pax/records"]["gid"] == 0  # "bogus" reads as 0, as tarfile has it
    assert by_name["pax/huge"]["mtime"] == "inf"
    xattrs = by_name["pax/xattr"]["pax_headers"]
    assert xattrs["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == (
        bytes.fromhex("0100000200200000000000000000000000000000")
    )
    assert by_name["pax/renamed-dir"]["type"] == tarfile.DIRTYPE
    assert by_name["longsym"]["linkname"] == "t" * 150
    gnu = {m["name"]: m for m in assert_same(CORPUS["gnu"]())}
    assert gnu["gnu/bigid"]["uid"] == 2**30
    assert gnu["gnu/negtime"]["mtime"] == -1000
    assert gnu["gnu/bigdev"]["devmajor"] == 2**25
    v7 = {m["name"]: m for m in assert_same(CORPUS["v7-raw"]())}
    assert v7["olddir"]["type"] == v7["olddir/sub"]["type"] == tarfile.DIRTYPE
    assert v7["unknownZ"]["data"] == b"Z" * 600
    globals_ = assert_same(CORPUS["pax-global-fields"]())
    assert [m["name"] for m in globals_] == ["global/path", "own-path", "global/path"]
    assert [m["uid"] for m in globals_] == [77, 5, 77]
    sparse = {m["name"]: m for m in assert_same(CORPUS["pax-sparse"]())}
    assert set(sparse) == {"sp0.0", "sp0.1", "sp1.0", "after"}
    for version in ("0.0", "0.1", "1.0"):
        m = sparse["sp" + version]
        assert m["size"] == 100_000 and len(m["sparse"]) == 45
        assert m["data"] == sparse_content(m["sparse"])


# --- archives GNU tar writes --------------------------------------------------------------

TAR = shutil.which("tar")


def _gnu_tar() -> str:
    if TAR is None:
        pytest.skip("no tar binary")
    version = subprocess.run([TAR, "--version"], capture_output=True, text=True).stdout
    if "GNU tar" not in version:
        pytest.skip("tar is not GNU tar")
    return TAR


def _run_tar(args: list[str], cwd: Path) -> bytes:
    out = subprocess.run(
        [_gnu_tar(), *args, "-f", "-", "."], cwd=cwd, capture_output=True, check=False
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out.stdout


def _tree(root: Path, *, long: bool) -> None:
    root.mkdir()
    (root / "small").write_bytes(b"hello\n")
    (root / "empty").write_bytes(b"")
    (root / "b512").write_bytes(b"x" * 512)
    (root / "b513").write_bytes(b"y" * 513)
    (root / "b1024").write_bytes(b"z" * 1024)
    os.link(root / "small", root / "hard")
    os.symlink("small", root / "sym")
    os.mkfifo(root / "fifo")
    os.mkdir(root / "sub")
    (root / "sub" / "file").write_bytes(b"in sub")
    os.chmod(root / "sub" / "file", 0o4711)
    deep = root / ("p" * 80) / ("q" * 60)  # 141 bytes: a ustar prefix split
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"leaf")
    (root / os.fsdecode(b"caf\xe9")).write_bytes(b"")
    (root / "ünï").write_bytes(b"utf-8")
    if long:
        longdir = root.joinpath(*["d" * 60] * 4)
        longdir.mkdir(parents=True)
        (longdir / ("f" * 120)).write_bytes(b"over 255")
        os.symlink("t" * 150, root / "longsym")
        os.link(longdir / ("f" * 120), root / ("h" * 110))


@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_gnu_tar_formats(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    _tree(src, long=fmt != "ustar")
    data = _run_tar([f"--format={fmt}", "--numeric-owner", "-c"], src)
    members = assert_same(data)
    for m in members:
        if m["type"] in (tarfile.REGTYPE, tarfile.AREGTYPE) and m["name"] != ".":
            path = os.path.join(os.fsencode(src), os.fsencode(m["name"]))
            with open(path, "rb") as f:
                assert m["data"] == f.read(), m["name"]
    names = {m["name"] for m in members}
    assert "./caf\udce9" in names and "./ünï" in names
    if fmt != "ustar":
        assert "./" + "/".join(["d" * 60] * 4) + "/" + "f" * 120 in names


def test_gnu_tar_xattrs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    try:
        os.setxattr(src / "f", "user.x", b"hi")
        os.setxattr(src / "f", "user.bin", b"\x00\xff\x80")
    except OSError as exc:
        pytest.skip(f"no user xattrs here: {exc}")
    data = _run_tar(["--format=posix", "--xattrs", "-c"], src)
    (m,) = [m for m in assert_same(data) if m["name"] == "./f"]
    assert m["pax_headers"]["SCHILY.xattr.user.x"] == "hi"
    assert m["pax_headers"]["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == (
        b"\x00\xff\x80"
    )


def _sparse_tree(root: Path) -> dict[str, bytes]:
    """Files with holes: a few regions, and 40 (GNU 'S' extension blocks, a 1.0 map of
    more than one block)."""
    root.mkdir()
    files: dict[str, bytes] = {}
    layouts = {
        "few": ([0, 200_000, 900_000], 1_048_576),
        "many": ([i * 65_536 for i in range(40)], 40 * 65_536 + 10),
        "hole-at-end": ([4096], 300_000),
    }
    for name, (offsets, size) in layouts.items():
        with open(root / name, "wb") as f:
            f.truncate(size)
            for i, offset in enumerate(offsets):
                f.seek(offset)
                f.write(bytes([65 + i % 26]) * 4096)
        files[name] = (root / name).read_bytes()
    return files


@pytest.mark.parametrize(
    "args",
    [
        ["--format=gnu"],  # old GNU sparse: 'S' headers and extension blocks
        ["--format=posix", "--sparse-version=0.0"],
        ["--format=posix", "--sparse-version=0.1"],
        ["--format=posix", "--sparse-version=1.0"],
    ],
    ids=["gnu-S", "pax-0.0", "pax-0.1", "pax-1.0"],
)
def test_gnu_tar_sparse(tmp_path: Path, args: list[str]) -> None:
    help_text = subprocess.run([_gnu_tar(), "--help"], capture_output=True, text=True).stdout
    if "--sparse-version" not in help_text:
        pytest.skip("this GNU tar has no --sparse-version")
    files = _sparse_tree(tmp_path / "src")
    data = _run_tar([*args, "--sparse", "-c"], tmp_path / "src")
    members = {m["name"]: m for m in assert_same(data, trickle=False)}
    for name, content in files.items():
        m = members["./" + name]
        assert m["sparse"] is not None, f"GNU tar stored {name} without a sparse map"
        assert m["size"] == len(content)
        assert expand(m["data"], m["sparse"], m["size"]) == content
    if args == ["--format=gnu"]:
        assert members["./many"]["type"] == b"S" and len(members["./many"]["sparse"]) > 25


# --- large data, odd sources ----------------------------------------------------------------


def test_large_member_in_pieces_from_odd_chunks() -> None:
    """3 MiB through read() in small pieces and through read_exact, from sources that
    return all they are asked for or odd chunks (one byte a read: the next test)."""
    big = random.Random(3).randbytes(3 * 1024 * 1024 + 17)
    data = build([F("big", big), F("after", b"after")], tarfile.PAX_FORMAT)
    (ref, after) = assert_same(data, trickle=False)
    assert ref["data"] == big and after["data"] == b"after"

    # read() in small pieces of odd sizes, from a source that returns odd chunks
    for chunk in (None, 4093, 65_537):
        reader = TarReader(Source(data, chunk))
        entry = reader.next()
        assert entry is not None and entry.size == len(big)
        pieces: list[bytes] = []
        sizes = [1, 7, 511, 512, 513, 4096, 100_003]
        while piece := reader.read(sizes[len(pieces) % len(sizes)]):
            pieces.append(piece)
            if len(pieces) == 200:
                break  # leave the rest for next() to skip
        got = b"".join(pieces)
        assert got == big[: len(got)]
        entry = reader.next()  # skips what was not read
        assert entry is not None and entry.name == "after"
        assert reader.read_exact(5) == b"after"
        assert reader.next() is None

    # read_exact over the whole member, from a source that returns odd chunks
    reader = TarReader(Source(data, 4093))
    entry = reader.next()
    assert entry is not None
    assert reader.read_exact(len(big)) == big
    assert reader.read(10) == b""  # the member is done
    assert reader.next() is not None and reader.next() is None


def test_trickle_source_reads_a_large_member() -> None:
    """One byte a read, all through a 128 KiB member (3 MiB would take seconds)."""
    big = random.Random(4).randbytes(128 * 1024 + 3)
    data = build([F("big", big), F("after", b"after")], tarfile.GNU_FORMAT)
    got = read_with_tarreader(data, Trickle(data))
    assert got.error is None and got.members == read_with_tarfile(data).members
    reader = TarReader(Trickle(data))
    assert reader.next() is not None
    assert reader.read_exact(len(big)) == big


# --- intended strictness: tarfile guesses, TarReader refuses ------------------------------


def _strict(data: bytes) -> tuple[Outcome, LayerFormatError]:
    """TarReader raises a one-line LayerFormatError after a prefix of tarfile's members."""
    ref = read_with_tarfile(data)
    got = read_with_tarreader(data)
    assert isinstance(got.error, LayerFormatError), got.error
    assert "\n" not in str(got.error)
    assert got.members == ref.members[: len(got.members)]
    assert disagreement(data) is None
    return ref, got.error


GOOD = build([F("a", b"a" * 600), F("b", b"b")], tarfile.USTAR_FORMAT)


@pytest.mark.parametrize(
    ("data", "tarfile_says"),
    [
        (GOOD[:2560], "end"),  # no end-of-archive block at all
        (GOOD[:1536], "end"),  # ends right after a member's data
        (GOOD[:1536] + b"x" * 100, "end"),  # a partial header
        (GOOD[:600], "error"),  # ends inside data
        (GOOD[:1536] + raw_header(b"bad")[:-1] + b"\1" + END, "end"),  # bad checksum
        (GOOD[:1536] + b"\1" * 512 + END, "end"),  # garbage header
        (GOOD[:1536] + raw_header(b"m", fields={100: b"0000009\0"}) + END, "end"),
        (b"", "error"),
        (b"garbage" * 100, "error"),
        (gnu_long(b"L", b"name") + END, "error"),  # an extended header, then the end
        (pax([(b"path", b"p")]), "error"),
        (pax([(b"GNU.sparse.size", b"abc")]) + raw_header(b"s") + END, "crash"),
        (pax([(b"GNU.sparse.map", b"0,x")]) + raw_header(b"s") + END, "crash"),
        (
            pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")])
            + raw_header(b"s", size=512)
            + pad(b"no newline")
            + END,
            "crash",
        ),
        (old_gnu_sparse(b"s", [(i, 1) for i in range(0, 100, 2)], 100)[:700], "crash"),
    ],
    ids=[
        "no-end-block",
        "ends-after-data",
        "partial-header",
        "ends-in-data",
        "bad-checksum",
        "garbage-header",
        "non-octal-number",
        "empty-stream",
        "garbage-stream",
        "gnu-longname-then-end",
        "pax-then-eof",
        "pax-sparse-size-not-a-number",
        "pax-sparse-map-not-numbers",
        "pax-sparse-1.0-map-without-newline",
        "gnu-sparse-extension-truncated",
    ],
)
def test_strict_where_tarfile_guesses(data: bytes, tarfile_says: str) -> None:
    ref, _ = _strict(data)
    if tarfile_says == "end":
        assert ref.error is None  # tarfile takes it for the end of the archive
    elif tarfile_says == "error":
        assert isinstance(ref.error, tarfile.TarError)
    else:
        assert ref.error is not None and not isinstance(ref.error, tarfile.TarError)


@pytest.mark.parametrize(
    "data",
    [
        pax([(b"comment", b"c")]) * 17 + raw_header(b"f") + END,
        raw_header(b"././@LongLink", b"L", (1 << 20) + 1)
        + bytes((1 << 20) + 512)
        + raw_header(b"f")
        + END,
        raw_header(b"././@LongLink", b"L", b"\xff" * 12) + raw_header(b"f") + END,
    ],
    ids=["17-extended-headers-in-a-row", "extended-header-over-1MiB", "negative-meta-size"],
)
def test_documented_bounds_on_extended_headers(data: bytes) -> None:
    """The module's docstring bounds extended headers in size and in number; tarfile
    reads these (a negative size as 0), TarReader refuses them."""
    ref, _ = _strict(data)
    assert ref.error is None and len(ref.members) == 1


def test_sparse_10_map_number_longer_than_20_digits() -> None:
    """Undocumented bound: tarfile reads the padded number, TarReader refuses it."""
    data = (
        pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")])
        + raw_header(b"s", size=1024)
        + pad(b"1\n" + b"0" * 25 + b"\n5\n")
        + pad(b"hello")
        + END
    )
    ref, _ = _strict(data)
    assert ref.error is None and ref.members[0]["sparse"] == [(0, 5)]


def test_negative_size_above_minus_512_reads_as_empty() -> None:
    data = raw_header(b"neg", size=b"\xff" * 12) + raw_header(b"after") + END
    members = assert_same(data)
    assert [(m["name"], m["size"], m["data"]) for m in members] == [
        ("neg", -1, b""),
        ("after", 0, b""),
    ]


# --- the fuzz -----------------------------------------------------------------------------

FUZZ_SEED = 20240611
FUZZ_ROUNDS = 150  # per seed archive: 600 mutants


def _trim(data: bytes) -> bytes:
    """tarfile pads to 10 KiB: keep one end-of-archive block, so truncation bites."""
    return pad(data.rstrip(b"\0")) + END


def _fuzz_seeds() -> dict[str, bytes]:
    seeds = {
        "pax": build(
            [
                D("d"),
                F("d/" + "n" * 120, b"long name", uid=2**40),
                F("x", b"xattr", pax_headers={"SCHILY.xattr.user.x": "v", "mtime": "1.5"}),
                L("s", tarfile.SYMTYPE, "t" * 110),
                F(LATIN1, b"latin"),
            ],
            tarfile.PAX_FORMAT,
            pax_headers={"comment": "global"},
        ),
        "gnu": build(
            [
                F("f" * 130, b"g" * 700),
                L("h" * 105, tarfile.LNKTYPE, "f" * 130),
                F("big", b"b", uid=2**30, mtime=-5),
                DEV("dev", tarfile.CHRTYPE, 2**25, 7),
            ],
            tarfile.GNU_FORMAT,
        ),
        "ustar": build(
            [F("p" * 80 + "/" + "q" * 90, b"q"), D("dir"), F("e"), F("z", b"z", kind=b"Z")],
            tarfile.USTAR_FORMAT,
        ),
        "sparse": old_gnu_sparse(b"s", [(i * 100, 10) for i in range(8)], 1000)
        + pax_sparse("0.1", b"p1", [(0, 5), (100, 5)], 200)
        + pax_sparse("1.0", b"p2", [(10, 5), (100, 5)], 200)
        + raw_header(b"after")
        + END,
    }
    return {name: _trim(data) for name, data in seeds.items()}


def _headers(data: bytes) -> list[int]:
    """Offsets of the blocks that are valid headers."""
    out = []
    for offset in range(0, len(data) - BLOCK + 1, BLOCK):
        block = data[offset : offset + BLOCK]
        if block != bytes(BLOCK) and fix_checksum(block) == block:
            out.append(offset)
    return out


NUMBER_FIELDS = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)]
SPARSE_FIELDS = [(386 + 12 * i, 12) for i in range(8)] + [(483, 12)]
NUMBERS = [
    b"\xff" * 12,  # -1
    b"\xff" * 10 + b"\xfc\x00",  # -1024
    b"\x80" + bytes(10) + b"\x01",
    b"\x80" + b"\xff" * 11,
    b"77777777777\0",
    b"0\0",
    b" " * 12,
    b"1_0\0",
    b"\x1c7\0",
    b"\xe9\0",
    b"8\0",
    b"-1\0",
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    headers = _headers(data) or [0]
    buf = bytearray(data)
    kind = rng.randrange(8)
    if kind == 0:  # truncate anywhere
        return bytes(buf[: rng.randrange(len(buf))])
    if kind == 1:  # truncate at a block boundary
        return bytes(buf[: BLOCK * rng.randrange(len(buf) // BLOCK)])
    if kind == 2:  # duplicate a block somewhere
        src, dst = rng.randrange(len(buf) // BLOCK), rng.randrange(len(buf) // BLOCK)
        block = buf[src * BLOCK : src * BLOCK + BLOCK]
        return bytes(buf[: dst * BLOCK] + block + buf[dst * BLOCK :])
    if kind == 3:  # drop a block
        at = rng.randrange(len(buf) // BLOCK)
        return bytes(buf[: at * BLOCK] + buf[at * BLOCK + BLOCK :])
    if kind == 4:  # flip bytes anywhere in the data after a header (extended header bodies)
        at = rng.choice(headers) + BLOCK
        for _ in range(rng.randrange(1, 4)):
            pos = min(at + rng.randrange(BLOCK), len(buf) - 1)
            buf[pos] = rng.randrange(256)
        return bytes(buf)
    at = rng.choice(headers)
    if kind == 5:  # a strange number in a number field
        offset, width = rng.choice(NUMBER_FIELDS + SPARSE_FIELDS)
        value = rng.choice(NUMBERS)[:width]
        buf[at + offset : at + offset + len(value)] = value
    elif kind == 6:  # another type flag
        buf[at + 156] = rng.choice(b"0125673456LKSxgXZ\0")
    else:  # random bytes in the header
        for _ in range(rng.randrange(1, 4)):
            buf[at + rng.randrange(BLOCK)] = rng.randrange(256)
    header = bytes(buf[at : at + BLOCK])
    if rng.random() < 0.8:  # mostly keep the checksum right, to get past it
        header = fix_checksum(header)
    buf[at : at + BLOCK] = header
    return bytes(buf)


def _mutants() -> list[tuple[str, bytes]]:
    rng = random.Random(FUZZ_SEED)
    out = []
    for name, data in _fuzz_seeds().items():
        assert_same(data, trickle=False)
        for i in range(FUZZ_ROUNDS):
            out.append((f"{name}#{i}", _mutate(rng, data)))
    return out


def test_fuzz_never_crashes_or_runs_away() -> None:
    """Whatever the damage, TarReader ends (the helpers bound members and reads at the end
    of the source) and fails only with a one-line LayerFormatError. That it agrees with
    tarfile is the next test's business."""
    for i, (label, data) in enumerate(_mutants()):
        got = read_with_tarreader(data)
        assert got.error is None or isinstance(got.error, LayerFormatError), (label, got.error)
        assert got.error is None or "\n" not in str(got.error), label
        if i % 4 == 0:  # one byte a read: the same members, the same end
            slow = read_with_tarreader(data, Trickle(data))
            assert slow.members == got.members, label
            assert type(slow.error) is type(got.error), label


def test_fuzz_agrees_with_tarfile() -> None:
    failures = []
    for label, data in _mutants():
        problem = disagreement(data)
        if problem is not None:
            failures.append(f"{label}: {problem}")
    assert not failures, f"{len(failures)} disagreements:\n" + "\n".join(failures[:20])


# --- disagreements found and fixed: regression tests ---------------------------------------------


def test_ustar_directory_whose_name_is_all_prefix() -> None:
    # tarfile's own USTAR writer splits "d/xxx…/" into prefix "d/xxx…" and name "".
    data = build([D("d/" + "x" * 120)], tarfile.USTAR_FORMAT)
    assert data[0] == 0 and data[345:347] == b"d/"
    assert assert_same(data)[0]["name"] == "d/" + "x" * 120


def test_old_gnu_sparse_struct_that_is_not_a_number() -> None:
    bad = bytearray(old_gnu_sparse(b"s", [(0, 5), (100, 5)], 200))
    bad[386 + 24 : 386 + 24 + 12] = b"zz\0" + bytes(9)
    data = raw_header(b"first") + fix_checksum(bad[:BLOCK]) + bad[BLOCK:] + raw_header(b"n") + END
    ref = read_with_tarfile(data)
    assert ref.error is None and [m["name"] for m in ref.members] == ["first"]  # "the end"
    _strict(data)


@pytest.mark.parametrize("size", [-1024, -600], ids=["tarfile-stops", "tarfile-fails"])
def test_negative_size_of_minus_512_or_less(size: int) -> None:
    field = b"\xff" + (size % 256**11).to_bytes(11, "big")
    data = raw_header(b"first") + raw_header(b"neg", size=field) + raw_header(b"after") + END
    ref = read_with_tarfile(data)
    assert [m["name"] for m in ref.members] == ["first", "neg"]
    _strict(data)


def test_sparse_10_map_longer_than_the_member() -> None:
    data = (
        pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")])
        + raw_header(b"s", size=0)
        + pad(b"1\n0\n0\n")
        + raw_header(b"after")
        + END
    )
    assert isinstance(read_with_tarfile(data).error, tarfile.StreamError)
    _strict(data)


def test_gnu_long_name_without_nul_inside_its_size() -> None:
    data = raw_header(b"././@LongLink", b"L", 5) + pad(b"abcdeXYZ") + raw_header(b"s") + END
    assert assert_same(data)[0]["name"] == "abcdeXYZ"


def test_pax_records_past_the_header_size() -> None:
    body = b"14 path=hello\n13 uid=12345\n"
    data = raw_header(b"PaxHeader", b"x", 14) + pad(body) + raw_header(b"s") + END
    assert assert_same(data)[0]["uid"] == 12345


def test_pax_hdrcharset_found_inside_a_value() -> None:
    data = pax([(b"path", b"a12 hdrcharset=X\nb")]) + raw_header(b"s") + END
    assert assert_same(data)[0]["pax_headers"]["hdrcharset"] == "X"


def test_pax_hdrcharset_not_utf8() -> None:
    data = pax([(b"comment", b"12 hdrcharset=\xff\n")]) + raw_header(b"s") + END
    assert isinstance(read_with_tarfile(data).error, UnicodeDecodeError)
    _strict(data)


def test_sparse_map_in_a_global_header() -> None:
    data = pax([(b"GNU.sparse.map", b"0,5")], b"g") + raw_header(b"f", size=5) + pad(b"hi!!!") + END
    assert assert_same(data)[0]["sparse"] == [(0, 5)]


def test_global_header_before_an_old_gnu_sparse_member() -> None:
    data = pax([(b"comment", b"hi")], b"g") + old_gnu_sparse(b"s", [(0, 5)], 10) + END
    assert assert_same(data)[0]["pax_headers"] == {}


def test_global_size_does_not_move_the_data() -> None:
    data = pax([(b"size", b"3")], b"g") + raw_header(b"f", size=600) + pad(b"a" * 600) + END
    assert assert_same(data)[0]["data"] == b"aaa"


def test_pax_size_before_an_old_gnu_sparse_member() -> None:
    # tarfile skips _block(600) after the 'S' header: over "n", onto the end block.
    data = pax([(b"size", b"600")]) + old_gnu_sparse(b"s", [(0, 5)], 600) + raw_header(b"n") + END
    assert [m["name"] for m in assert_same(data)] == ["s"]


def test_number_field_with_unicode_whitespace() -> None:
    data = raw_header(b"m", fields={100: b"644\x1c\x1d\x1e\x1f\0"}) + END
    assert assert_same(data)[0]["mode"] == 0o644


@pytest.mark.parametrize(
    ("outer", "expected"),
    [(pax([(b"comment", b"c")]), "foo/"), (gnu_long(b"K", b"target"), "foo")],
    ids=["pax-then-longname", "longlink-then-longname"],
)
def test_directory_long_name_with_two_slashes(outer: bytes, expected: str) -> None:
    data = outer + gnu_long(b"L", b"foo//") + raw_header(b"foo", b"5") + END
    assert assert_same(data)[0]["name"] == expected


@pytest.mark.parametrize("at_start", [True, False], ids=["first-header", "later-header"])
def test_extended_header_with_a_bad_number_field(at_start: bool) -> None:
    bad = raw_header(b"PaxHeader", b"x", 0, fields={116: b"8\0"})  # gid "8": not octal
    data = (b"" if at_start else raw_header(b"first")) + bad + raw_header(b"x") + END
    ref = read_with_tarfile(data)
    if at_start:
        assert isinstance(ref.error, tarfile.ReadError) and not ref.members
    else:
        assert ref.error is None and [m["name"] for m in ref.members] == ["first"]
    _strict(data)


def test_read_exact_of_more_than_maxsize() -> None:
    data = raw_header(b"huge", size=b"\x80" + b"\xff" * 11) + pad(b"x") + END
    reader = TarReader(Source(data))
    entry = reader.next()
    assert entry is not None and entry.size == 256**11 - 1
    with pytest.raises(LayerFormatError):
        reader.read_exact(entry.size)


def test_unpack_accepts_old_gnu_sparse_with_fewer_than_4_regions(tmp_path: Path) -> None:
    """Not a tarreader bug: TarReader keeps the (0, 0) slots, as tarfile does, and
    ocistore.unpack then calls the map invalid. GNU tar --format=gnu --sparse writes this
    for every sparse file with fewer than 4 data regions (the end counts as one)."""
    from ocistore.unpack import UnpackOptions, WhiteoutFormat, unpack_layer

    data = old_gnu_sparse(b"s", [(4096, 5), (8192, 0)], 8192) + END
    assert read_with_tarfile(data).members[0]["sparse"] == [(4096, 5), (8192, 0), (0, 0), (0, 0)]
    options = UnpackOptions(whiteouts=WhiteoutFormat.OCI, same_owner=False, devices=False)
    (tmp_path / "dest").mkdir()
    unpack_layer(io.BytesIO(data), str(tmp_path / "dest"), options)
    assert (tmp_path / "dest" / "s").read_bytes() == bytes(4096) + b"AAAAA" + bytes(8192 - 4101)


def _outcome(call: Callable[..., Any], *args: Any) -> Any:
    try:
        return call(*args)
    except Exception:
        return "invalid"


def _tarfile_checksum_ok(buf: bytes) -> bool:
    return tarfile.nti(buf[148:156]) in tarfile.calc_chksums(buf)  # type: ignore[attr-defined]


def test_number_fields_and_checksums_agree_with_tarfile() -> None:
    """The fast paths of the header's number and checksum parsing (one int() call,
    Adler-32 halves) against tarfile's own nti() and calc_chksums(), field by field."""
    from ocistore import tarreader

    rng = random.Random(4)
    alphabet = b"01234567 \x00\x80\xff_x\t\n\x1c89-+"
    fields = [b"0000644\x00", b"0012345 ", b"\x00" * 8, b"644\x00\x00\x00\x00\x00"]
    fields += [b"00000001234\x00", b"\x80" + bytes(10) + b"\x01", b"\xff" * 12, b"0_7\x00"]
    fields += [b"0000644_", b" 644   \x00", b"0644\x00 7 ", b"\x1c644\x00\x00\x00\x00"]
    for _ in range(20000):
        size = rng.choice((8, 12))
        fields.append(bytes(rng.choice(alphabet) for _ in range(size)))
    tarfile_nti = tarfile.nti  # type: ignore[attr-defined]
    for field in fields:
        assert _outcome(tarreader._nti, field) == _outcome(tarfile_nti, field), field

    for _ in range(5000):
        header = bytearray(rng.getrandbits(8) for _ in range(512))
        if rng.random() < 0.5:  # a right checksum, unsigned or signed
            header[148:156] = b" " * 8
            unsigned, signed = tarfile.calc_chksums(bytes(header))  # type: ignore[attr-defined]
            header[148:156] = b"%06o\x00 " % rng.choice((unsigned, signed))
        buf = bytes(header)
        assert _outcome(tarreader._checksum_ok, buf) == _outcome(_tarfile_checksum_ok, buf)


class Chunks:
    """Hands out the given chunks, one per read, as the inflate thread does."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self._next = 0

    def read(self, n: int = -1, /) -> bytes:
        if self._next == len(self.chunks):
            return b""
        self._next += 1
        return self.chunks[self._next - 1]


def test_header_across_chunks_keeps_the_next_chunk_uncopied() -> None:
    """A header split between two chunks is joined from its own 512 bytes; the rest of
    the next chunk is read in place, not copied into a new buffer with the leftover."""
    data = build([F("a", b"x" * 1000), F("b", b"y" * 300_000)], tarfile.USTAR_FORMAT)
    cut = 512 + 1024 + 200  # 200 bytes into b's header
    second = data[cut:]
    reader = TarReader(Chunks([data[:cut], second]))
    first = reader.next()
    assert first is not None and first.name == "a"
    entry = reader.next()
    assert entry is not None and entry.name == "b" and entry.size == 300_000
    assert reader._buf is second  # the chunk itself: no megabyte join per boundary
    assert reader.read_exact(300_000) == b"y" * 300_000
    assert reader.next() is None


def test_read_view_serves_file_data_from_the_chunk_itself() -> None:
    small, big = b"s" * 3000, random.Random(5).randbytes(200_000)
    data = build([F("small", small), F("big", big)], tarfile.USTAR_FORMAT)
    cut = 512 + 3072 + 512 + 50_000  # the chunk boundary falls inside big's data
    first, second = data[:cut], data[cut:]
    reader = TarReader(Chunks([first, second]))
    assert reader.next() is not None
    view = reader.read_view(len(small))
    assert view.obj is first and bytes(view) == small  # no copy of the file's bytes
    assert reader.next() is not None
    pieces = []
    while piece := reader.read_view(len(big)):
        pieces.append(piece)
    assert [p.obj for p in pieces] == [first, second]  # split at the boundary, not joined
    assert b"".join(pieces) == big
    assert reader.next() is None
