"""Tests for ocistore.unpack: one layer tar into its own directory, safely.

Every test runs next to a canary directory (a file, a directory, a symlink) whose full
state is snapshotted before and compared after, and checks that nothing was created beside
``dest`` — whatever the layer tried.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ocistore.errors import (
    LayerFormatError,
    NetworkError,
    OcistoreError,
    StorageError,
    UnsafeLayerError,
)
from ocistore.unpack import (
    UnpackOptions,
    UnpackResult,
    WhiteoutFormat,
    probe_whiteout_format,
    unpack_layer,
)

ROOT = os.geteuid() == 0
needs_root = [
    pytest.mark.root,
    pytest.mark.skipif(not ROOT, reason="needs root (mknod, chown, trusted.* xattrs)"),
]
OCI = WhiteoutFormat.OCI
OVERLAY = WhiteoutFormat.OVERLAY
OPAQUE = {"trusted.overlay.opaque": b"y"}
MTIME = 1_600_000_000

# --- building archives -------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def _info(name: str, kind: bytes, mode: int, **kw: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = kw.pop("mtime", MTIME)
    ti.uid = kw.pop("uid", 0)
    ti.gid = kw.pop("gid", 0)
    ti.linkname = kw.pop("linkname", "")
    ti.devmajor = kw.pop("major", 0)
    ti.devminor = kw.pop("minor", 0)
    pax = kw.pop("pax", None)
    if pax:
        ti.pax_headers = dict(pax)
    assert not kw, kw
    return ti


def F(name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Member:
    return _info(name, kw.pop("kind", tarfile.REGTYPE), mode, **kw), data


def D(name: str, mode: int = 0o755, **kw: Any) -> Member:
    return _info(name, tarfile.DIRTYPE, mode, **kw), None


def L(name: str, target: str | Path, **kw: Any) -> Member:
    return _info(name, tarfile.SYMTYPE, 0o777, linkname=str(target), **kw), None


def H(name: str, target: str | Path, mode: int = 0o644, **kw: Any) -> Member:
    return _info(name, tarfile.LNKTYPE, mode, linkname=str(target), **kw), None


def C(name: str, major: int, minor: int, mode: int = 0o666) -> Member:
    return _info(name, tarfile.CHRTYPE, mode, major=major, minor=minor), None


def B(name: str, major: int, minor: int, mode: int = 0o660) -> Member:
    return _info(name, tarfile.BLKTYPE, mode, major=major, minor=minor), None


def P(name: str, mode: int = 0o644) -> Member:
    return _info(name, tarfile.FIFOTYPE, mode), None


def build(
    members: list[Member],
    *,
    fmt: int = tarfile.PAX_FORMAT,
    end: bool = True,
    global_pax: dict[str, str] | None = None,
) -> bytes:
    buf = io.BytesIO()
    tar = tarfile.open(  # noqa: SIM115 - left open on purpose when end=False
        fileobj=buf,
        mode="w",
        format=fmt,
        pax_headers=global_pax or {},
        encoding="utf-8",
        errors="surrogateescape",
    )
    for info, data in members:
        if data is None:
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if not end:
        return buf.getvalue()  # no end-of-archive blocks
    tar.close()
    return buf.getvalue()


def ustar(
    name: bytes,
    *,
    typeflag: bytes = b"0",
    size: int = 0,
    prefix: bytes = b"",
    linkname: bytes = b"",
    mode: int = 0o644,
) -> bytes:
    """One raw ustar header block, for what tarfile would not write."""
    h = bytearray(512)
    h[0:100] = name.ljust(100, b"\0")
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"%07o\0" % 0
    h[116:124] = b"%07o\0" % 0
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % MTIME
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:257] = linkname.ljust(100, b"\0")
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[345:500] = prefix.ljust(155, b"\0")
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


END = b"\0" * 1024


class Trickle:
    """A non-seekable stream that hands out short reads of odd sizes."""

    def __init__(self, data: bytes, step: int = 7001) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            n = len(self._data)
        n = min(n, self._step)
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(out)
        return out


# --- observing the filesystem ------------------------------------------------------------


def _xattrs(path: bytes) -> dict[str, bytes]:
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
        if name != "security.selinux"
    }


def _describe(path: bytes) -> tuple[Any, ...]:
    st = os.lstat(path)
    perm = stat.S_IMODE(st.st_mode)
    out: tuple[Any, ...]
    if stat.S_ISDIR(st.st_mode):
        out = ("d", perm)
    elif stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            out = ("f", perm, f.read())
    elif stat.S_ISLNK(st.st_mode):
        return ("l", os.fsdecode(os.readlink(path)))
    elif stat.S_ISCHR(st.st_mode):
        return ("c", os.major(st.st_rdev), os.minor(st.st_rdev), perm)
    elif stat.S_ISBLK(st.st_mode):
        return ("b", os.major(st.st_rdev), os.minor(st.st_rdev), perm)
    elif stat.S_ISFIFO(st.st_mode):
        return ("p", perm)
    else:  # pragma: no cover
        raise AssertionError(f"unexpected file type at {path!r}")
    xattrs = _xattrs(path)
    return (*out, xattrs) if xattrs else out


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root`` (not root itself): kind, permissions, content/target,
    and xattrs when there are any."""
    base = os.fsencode(root)
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.fsdecode(os.path.relpath(full, base))] = _describe(full)
    return out


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Full state of a tree, with times, owners, inode numbers and link counts."""
    base = os.fsencode(root)
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [b".", *dirnames, *filenames]:
            full = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(full)
            out[os.fsdecode(os.path.relpath(full, base))] = (
                _describe(full),
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_ino,
                st.st_nlink,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
    return out


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.dest = tmp_path / "dest"
        self.dest.mkdir()
        self.canary = tmp_path / "canary"
        (self.canary / "dir").mkdir(parents=True)
        (self.canary / "file").write_bytes(b"canary")
        (self.canary / "dir" / "inner").write_bytes(b"inner")
        (self.canary / "link").symlink_to(self.canary / "file")
        os.utime(self.canary / "dir", ns=(1, 1))
        self.before = snapshot(self.canary)
        self.parent_before = sorted(os.listdir(tmp_path.parent))

    def unpack(
        self,
        data: bytes,
        fmt: WhiteoutFormat = OCI,
        *,
        same_owner: bool = ROOT,
        devices: bool = ROOT,
        step: int = 7001,
    ) -> UnpackResult:
        options = UnpackOptions(whiteouts=fmt, same_owner=same_owner, devices=devices)
        return unpack_layer(Trickle(data, step), str(self.dest), options)

    def tree(self) -> dict[str, tuple[Any, ...]]:
        return tree(self.dest)

    def check_untouched(self) -> None:
        assert snapshot(self.canary) == self.before
        assert sorted(os.listdir(self.tmp)) == ["canary", "dest"]
        assert sorted(os.listdir(self.tmp.parent)) == self.parent_before
        # No descriptor leaked: none still points below this test's directory. (Counting all
        # of the process's descriptors would also count other threads', e.g. the test
        # registries' servers, which come and go.)
        assert _fds_below(self.tmp) == []


def _fds_below(path: Path) -> list[str]:
    prefix = str(path) + "/"
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix) or target == str(path):
            found.append(target)
    return found


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.check_untouched()


def _formats(*formats: WhiteoutFormat) -> list[Any]:
    return [pytest.param(f, id=f.value, marks=needs_root if f is OVERLAY else []) for f in formats]


# --- the hostile suite -------------------------------------------------------------------


Tree = dict[str, tuple[Any, ...]]


@dataclass
class Case:
    id: str
    layer: Callable[[Path], list[Member] | bytes]  # gets the canary path
    error: type[OcistoreError] | None = None
    match: str = ""
    tree: Tree | Callable[[Path], Tree] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    formats: tuple[WhiteoutFormat, ...] = (OCI, OVERLAY)
    options: dict[str, bool] = field(default_factory=dict)


def _gnu_sparse_truncated(_: Path) -> bytes:
    """An old-style GNU sparse header that promises an extension block, then the end."""
    h = bytearray(ustar(b"sp", typeflag=b"S"))
    h[482] = 1  # isextended
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _sparse_bad_map(_: Path) -> list[Member]:
    pax = {"GNU.sparse.map": "0,5,3,5", "GNU.sparse.size": "100"}
    return [F("sp", b"helloworld", pax=pax)]


HOSTILE = [
    Case("dotdot", lambda c: [F("../x", b"evil")], UnsafeLayerError, "'..' component"),
    Case("dotdot-nested", lambda c: [F("a/../../x")], UnsafeLayerError, "'..' component"),
    Case("dotdot-inner", lambda c: [F("a/../b")], UnsafeLayerError, "'..' component"),
    Case("dotdot-dir", lambda c: [D("..")], UnsafeLayerError, "'..' component"),
    Case(
        "dotdot-in-ustar-prefix",
        lambda c: ustar(b"x", prefix=b"..") + END,
        UnsafeLayerError,
        "'..' component",
    ),
    Case(
        "absolute-lands-inside",
        lambda c: [F("/abs/path", b"in"), F(f"{c}/file", b"also in")],
        tree=lambda c: {
            "abs": ("d", 0o755),
            "abs/path": ("f", 0o644, b"in"),
            # The canary's absolute path, re-rooted below dest.
            **{"/".join(c.parts[1 : i + 1]): ("d", 0o755) for i in range(1, len(c.parts))},
            "/".join([*c.parts[1:], "file"]): ("f", 0o644, b"also in"),
        },
    ),
    Case(
        "symlink-abs-then-child",
        lambda c: [L("a", c), F("a/x", b"evil")],
        UnsafeLayerError,
        "path through symlink 'a'",
    ),
    Case(
        "symlink-dotdot-then-child",
        lambda c: [L("a", ".."), F("a/canary/file", b"evil")],
        UnsafeLayerError,
        "path through symlink 'a'",
    ),
    Case(
        "symlink-then-file-at-its-name",
        lambda c: [L("a", c / "file"), F("a", b"new")],
        tree={"a": ("f", 0o644, b"new")},
    ),
    Case(
        "symlink-then-dir-at-its-name-oci",
        lambda c: [L("a", c / "dir"), D("a", 0o700), F("a/x", b"x")],
        tree={"a": ("d", 0o700), "a/x": ("f", 0o644, b"x"), ".wh.a": ("f", 0o644, b"")},
        formats=(OCI,),
    ),
    Case(
        "symlink-then-dir-at-its-name-overlay",
        lambda c: [L("a", c / "dir"), D("a", 0o700), F("a/x", b"x")],
        tree={"a": ("d", 0o700, OPAQUE), "a/x": ("f", 0o644, b"x")},
        formats=(OVERLAY,),
    ),
    Case(
        "hardlink-dotdot",
        lambda c: [H("h", "../canary/file")],
        UnsafeLayerError,
        "'..' component",
    ),
    Case(
        "hardlink-absolute-host-path",
        lambda c: [H("h", c / "file")],
        UnsafeLayerError,
        "is not an entry of this layer",
    ),
    Case(
        "hardlink-to-symlink-then-file",
        lambda c: [L("s", c / "file"), H("h", "s"), F("h", b"new", mode=0o600)],
        tree=lambda c: {"s": ("l", f"{c}/file"), "h": ("f", 0o600, b"new")},
    ),
    Case(
        "hardlink-to-symlink-mode-not-applied",
        lambda c: [L("s", c / "file"), H("h", "s", mode=0o4777, uid=1234)],
        tree=lambda c: {"s": ("l", f"{c}/file"), "h": ("l", f"{c}/file")},
    ),
    Case(
        "hardlink-to-directory",
        lambda c: [D("d"), H("h", "d")],
        UnsafeLayerError,
        "points at a directory",
    ),
    Case(
        "hardlink-to-implicit-directory",
        lambda c: [F("d/f"), H("h", "d")],
        UnsafeLayerError,
        "points at a directory",
    ),
    Case("hardlink-missing", lambda c: [H("h", "nope")], UnsafeLayerError, "not an entry"),
    Case(
        "hardlink-through-symlink",
        lambda c: [L("s", c), H("h", "s/file")],
        UnsafeLayerError,
        "path through symlink 's'",
    ),
    Case("hardlink-to-itself", lambda c: [F("f"), H("f", "f")], UnsafeLayerError, "itself"),
    Case("hardlink-to-root", lambda c: [H("h", "./")], UnsafeLayerError, "layer root"),
    Case(
        "hardlink-to-whiteout-marker",
        lambda c: [F(".wh.x"), H("h", ".wh.x")],
        UnsafeLayerError,
        "points at a whiteout",
    ),
    Case(
        "hardlink-to-whited-out-name",
        lambda c: [F(".wh.x"), H("h", "x")],
        UnsafeLayerError,
        "not an entry of this layer",
    ),
    Case("root-as-symlink", lambda c: [L(".", c)], UnsafeLayerError, "layer root"),
    Case("root-as-file", lambda c: [F("/", b"x")], UnsafeLayerError, "layer root"),
    Case("root-as-hardlink", lambda c: [F("f"), H("./", "f")], UnsafeLayerError, "layer root"),
    Case(
        "dir-replaced-by-symlink-then-child",
        lambda c: [D("d"), F("d/a"), L("d", c), F("d/file", b"evil")],
        UnsafeLayerError,
        "path through symlink 'd'",
    ),
    Case(
        "dir-with-outward-symlinks-replaced-by-file",
        lambda c: [D("d"), L("d/s", c), L("d/t", c / "dir"), F("d", b"flat")],
        tree={"d": ("f", 0o644, b"flat")},
    ),
    Case(
        "parent-is-a-file",
        lambda c: [F("f"), F("f/x")],
        UnsafeLayerError,
        "parent 'f' is not a directory",
    ),
    Case("whiteout-empty-name", lambda c: [F(".wh.")], UnsafeLayerError, "invalid whiteout"),
    Case("whiteout-dot", lambda c: [F(".wh..")], UnsafeLayerError, "invalid whiteout"),
    Case("whiteout-dot-in-subdir", lambda c: [F("etc/.wh..")], UnsafeLayerError, "invalid"),
    Case("whiteout-dotdot", lambda c: [F(".wh...")], UnsafeLayerError, "invalid whiteout"),
    Case("whiteout-meta-other", lambda c: [F(".wh..wh.foo")], UnsafeLayerError, "invalid"),
    Case(
        # A whiteout below a symlink of this layer has nothing left to hide (the symlink
        # hides the lower path already): it is skipped, and nothing is followed.
        "whiteout-through-symlink",
        lambda c: [L("link", c), F("link/.wh.file")],
        tree=lambda c: {"link": ("l", str(c))},
    ),
    Case(
        "opaque-through-symlink",
        lambda c: [L("link", c / "dir"), F("link/.wh..wh..opq")],
        tree=lambda c: {"link": ("l", f"{c}/dir")},
    ),
    Case(
        # umoci's shape for a directory replaced by a file: the old children's whiteouts
        # come after the file, below it.
        "whiteouts-below-a-file-that-replaced-a-dir",
        lambda c: [F("cows", b"now a file"), F("cows/.wh.a.cow"), F("cows/.wh..wh..opq")],
        tree={"cows": ("f", 0o644, b"now a file")},
    ),
    Case(
        "real-entry-below-a-file-is-still-refused",
        lambda c: [F("cows", b"now a file"), F("cows/x")],
        UnsafeLayerError,
        "parent 'cows' is not a directory",
    ),
    Case(
        "whiteout-as-symlink",
        lambda c: [L(".wh.file", c / "file")],
        UnsafeLayerError,
        "is not a regular file",
    ),
    Case("whiteout-as-directory", lambda c: [D(".wh.d")], UnsafeLayerError, "not a regular"),
    Case("below-a-whiteout-name", lambda c: [F(".wh.a/b")], UnsafeLayerError, "below a whiteout"),
    Case("chardev-0-0", lambda c: [C("c", 0, 0)], UnsafeLayerError, "0/0 character device"),
    Case(
        "smuggled-trusted-overlay-opaque",
        lambda c: [D("d", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})],
        tree={"d": ("d", 0o755)},
        warnings=["dropped overlay xattr 'trusted.overlay.opaque': d"],
    ),
    Case(
        "smuggled-user-overlay-xattrs",
        lambda c: [
            F("f", pax={"SCHILY.xattr.user.overlay.opaque": "y"}),
            F("g", pax={"SCHILY.xattr.user.overlay.opaque": "y"}),
            D("d", pax={"SCHILY.xattr.trusted.overlay.redirect": "/etc"}),
        ],
        tree={"f": ("f", 0o644, b""), "g": ("f", 0o644, b""), "d": ("d", 0o755)},
        warnings=[
            "dropped overlay xattr 'user.overlay.opaque': f and 1 more",
            "dropped overlay xattr 'trusted.overlay.redirect': d",
        ],
    ),
    Case(
        "devices-disabled",
        lambda c: [C("null", 1, 3), B("sda", 8, 0), P("fifo", 0o640)],
        tree={"fifo": ("p", 0o640)},
        warnings=["skipped device node (devices disabled): null and 1 more"],
        options={"devices": False},
    ),
    Case("nul-in-pax-path", lambda c: [F("x", pax={"path": "a\0b"})], UnsafeLayerError, "NUL"),
    Case("component-too-long", lambda c: [F("x" * 300)], UnsafeLayerError, "name too long"),
    Case(
        "path-too-long",
        lambda c: [F("/".join(["d" * 200] * 25))],
        UnsafeLayerError,
        "longer than 4096 bytes",
    ),
    Case("symlink-empty-target", lambda c: [L("s", "")], UnsafeLayerError, "empty or invalid"),
    Case(
        "invalid-uid",
        lambda c: [F("f", pax={"uid": str(2**32 - 1)})],
        UnsafeLayerError,
        "invalid uid 4294967295",
    ),
    Case(
        "huge-pax-header",
        lambda c: build([F("f")], global_pax={"comment": "x" * (2 << 20)}),
        LayerFormatError,
        "extended header of",
    ),
    Case("bad-sparse-map", _sparse_bad_map, LayerFormatError, "invalid sparse map"),
    Case(
        "garbage-sparse-map",
        lambda c: [F("sp", b"x", pax={"GNU.sparse.map": "zz,1"})],
        LayerFormatError,
        "'sp' has an invalid sparse map",
    ),
    Case(
        # 10000 bytes mapped, 1 stored: used to spin forever writing empty reads
        "sparse-map-beyond-stored-data",
        lambda c: [F("sp", b"x", pax={"GNU.sparse.map": "0,10000", "GNU.sparse.size": "10000"})],
        LayerFormatError,
        "truncated in the data of 'sp'",
    ),
    Case(
        "truncated-gnu-sparse-extension",
        _gnu_sparse_truncated,
        LayerFormatError,
        "truncated in a GNU sparse extension",
    ),
    Case("empty-stream", lambda c: b"", LayerFormatError, "empty or truncated"),
    Case(
        "truncated-in-data",
        lambda c: build([F("a", b"x" * 2000)])[: 512 + 1000],
        LayerFormatError,
        "truncated in the data of 'a'",
    ),
    Case(
        "truncated-in-padding",
        lambda c: build([F("a", b"x" * 2000)], fmt=tarfile.USTAR_FORMAT)[: 512 + 2000],
        LayerFormatError,
        "unexpected end of data",
    ),
    Case(
        "truncated-in-header",
        lambda c: build([F("a", b"x"), F("b", b"y")], fmt=tarfile.USTAR_FORMAT)[: 1024 + 300],
        LayerFormatError,
        "truncated inside a header",
    ),
    Case(
        "truncated-in-pax-header",
        lambda c: build([F("n" * 150, b"x")])[:600],
        LayerFormatError,
        "truncated",
    ),
    Case(
        "truncated-after-global-header",
        lambda c: build([F("a")], global_pax={"comment": "c"})[:1024],
        LayerFormatError,
        "empty or truncated",
    ),
    Case(
        "no-end-of-archive",
        lambda c: build([F("a", b"x"), F("b", b"y")], end=False),
        LayerFormatError,
        "empty or truncated",
    ),
    Case(
        "garbage-header",
        lambda c: build([F("a", b"x")], end=False) + b"\x01" * 512 + END,
        LayerFormatError,
        "invalid header",
    ),
]


def _hostile_params() -> list[Any]:
    params = []
    for case in HOSTILE:
        for fmt in case.formats:
            marks = needs_root if fmt is OVERLAY else []
            params.append(pytest.param(case, fmt, id=f"{case.id}-{fmt.value}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "fmt"), _hostile_params())
def test_hostile(env: Env, case: Case, fmt: WhiteoutFormat) -> None:
    layer = case.layer(env.canary)
    data = layer if isinstance(layer, bytes) else build(layer)
    if case.error is not None:
        with pytest.raises(case.error, match=case.match) as info:
            env.unpack(data, fmt, **case.options)
        assert isinstance(info.value, case.error)
    else:
        result = env.unpack(data, fmt, **case.options)
        expected = case.tree(env.canary) if callable(case.tree) else case.tree
        assert env.tree() == expected
        assert result.warnings == case.warnings
    env.check_untouched()


def test_hostile_suite_is_big_enough() -> None:
    assert len(HOSTILE) >= 25


# --- whiteouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("wh_first", [True, False], ids=["whiteout-first", "entry-first"])
@pytest.mark.parametrize("fmt", _formats(OCI, OVERLAY))
def test_whiteout_and_same_name_file(env: Env, fmt: WhiteoutFormat, wh_first: bool) -> None:
    members = [F(".wh.x"), F("x", b"real")]
    env.unpack(build(members if wh_first else members[::-1]), fmt)
    if fmt is OVERLAY:
        assert env.tree() == {"x": ("f", 0o644, b"real")}  # a file hides the lower x anyway
    else:
        assert env.tree() == {"x": ("f", 0o644, b"real"), ".wh.x": ("f", 0o644, b"")}


@pytest.mark.parametrize("wh_first", [True, False], ids=["whiteout-first", "entry-first"])
@pytest.mark.parametrize("fmt", _formats(OCI, OVERLAY))
def test_whiteout_and_same_name_dir(env: Env, fmt: WhiteoutFormat, wh_first: bool) -> None:
    members = [F(".wh.x"), D("x", 0o750), F("x/child", b"c")]
    env.unpack(build(members if wh_first else [*members[1:], members[0]]), fmt)
    if fmt is OVERLAY:
        assert env.tree() == {"x": ("d", 0o750, OPAQUE), "x/child": ("f", 0o644, b"c")}
    else:
        assert env.tree() == {
            "x": ("d", 0o750),
            "x/child": ("f", 0o644, b"c"),
            ".wh.x": ("f", 0o644, b""),
        }


@pytest.mark.parametrize("fmt", _formats(OCI, OVERLAY))
def test_whiteout_then_implicit_dir(env: Env, fmt: WhiteoutFormat) -> None:
    env.unpack(build([F("a/.wh.x"), F("a/x/child", b"c")]), fmt)
    expected: dict[str, tuple[Any, ...]] = {"a": ("d", 0o755), "a/x/child": ("f", 0o644, b"c")}
    if fmt is OVERLAY:
        expected["a/x"] = ("d", 0o755, OPAQUE)
    else:
        expected["a/x"] = ("d", 0o755)
        expected["a/.wh.x"] = ("f", 0o644, b"")
    assert env.tree() == expected


@pytest.mark.parametrize("fmt", _formats(OCI, OVERLAY))
def test_plain_whiteouts(env: Env, fmt: WhiteoutFormat) -> None:
    result = env.unpack(build([D("etc"), F("etc/.wh.passwd"), F(".wh.tmp"), F(".wh.tmp")]), fmt)
    assert result.entries == 4
    assert not result.opaque_root
    if fmt is OVERLAY:
        assert env.tree() == {
            "etc": ("d", 0o755),
            "etc/passwd": ("c", 0, 0, 0),
            "tmp": ("c", 0, 0, 0),
        }
    else:
        assert env.tree() == {
            "etc": ("d", 0o755),
            "etc/.wh.passwd": ("f", 0o644, b""),
            ".wh.tmp": ("f", 0o644, b""),
        }


@pytest.mark.parametrize("fmt", _formats(OCI, OVERLAY))
def test_opaque_at_root(env: Env, fmt: WhiteoutFormat) -> None:
    result = env.unpack(build([F(".wh..wh..opq"), F("keep", b"k")]), fmt)
    assert result.opaque_root
    if fmt is OVERLAY:
        assert env.tree() == {"keep": ("f", 0o644, b"k")}
        assert _xattrs(os.fsencode(env.dest)) == OPAQUE
    else:
        assert env.tree() == {"keep": ("f", 0o644, b"k"), ".wh..wh..opq": ("f", 0o644, b"")}
        assert _xattrs(os.fsencode(env.dest)) == {}


@pytest.mark.parametrize("fmt", _formats(OCI, OVERLAY))
def test_opaque_in_subdir(env: Env, fmt: WhiteoutFormat) -> None:
    # The marker after the directory's content, and for a directory never named itself.
    result = env.unpack(
        build([D("a"), F("a/b/new", b"n"), F("a/b/.wh..wh..opq"), F("c/.wh..wh..opq")]), fmt
    )
    assert not result.opaque_root
    if fmt is OVERLAY:
        assert env.tree() == {
            "a": ("d", 0o755),
            "a/b": ("d", 0o755, OPAQUE),
            "a/b/new": ("f", 0o644, b"n"),
            "c": ("d", 0o755, OPAQUE),
        }
    else:
        assert env.tree() == {
            "a": ("d", 0o755),
            "a/b": ("d", 0o755),
            "a/b/new": ("f", 0o644, b"n"),
            "a/b/.wh..wh..opq": ("f", 0o644, b""),
            "c": ("d", 0o755),
            "c/.wh..wh..opq": ("f", 0o644, b""),
        }


@pytest.mark.parametrize("fmt", _formats(OCI, OVERLAY))
def test_file_replaced_by_dir_hides_lower_content(env: Env, fmt: WhiteoutFormat) -> None:
    # Applied in sequence over lower layers, the file would have removed the lower directory:
    # the directory that replaces it within the layer must not show lower content again.
    env.unpack(build([F("p", b"file"), D("p"), F("p/x", b"x")]), fmt)
    if fmt is OVERLAY:
        assert env.tree() == {"p": ("d", 0o755, OPAQUE), "p/x": ("f", 0o644, b"x")}
    else:
        assert env.tree() == {
            "p": ("d", 0o755),
            "p/x": ("f", 0o644, b"x"),
            ".wh.p": ("f", 0o644, b""),
        }


@pytest.mark.parametrize("fmt", _formats(OCI, OVERLAY))
def test_whiteout_hardlink_entry_is_accepted(env: Env, fmt: WhiteoutFormat) -> None:
    env.unpack(build([F("f"), H(".wh.gone", "f")]), fmt)
    gone = ("c", 0, 0, 0) if fmt is OVERLAY else None
    expected: dict[str, tuple[Any, ...]] = {"f": ("f", 0o644, b"")}
    if gone:
        expected["gone"] = gone
    else:
        expected[".wh.gone"] = ("f", 0o644, b"")
    assert env.tree() == expected


# --- entry types and metadata ------------------------------------------------------------


def test_regular_tree_and_counts(env: Env) -> None:
    big = bytes(range(256)) * (3 * 4096 + 7)  # > 3 MiB: several chunks
    result = env.unpack(
        build([D("./"), D("./usr"), F("./usr/big", big, mode=0o600), F("usr/small", b"s")])
    )
    assert result.entries == 4
    assert result.size == len(big) + 1
    assert result.warnings == []
    assert env.tree() == {
        "usr": ("d", 0o755),
        "usr/big": ("f", 0o600, big),
        "usr/small": ("f", 0o644, b"s"),
    }


def test_root_entry_metadata_applies_to_dest(env: Env) -> None:
    env.unpack(build([D("./", 0o750, mtime=123456789), F("x")]))
    st = os.stat(env.dest)
    assert stat.S_IMODE(st.st_mode) == 0o750
    assert st.st_mtime_ns == 123456789 * 10**9


def test_symlinks_stored_verbatim(env: Env) -> None:
    env.unpack(build([L("abs", "/etc/passwd"), L("rel", "../../../x"), L("dot", ".")]))
    assert env.tree() == {
        "abs": ("l", "/etc/passwd"),
        "rel": ("l", "../../../x"),
        "dot": ("l", "."),
    }
    assert os.lstat(env.dest / "abs").st_mtime_ns == MTIME * 10**9


def test_hardlinks_share_inode_and_keep_target_metadata(env: Env) -> None:
    env.unpack(build([F("f", b"data", mode=0o600), H("h", "f", mode=0o777), H("/g", "./f")]))
    st_f, st_h = os.lstat(env.dest / "f"), os.lstat(env.dest / "h")
    assert st_f.st_ino == st_h.st_ino == os.lstat(env.dest / "g").st_ino
    assert st_f.st_nlink == 3
    assert stat.S_IMODE(st_h.st_mode) == 0o600


def test_duplicate_files_last_wins(env: Env) -> None:
    result = env.unpack(
        build([F("f", b"one"), H("h", "f"), F("f", b"two", mode=0o600), F("f", b"three")])
    )
    assert result.entries == 4
    assert env.tree() == {"f": ("f", 0o644, b"three"), "h": ("f", 0o644, b"one")}


def test_duplicate_dirs_merge_later_metadata(env: Env) -> None:
    env.unpack(build([D("d", 0o700, mtime=1), F("d/x", b"x"), D("d", 0o751, mtime=2)]))
    assert env.tree() == {"d": ("d", 0o751), "d/x": ("f", 0o644, b"x")}
    assert os.stat(env.dest / "d").st_mtime_ns == 2 * 10**9


def test_dir_replaced_by_file_is_removed_entirely(env: Env) -> None:
    env.unpack(build([D("d"), D("d/e"), F("d/e/f"), L("d/l", "/"), F("d", b"file")]))
    assert env.tree() == {"d": ("f", 0o644, b"file")}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_and_deep_paths(env: Env, fmt: int) -> None:
    long_dir = "/".join(["d" * 60] * 4)
    long_name = f"{long_dir}/{'f' * 120}"  # 364 characters
    deep = "/".join(["a"] * 150) + "/leaf"
    link_target = "t" * 200
    env.unpack(build([F(long_name, b"long"), F(deep, b"deep"), L("l", link_target)], fmt=fmt))
    with open(env.dest / long_name, "rb") as f:
        assert f.read() == b"long"
    with open(env.dest / deep, "rb") as f:
        assert f.read() == b"deep"
    assert os.readlink(env.dest / "l") == link_target


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_non_utf8_names_round_trip(env: Env, fmt: int) -> None:
    name = os.fsdecode(b"caf\xe9")
    target = os.fsdecode(b"tar\xffget")
    env.unpack(build([D(name), F(f"{name}/x", b"x"), L(os.fsdecode(b"l\xfe"), target)], fmt=fmt))
    assert sorted(os.listdir(os.fsencode(env.dest))) == [b"caf\xe9", b"l\xfe"]
    assert os.listdir(os.path.join(os.fsencode(env.dest), b"caf\xe9")) == [b"x"]
    assert os.readlink(os.path.join(os.fsencode(env.dest), b"l\xfe")) == b"tar\xffget"


def test_pax_global_header_makes_no_entry(env: Env) -> None:
    data = build([F("a", b"a"), D("d")], global_pax={"comment": "made by a test"})
    result = env.unpack(data)
    assert result.entries == 2
    assert env.tree() == {"a": ("f", 0o644, b"a"), "d": ("d", 0o755)}


def test_pax_fractional_mtime_is_exact(env: Env) -> None:
    env.unpack(build([F("t", pax={"mtime": "1234567890.123456789"})]))
    assert os.lstat(env.dest / "t").st_mtime_ns == 1234567890123456789


def test_many_dirs_and_very_deep_path(env: Env) -> None:
    # More directories than the descriptor cache holds, revisited out of order, and a path
    # deeper than the cache: the walk must close what it does not cache.
    members = [F(f"d{i:03d}/a", b"a") for i in range(300)]
    members += [F(f"d{i:03d}/b", b"b") for i in range(0, 300, 7)]
    deep = "/".join(["x"] * 400)
    members += [F(f"{deep}/leaf", b"deep"), D("x", 0o711)]
    result = env.unpack(build(members))
    assert result.entries == len(members)
    tree = env.tree()
    assert len(tree) == 300 + 300 + len(range(0, 300, 7)) + 400 + 1
    assert tree["d007/b"] == ("f", 0o644, b"b")
    assert tree[f"{deep}/leaf"] == ("f", 0o644, b"deep")
    assert tree["x"] == ("d", 0o711)


def test_dir_mtime_survives_children(env: Env) -> None:
    env.unpack(
        build([D("m", mtime=1234567890), F("m/a"), D("m/sub", mtime=1000), F("m/sub/deep/x")])
    )
    assert os.stat(env.dest / "m").st_mtime_ns == 1234567890 * 10**9
    assert os.stat(env.dest / "m/sub").st_mtime_ns == 1000 * 10**9


def test_directory_modes_owners_and_times_whether_mkdir_sets_them_or_the_end(env: Env) -> None:
    # A directory whose final mode and owner mkdir can give is made so and only gets its
    # mtime at the end; the others are made 0700 and fixed at the end. Both must end alike.
    members = [
        D("plain", 0o755, mtime=11),
        D("sticky", 0o1777, mtime=12),
        D("setgid", 0o2755, mtime=13),
        F("setgid/f", b"f"),
        D("group", 0o775, mtime=14),  # a 022 umask would take g+w away
        D("owned", 0o755, uid=1000, gid=1001, mtime=15),
        F("implicit/then/file", b"x"),  # two implicit parents, then their own entries
        D("implicit", 0o750, mtime=16),
        D("implicit/then", 0o700, mtime=17),
        F("auto/x", b"x"),  # an implicit parent that never gets an entry
        D("twice", 0o755, mtime=18),
        D("twice", 0o711, mtime=19),
    ]
    env.unpack(build(members))
    expected = {
        "plain": (0o755, 11, 0),
        "sticky": (0o1777, 12, 0),
        "setgid": (0o2755, 13, 0),
        "group": (0o775, 14, 0),
        "owned": (0o755, 15, 1000),
        "implicit": (0o750, 16, 0),
        "implicit/then": (0o700, 17, 0),
        "twice": (0o711, 19, 0),
    }
    found = {}
    for name in expected:
        st = os.lstat(env.dest / name)
        found[name] = (stat.S_IMODE(st.st_mode), st.st_mtime_ns // 10**9, st.st_uid)
    if not ROOT:  # owners are not ours to set
        expected = {k: (m, t, os.geteuid()) for k, (m, t, _) in expected.items()}
    assert found == expected
    assert stat.S_IMODE(os.lstat(env.dest / "auto").st_mode) == 0o755
    if ROOT:
        assert os.lstat(env.dest / "owned").st_gid == 1001
    assert (env.dest / "setgid/f").read_bytes() == b"f"


def test_read_only_dirs_with_children(env: Env) -> None:
    env.unpack(
        build(
            [
                D("ro", 0o555),
                F("ro/child", b"c"),
                D("ro/sub", 0o500),
                F("ro/sub/x", b"x", mode=0o400),
                D("none", 0o000),
                F("none/y", b"y"),
            ]
        ),
        same_owner=False,
    )
    dirs = {"ro": 0o555, "ro/sub": 0o500, "none": 0o000}
    assert {d: stat.S_IMODE(os.lstat(env.dest / d).st_mode) for d in dirs} == dirs
    for d in dirs:  # so that a non-root test can look inside, and pytest can clean up
        os.chmod(env.dest / d, 0o755)
    assert env.tree() == {
        "ro": ("d", 0o755),
        "ro/child": ("f", 0o644, b"c"),
        "ro/sub": ("d", 0o755),
        "ro/sub/x": ("f", 0o400, b"x"),
        "none": ("d", 0o755),
        "none/y": ("f", 0o644, b"y"),
    }


def test_unknown_type_skipped_and_contiguous_is_regular(env: Env) -> None:
    result = env.unpack(
        build([F("v", b"x" * 700, kind=b"V"), F("c", b"contig", kind=tarfile.CONTTYPE), F("z")])
    )
    assert result.entries == 3
    assert result.warnings == ["skipped entry of unsupported tar type b'V': v"]
    assert env.tree() == {"c": ("f", 0o644, b"contig"), "z": ("f", 0o644, b"")}


def test_sparse_file(env: Env) -> None:
    pax = {"GNU.sparse.map": "0,5,4194304,5", "GNU.sparse.size": "4194309"}
    result = env.unpack(build([F("sp", b"helloworld", pax=pax), F("after", b"ok")]))
    assert result.size == 4194309 + 2
    with open(env.dest / "sp", "rb") as f:
        data = f.read()
    assert data == b"hello" + bytes(4194304 - 5) + b"world"
    assert os.stat(env.dest / "sp").st_blocks * 512 < 1 << 20  # the hole stayed a hole
    assert (env.dest / "after").read_bytes() == b"ok"


def test_trailing_data_after_end_is_left_alone(env: Env) -> None:
    data = build([F("a", b"a")]) + b"trailing garbage" * 1000
    assert env.unpack(data).entries == 1


def test_single_zero_block_ends_the_archive(env: Env) -> None:
    data = build([F("a", b"a")], fmt=tarfile.USTAR_FORMAT, end=False) + b"\0" * 512
    assert env.unpack(data).entries == 1


def test_one_byte_reads(env: Env) -> None:
    env.unpack(build([F("a", b"abc" * 1000), D("d"), F("d/b", b"b")]), step=1)
    assert env.tree() == {
        "a": ("f", 0o644, b"abc" * 1000),
        "d": ("d", 0o755),
        "d/b": ("f", 0o644, b"b"),
    }


def test_same_owner_false_keeps_our_ids(env: Env) -> None:
    env.unpack(build([F("f", uid=4321, gid=4321), D("d", uid=4321)]), same_owner=False)
    assert os.lstat(env.dest / "f").st_uid == os.geteuid()
    assert os.lstat(env.dest / "d").st_uid == os.geteuid()


def test_user_xattrs_kept_others_dropped(env: Env) -> None:
    pax = {
        "SCHILY.xattr.user.a": "1",
        "SCHILY.xattr.user.bin": b"\xff\x00\xfe".decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0",
        "SCHILY.xattr.system.posix_acl_access": "x",
        "LIBARCHIVE.xattr.user.c": "MQ==",
    }
    result = env.unpack(build([F("f", pax=pax), D("d", pax=pax), L("l", "f", pax=pax)]))
    kept = {"user.a": b"1", "user.bin": b"\xff\x00\xfe"}
    assert env.tree() == {"f": ("f", 0o644, b"", kept), "d": ("d", 0o755, kept), "l": ("l", "f")}
    assert result.warnings == [
        "dropped xattr 'security.selinux' (only user.* and security.capability): f and 2 more",
        "dropped xattr 'system.posix_acl_access' (only user.* and security.capability): f "
        "and 2 more",
        "dropped LIBARCHIVE.xattr header (unsupported encoding): f and 2 more",
        "dropped xattrs of a symlink or special file: l",
    ]


# --- things that need root ---------------------------------------------------------------


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root (chown)")
def test_setuid_survives_chown(env: Env) -> None:
    env.unpack(
        build(
            [
                F("su", b"#!", mode=0o4755, uid=1000, gid=1000),
                D("sg", 0o2775, uid=1000, gid=50),
                L("l", "su", uid=7, gid=8),
            ]
        ),
        same_owner=True,
    )
    st = os.lstat(env.dest / "su")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 1000, 1000)
    st = os.lstat(env.dest / "sg")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2775, 1000, 50)
    st = os.lstat(env.dest / "l")
    assert (st.st_uid, st.st_gid) == (7, 8)


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root (security.capability)")
def test_security_capability_survives_chown(env: Env) -> None:
    cap = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12)  # cap_net_raw+ep
    pax = {"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")}
    env.unpack(build([F("ping", b"elf", mode=0o755, uid=0, gid=0, pax=pax)]), same_owner=True)
    assert os.getxattr(env.dest / "ping", "security.capability") == cap


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root (mknod)")
def test_devices_and_fifos(env: Env) -> None:
    result = env.unpack(
        build([C("null", 1, 3), B("loop0", 7, 0, mode=0o600), P("fifo", 0o620)]), devices=True
    )
    assert result.warnings == []
    assert env.tree() == {
        "null": ("c", 1, 3, 0o666),
        "loop0": ("b", 7, 0, 0o600),
        "fifo": ("p", 0o620),
    }


def test_probe(tmp_path: Path) -> None:
    expected = OVERLAY if ROOT else OCI
    assert probe_whiteout_format(str(tmp_path)) is expected
    assert os.listdir(tmp_path) == []


def test_probe_without_mknod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_mknod(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "mknod", no_mknod)
    assert probe_whiteout_format(str(tmp_path)) is OCI
    assert os.listdir(tmp_path) == []


def test_probe_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        probe_whiteout_format(str(tmp_path / "nope"))


# --- errors from the stream itself -------------------------------------------------------


class Failing:
    def __init__(self, data: bytes, exc: BaseException) -> None:
        self._data = data
        self._exc = exc

    def read(self, n: int = -1, /) -> bytes:
        if not self._data:
            raise self._exc
        out, self._data = self._data[:4096], self._data[4096:]
        return out


@pytest.mark.parametrize(
    "exc", [OSError(5, "Input/output error"), NetworkError("connection reset")]
)
def test_stream_errors_propagate_unchanged(env: Env, exc: BaseException) -> None:
    data = build([F("a", b"x" * 20000)])[:8192]
    options = UnpackOptions(whiteouts=OCI, same_owner=False, devices=False)
    with pytest.raises(type(exc)) as info:
        unpack_layer(Failing(data, exc), str(env.dest), options)
    assert info.value is exc


def test_dest_missing_is_storage_error(tmp_path: Path) -> None:
    options = UnpackOptions(whiteouts=OCI, same_owner=False, devices=False)
    with pytest.raises(StorageError):
        unpack_layer(io.BytesIO(END), str(tmp_path / "nope"), options)


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root (mknod, trusted.* xattrs)")
@pytest.mark.parametrize("marker_first", [True, False], ids=["opaque-first", "whiteout-first"])
def test_whiteouts_beside_an_opaque_marker_are_dropped_in_overlay_form(
    env: Env, marker_first: bool
) -> None:
    members = [D("d"), F("d/.wh..wh..opq"), F("d/.wh.gone"), F("d/kept", b"k")]
    if not marker_first:
        members = [members[0], members[2], members[1], members[3]]
    env.unpack(build(members), OVERLAY)
    assert env.tree() == {"d": ("d", 0o755, OPAQUE), "d/kept": ("f", 0o644, b"k")}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o777, 0o000])
def test_file_modes_hold_whatever_the_umask(env: Env, umask: int) -> None:
    """Files whose mode the umask leaves alone are created with it (no fchmod); the others
    still get theirs exactly."""
    modes = {"rw": 0o644, "x": 0o755, "ro": 0o444, "group-w": 0o664, "none": 0o000}
    members = [F(name, name.encode(), mode=mode) for name, mode in modes.items()]
    old = os.umask(umask)
    try:
        env.unpack(build(members))
    finally:
        os.umask(old)
    got = {name: stat.S_IMODE(os.lstat(env.dest / name).st_mode) for name in modes}
    assert got == modes
    assert {name: (env.dest / name).read_bytes() for name in modes} == {
        name: name.encode() for name in modes
    }


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root (chown)")
def test_owners_hold_below_a_setgid_directory(env: Env) -> None:
    """A setgid destination would hand its group to every new file: the unpacker must not
    trust what a file is born with there."""
    os.chown(env.dest, 0, 4242)
    os.chmod(env.dest, 0o2755)
    env.unpack(
        build([F("mine", b"a", uid=0, gid=0), F("theirs", b"b", uid=1000, gid=1000)]),
        same_owner=True,
    )
    owners = {
        n: (os.lstat(env.dest / n).st_uid, os.lstat(env.dest / n).st_gid)
        for n in ("mine", "theirs")
    }
    assert owners == {"mine": (0, 0), "theirs": (1000, 1000)}
