"""``tarwriter.pax_header`` against the oracle it replaces: tarfile's PAX headers, byte for
byte, over edge cases and thousands of random members; and what it writes reads back."""

from __future__ import annotations

import io
import random
import tarfile
from typing import Any

import pytest

from ocistore import tarwriter as tw

KINDS = (tw.REGTYPE, tw.LNKTYPE, tw.SYMTYPE, tw.CHRTYPE, tw.BLKTYPE, tw.DIRTYPE, tw.FIFOTYPE)


def _tarfile_header(
    name: str, kind: bytes, pax: dict[str, str] | None = None, **fields: Any
) -> bytes:
    """The oracle: tarfile's own header for the member (its defaults are pax_header's)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    for field, value in fields.items():
        setattr(info, field, value)
    if pax:
        info.pax_headers = dict(pax)
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


EDGES: list[tuple[str, bytes, dict[str, object]]] = [
    ("etc/passwd", tw.REGTYPE, {"size": 1234, "mtime": 1_700_000_000}),
    (".", tw.DIRTYPE, {"mode": 0o755}),
    ("usr/", tw.DIRTYPE, {}),
    ("a" * 99, tw.DIRTYPE, {}),  # 100 with its slash: still fits
    ("a" * 100, tw.DIRTYPE, {}),  # 101 with its slash: a path record
    ("b" * 100, tw.REGTYPE, {}),
    ("b" * 101, tw.REGTYPE, {}),
    ("deep/" * 60 + "file", tw.REGTYPE, {"size": 5}),
    ("usr/share/zoneinfo/Amérique", tw.REGTYPE, {}),
    ("caf\udce9", tw.REGTYPE, {}),  # a raw byte, surrogate-escaped: hdrcharset=BINARY
    ("link", tw.SYMTYPE, {"linkname": "../" * 40}),
    ("link", tw.SYMTYPE, {"linkname": "tårget"}),
    ("hard", tw.LNKTYPE, {"linkname": "etc/passwd"}),
    ("dev/null", tw.CHRTYPE, {"devmajor": 1, "devminor": 3, "mode": 0o666}),
    ("dev/sda", tw.BLKTYPE, {"devmajor": 8, "devminor": 8**7 - 1}),
    ("fifo", tw.FIFOTYPE, {"devmajor": 5}),  # device numbers only for devices
    ("big", tw.REGTYPE, {"size": 8**11}),  # 8 GiB: a size record
    ("big", tw.REGTYPE, {"size": 8**11 - 1}),
    ("ids", tw.REGTYPE, {"uid": 8**7, "gid": 8**7 - 1}),
    ("ids", tw.REGTYPE, {"uid": 2**32 - 1, "gid": 2**32 - 1}),
    ("old", tw.REGTYPE, {"mtime": -1}),
    ("future", tw.REGTYPE, {"mtime": 8**11}),
    ("setuid", tw.REGTYPE, {"mode": 0o104755}),  # file type bits are masked off
    ("ns", tw.REGTYPE, {"mtime": 1, "pax": {"mtime": "1.5"}}),
    ("pax-wins", tw.REGTYPE, {"uid": 8**8, "pax": {"uid": "7"}}),
    ("pax-path", tw.REGTYPE, {"pax": {"path": "other"}}),
    (
        "cap",
        tw.REGTYPE,
        {"pax": {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02", "mtime": "2.25"}},
    ),
    ("bin-xattr", tw.REGTYPE, {"pax": {"SCHILY.xattr.user.raw": "\udcff\udc80"}}),
    ("x" * 90, tw.REGTYPE, {"pax": {"SCHILY.xattr.user.k": "v" * 990}}),  # length digits
    ("names", tw.REGTYPE, {"uname": "root", "gname": "g" * 33}),
]


@pytest.mark.parametrize(("name", "kind", "fields"), EDGES)
def test_edge_cases_equal_tarfile(name: str, kind: bytes, fields: dict[str, object]) -> None:
    assert tw.pax_header(name, kind, **fields) == _tarfile_header(name, kind, **fields)  # type: ignore[arg-type]


def _random_name(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789._-/" + "éß中\udce9\udcff "
    length = rng.choice((1, 5, 20, 60, 98, 99, 100, 101, 102, 150, 300))
    return "".join(rng.choice(alphabet) for _ in range(length))


def _random_number(rng: random.Random, digits: int) -> int:
    limit = 8 ** (digits - 1)
    return rng.choice(
        (0, 1, rng.randrange(limit), limit - 1, limit, limit + rng.randrange(1 << 40), -1)
    )


def test_random_members_equal_tarfile() -> None:
    rng = random.Random(20261129)
    for _ in range(5000):
        kind = rng.choice(KINDS)
        fields: dict[str, object] = {
            "mode": rng.randrange(1 << 18),
            "uid": _random_number(rng, 8),
            "gid": _random_number(rng, 8),
            "size": _random_number(rng, 12),
            "mtime": _random_number(rng, 12),
            "linkname": _random_name(rng) if rng.random() < 0.5 else "",
            "uname": rng.choice(("", "root", "u" * 40, "ü")),
            "gname": rng.choice(("", "wheel", "é")),
        }
        if kind in (tw.CHRTYPE, tw.BLKTYPE):
            fields["devmajor"] = rng.randrange(8**7)
            fields["devminor"] = rng.randrange(8**7)
        if rng.random() < 0.3:
            fields["pax"] = {
                rng.choice(("mtime", "SCHILY.xattr.user.a", "uid", "path")): rng.choice(
                    ("1.5", "x" * rng.randrange(200), "\udcfe", "中")
                )
            }
        name = _random_name(rng)
        ours = tw.pax_header(name, kind, **fields)  # type: ignore[arg-type]
        assert ours == _tarfile_header(name, kind, **fields), (name, kind, fields)  # type: ignore[arg-type]


def test_device_numbers_out_of_range_are_refused_like_tarfile() -> None:
    with pytest.raises(ValueError, match="overflow in number field"):
        _tarfile_header("dev/x", tw.CHRTYPE, devmajor=8**7)
    with pytest.raises(ValueError, match="overflow in number field"):
        tw.pax_header("dev/x", tw.CHRTYPE, devmajor=8**7)


def test_an_unencodable_record_fails_before_a_device_number_like_tarfile() -> None:
    pax = {"SCHILY.xattr.user.k": "\ud800"}
    with pytest.raises(UnicodeEncodeError):
        _tarfile_header("dev/x", tw.CHRTYPE, pax=pax, devmajor=8**7)
    with pytest.raises(UnicodeEncodeError):
        tw.pax_header("dev/x", tw.CHRTYPE, pax=pax, devmajor=8**7)


def test_headers_read_back_with_tarfile() -> None:
    out = io.BytesIO()
    members: list[tuple[str, bytes, dict[str, object]]] = [
        ("dir", tw.DIRTYPE, {"mode": 0o755, "mtime": 1_600_000_000}),
        ("dir/" + "long" * 40, tw.REGTYPE, {"size": 3, "uid": 8**8, "pax": {"mtime": "5.5"}}),
        ("dir/lnk", tw.SYMTYPE, {"linkname": "ümlaut"}),
    ]
    for name, kind, fields in members:
        out.write(tw.pax_header(name, kind, **fields))  # type: ignore[arg-type]
        if fields.get("size"):
            out.write(b"abc" + bytes(tw.BLOCK - 3))
    out.write(bytes(2 * tw.BLOCK))
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r:") as tar:
        got = tar.getmembers()
    assert [m.name for m in got] == ["dir", "dir/" + "long" * 40, "dir/lnk"]
    assert got[1].uid == 8**8 and got[1].mtime == 5.5 and got[1].size == 3
    assert got[2].linkname == "ümlaut"
    assert got[0].isdir() and got[0].mode == 0o755
