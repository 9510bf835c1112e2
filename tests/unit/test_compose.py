"""Tests for ocistore.compose: stacking layer directories into the image's tree.

Layer directories are made the real way: small tar archives written with ``tarfile`` and
unpacked by ``unpack_layer``, in both whiteout forms (OVERLAY only as root). Every case of
``CASES`` is checked through all drivers (walk/open, materialize, export_tar + GNU tar);
``test_compose_overlay_oracle.py`` checks the same cases against the kernel's overlayfs.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import socket
import stat
import struct
import subprocess
import tarfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ocistore.compose import (
    ComposedTree,
    LayerView,
    Node,
    effective_layers,
    lowerdir_option,
    materialize,
)
from ocistore.errors import PathNotFoundError, StorageError
from ocistore.export import export_tar
from ocistore.unpack import UnpackOptions, WhiteoutFormat, unpack_layer

ROOT = os.geteuid() == 0
OCI = WhiteoutFormat.OCI
OVERLAY = WhiteoutFormat.OVERLAY
FORMATS = [
    pytest.param(OCI, id="oci"),
    pytest.param(
        OVERLAY,
        id="overlay",
        marks=[
            pytest.mark.root,
            pytest.mark.skipif(not ROOT, reason="OVERLAY whiteouts need root (mknod, trusted.*)"),
        ],
    ),
]
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")
MTIME = 1_600_000_000
GNU_TAR = shutil.which("tar")

# --- building layers ---------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def _ti(name: str, kind: bytes, mode: int, **kw: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid = kw.pop("uid", 0)
    info.gid = kw.pop("gid", 0)
    info.mtime = kw.pop("mtime", MTIME)
    info.linkname = kw.pop("linkname", "")
    info.devmajor = kw.pop("major", 0)
    info.devminor = kw.pop("minor", 0)
    xattrs: dict[str, str] = kw.pop("xattrs", {})
    pax = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    if "mtime_pax" in kw:
        pax["mtime"] = kw.pop("mtime_pax")
    if pax:
        info.pax_headers = pax
    assert not kw, kw
    return info


def F(name: str, data: bytes | str = b"", mode: int = 0o644, **kw: Any) -> Member:
    raw = data.encode() if isinstance(data, str) else data
    return _ti(name, tarfile.REGTYPE, mode, **kw), raw


def D(name: str, mode: int = 0o755, **kw: Any) -> Member:
    return _ti(name, tarfile.DIRTYPE, mode, **kw), None


def L(name: str, target: str, **kw: Any) -> Member:
    return _ti(name, tarfile.SYMTYPE, 0o777, linkname=target, **kw), None


def H(name: str, target: str, **kw: Any) -> Member:
    return _ti(name, tarfile.LNKTYPE, 0o644, linkname=target, **kw), None


def FIFO(name: str, mode: int = 0o644, **kw: Any) -> Member:
    return _ti(name, tarfile.FIFOTYPE, mode, **kw), None


def DEV(name: str, kind: bytes, major: int, minor: int, **kw: Any) -> Member:
    return _ti(name, kind, 0o600, major=major, minor=minor, **kw), None


def WH(path: str) -> Member:
    """An OCI whiteout for ``path``."""
    head, _, base = path.rpartition("/")
    return F(f"{head}/.wh.{base}" if head else f".wh.{base}")


def OPQ(directory: str) -> Member:
    """An opaque marker in ``directory`` ("" is the layer's root)."""
    return F(f"{directory}/.wh..wh..opq" if directory else ".wh..wh..opq")


def layer_tar(members: Sequence[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def build_layers(
    where: Path, fmt: WhiteoutFormat, layers: Sequence[Sequence[Member]]
) -> list[LayerView]:
    """Unpack each layer (base first) into ``where/<index>``."""
    where.mkdir(parents=True, exist_ok=True)
    views = []
    for index, members in enumerate(layers):
        dest = where / str(index)
        dest.mkdir()
        result = unpack_layer(
            io.BytesIO(layer_tar(members)),
            str(dest),
            UnpackOptions(whiteouts=fmt, same_owner=ROOT, devices=ROOT),
        )
        views.append(LayerView(str(dest), fmt, result.opaque_root))
    return views


# --- looking at trees --------------------------------------------------------------------


def _describe(path: bytes, st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISREG(mode):
        with open(path, "rb") as f:
            return "f:" + f.read().decode("utf-8", "backslashreplace")
    if stat.S_ISLNK(mode):
        return "l:" + os.fsdecode(os.readlink(path))
    if stat.S_ISFIFO(mode):
        return "p"
    kind = "c" if stat.S_ISCHR(mode) else "b"
    return f"{kind}:{os.major(st.st_rdev)},{os.minor(st.st_rdev)}"


def shape(root: str | Path) -> dict[str, str]:
    """path -> "d" | "f:CONTENT" | "l:TARGET" | "p" | "c:MAJ,MIN" below ``root`` (not itself)."""
    out: dict[str, str] = {}
    stack = [(os.fsencode(root), b"")]
    while stack:
        path, rel = stack.pop()
        for name in os.listdir(path):
            child = path + b"/" + name
            crel = rel + b"/" + name if rel else name
            st = os.lstat(child)
            out[os.fsdecode(crel)] = _describe(child, st)
            if stat.S_ISDIR(st.st_mode):
                stack.append((child, crel))
    return out


def tree_shape(tree: ComposedTree) -> dict[str, str]:
    """The same, from the composer alone."""
    return {
        node.path: _describe(os.fsencode(node.source), node.stat)
        for node in tree.walk()
        if node.path
    }


_KEPT_XATTR = ("user.", "security.capability")


@dataclass
class Snapshot:
    #: path -> (kind, mode, uid, gid, size, sha256, symlink target, rdev, xattrs, mtime_ns)
    entries: dict[str, tuple[Any, ...]]
    #: hardlink groups: paths sharing one inode
    links: set[frozenset[str]]
    #: names a directory listing shows but lstat does not find (overlayfs quirk)
    phantoms: set[str] = field(default_factory=set)


def snapshot(root: str | Path) -> Snapshot:
    """Everything the drivers must agree on, for ``root`` and all below it."""
    entries: dict[str, tuple[Any, ...]] = {}
    inodes: dict[tuple[int, int], set[str]] = defaultdict(set)
    phantoms: set[str] = set()
    stack = [(os.fsencode(root), b"")]
    while stack:
        path, rel = stack.pop()
        key = os.fsdecode(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            phantoms.add(key)
            continue
        mode = st.st_mode
        size = digest = target = rdev = None
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if stat.S_ISREG(mode):
            size = st.st_size
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(mode):
            target = os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = st.st_rdev
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            xattrs = tuple(
                sorted(
                    (name, os.getxattr(path, name, follow_symlinks=False))
                    for name in os.listxattr(path, follow_symlinks=False)
                    if name.startswith(_KEPT_XATTR)
                )
            )
        entries[key] = (
            stat.S_IFMT(mode),
            None if stat.S_ISLNK(mode) else stat.S_IMODE(mode),
            st.st_uid,
            st.st_gid,
            size,
            digest,
            target,
            rdev,
            xattrs,
            st.st_mtime_ns,
        )
        if stat.S_ISDIR(mode):
            for name in os.listdir(path):
                stack.append((path + b"/" + name, rel + b"/" + name if rel else name))
        elif st.st_nlink > 1:
            inodes[(st.st_dev, st.st_ino)].add(key)
    links = {frozenset(group) for group in inodes.values() if len(group) > 1}
    return Snapshot(entries, links, phantoms)


def assert_same(got: Snapshot, want: Snapshot, what: str) -> None:
    only_got = sorted(set(got.entries) - set(want.entries))
    only_want = sorted(set(want.entries) - set(got.entries))
    differ = {
        k: (got.entries[k], want.entries[k])
        for k in sorted(set(got.entries) & set(want.entries))
        if got.entries[k] != want.entries[k]
    }
    assert not (only_got or only_want or differ), (
        f"{what}: only in first {only_got}, only in second {only_want}, differ {differ}"
    )
    assert got.links == want.links, f"{what}: hardlink groups differ"


def extract_with_gnu_tar(data: bytes, dest: Path) -> None:
    assert GNU_TAR is not None
    dest.mkdir()
    subprocess.run(
        [
            GNU_TAR,
            "--xattrs",
            "--xattrs-include=user.*",
            "--xattrs-include=security.capability",
            "--numeric-owner",
            "-xpf",
            "-",
            "-C",
            str(dest),
        ],
        input=data,
        check=True,
        capture_output=True,
    )


def export_bytes(tree: ComposedTree) -> bytes:
    out = io.BytesIO()
    export_tar(tree, out)
    return out.getvalue()


def sort_key(path: str) -> list[bytes]:
    return [os.fsencode(part) for part in path.split("/")] if path else []


# --- the cases ---------------------------------------------------------------------------

# security.capability v2: cap_net_raw (13) permitted and effective.
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
NON_UTF8 = os.fsdecode(b"caf\xe9")
LONG_COMPONENT = "n" * 255
LONG_DIR = "/".join(["d" * 100] * 12)


@dataclass(frozen=True)
class Case:
    #: the layers, base first; the argument is a host directory the layers may point at
    layers: Callable[[str], list[list[Member]]]
    #: the composed tree's shape (see :func:`shape`); None: compare drivers only
    expected: dict[str, str] | None


def _many_layers(count: int = 128) -> tuple[list[list[Member]], dict[str, str]]:
    """``count`` layers each adding and removing files, and the tree applying them in turn
    gives (lower content first removed by this layer's markers, then its own entries)."""
    layers: list[list[Member]] = []
    model: dict[str, str] = {}

    def drop(path: str, below_only: bool = False) -> None:
        for key in [k for k in model if k.startswith(path + "/") or (k == path and not below_only)]:
            del model[key]

    for i in range(count):
        members: list[Member] = []
        removals: list[tuple[str, bool]] = []
        if i >= 3 and i % 3 == 0:
            removals.append((f"files/n{i - 3}", False))
        if i % 16 == 9:
            removals.append((f"d{i % 8}", True))  # opaque: lower children go
        if i % 20 == 19:
            removals.append((f"d{(i + 1) % 8}", False))  # whole directory goes
        for path, below in removals:
            members.append(OPQ(path) if below else WH(path))
            drop(path, below)
        members.append(F(f"files/n{i}", str(i)))
        members.append(F(f"d{i % 8}/m{i}", f"m{i}"))
        if i % 7 == 0:
            members.append(F(f"files/n{i // 2}", f"again{i}"))  # a lower file replaced
        layers.append(members)
        for info, data in members:
            if info.name.rpartition("/")[2].startswith(".wh."):
                continue
            model[info.name] = "f:" + (data or b"").decode()
            head = info.name.rpartition("/")[0]
            model.setdefault(head, "d")
            model[head] = "d"
    return layers, model


MANY_LAYERS, MANY_EXPECTED = _many_layers()

CASES: dict[str, Case] = {
    "whiteouts": Case(
        lambda _: [
            [D("a"), F("a/x", "x"), F("a/y", "y"), F("f", "f"), D("g"), F("g/z", "z"), F("k", "k")],
            [WH("a/x"), WH("f"), WH("g"), WH("never-existed")],
        ],
        {"a": "d", "a/y": "f:y", "k": "f:k"},
    ),
    "opaque_middle": Case(
        lambda _: [
            [D("d"), F("d/old", "o"), D("d/sub"), F("d/sub/deep", "s"), F("other", "1")],
            [D("d", mode=0o750), OPQ("d"), F("d/new", "n"), F("d/new2", "n2"), D("e"), OPQ("e")],
            [D("d"), F("d/top", "t"), WH("d/new2"), F("e/only", "e")],
        ],
        {"d": "d", "d/new": "f:n", "d/top": "f:t", "e": "d", "e/only": "f:e", "other": "f:1"},
    ),
    "opaque_root": Case(
        lambda _: [
            [F("a", "a"), D("b"), F("b/c", "c"), F("c", "old")],
            [F("c", "c1"), OPQ(""), D("b2"), F("b2/x", "x")],
            [F("d", "d"), WH("b2/x")],
        ],
        {"b2": "d", "c": "f:c1", "d": "f:d"},
    ),
    "dir_replaces_whiteout": Case(
        lambda _: [
            [D("x"), F("x/old", "o"), D("y"), F("y/old", "o"), D("z"), F("z/old", "o")],
            [WH("x"), D("x"), F("x/new", "n"), D("y"), F("y/new", "n"), WH("y")],
            [WH("z"), F("z/new", "n")],
        ],
        {"x": "d", "x/new": "f:n", "y": "d", "y/new": "f:n", "z": "d", "z/new": "f:n"},
    ),
    "replacements": Case(
        lambda _: [
            [F("p", "p"), D("q"), F("q/c", "c"), D("r"), F("r/a", "a"), F("s", "s"), D("t")],
            [D("p"), F("p/c", "pc"), F("q", "q"), F("r", "r"), L("s", "p"), L("t", "p")],
            [D("r"), F("r/b", "b"), D("t"), F("t/u", "u")],
        ],
        {
            "p": "d",
            "p/c": "f:pc",
            "q": "f:q",
            "r": "d",
            "r/b": "f:b",
            "s": "l:p",
            "t": "d",
            "t/u": "f:u",
        },
    ),
    "symlink_to_dir": Case(
        lambda _: [
            [D("usr"), D("usr/lib"), F("usr/lib/libc", "c"), L("lib", "usr/lib")],
            [F("lib/x", "x")],
        ],
        {"lib": "d", "lib/x": "f:x", "usr": "d", "usr/lib": "d", "usr/lib/libc": "f:c"},
    ),
    "hardlinks": Case(
        lambda _: [
            [F("h1", "same"), H("h2", "h1"), H("h3", "h1"), F("k1", "k"), H("k2", "k1")],
            [WH("h3"), F("k1", "k-new"), D("dd"), F("dd/m1", "m"), H("dd/m2", "dd/m1")],
            [F("same", "same"), F("h4", "same"), L("sym", "h1"), H("sym2", "sym")],
        ],
        {
            "dd": "d",
            "dd/m1": "f:m",
            "dd/m2": "f:m",
            "h1": "f:same",
            "h2": "f:same",
            "h4": "f:same",
            "k1": "f:k-new",
            "k2": "f:k",
            "same": "f:same",
            "sym": "l:h1",
            "sym2": "l:h1",
        },
    ),
    "modes": Case(
        lambda _: [
            [
                F("su", "x", mode=0o4755, uid=1000, gid=1000),
                F("sg", "y", mode=0o2755, gid=50),
                D("sticky", mode=0o1777),
                F("big", "b", mode=0o600, uid=12_345_678, gid=3_000_000_000),
                F("nsec", "n", mtime_pax="1600000000.123456789"),
                F("old", "o", mtime=0),
                D("ro", mode=0o555),
                F("ro/f", "f", mode=0o444),
                D("ro/sub", mode=0o500, mtime=MTIME - 99),
                F("ro/sub/g", "g", mode=0o400),
                D("low", mode=0o700, uid=5, mtime=MTIME - 5),
                F("low/a", "a"),
            ],
            [F("low/b", "b"), FIFO("pipe", mode=0o640, uid=7)]
            + ([D("none", mode=0), F("none/h", "h")] if ROOT else []),
        ],
        {
            "su": "f:x",
            "sg": "f:y",
            "sticky": "d",
            "big": "f:b",
            "nsec": "f:n",
            "old": "f:o",
            "ro": "d",
            "ro/f": "f:f",
            "ro/sub": "d",
            "ro/sub/g": "f:g",
            "low": "d",
            "low/a": "f:a",
            "low/b": "f:b",
            "pipe": "p",
        }
        | ({"none": "d", "none/h": "f:h"} if ROOT else {}),
    ),
    "xattrs": Case(
        lambda _: [
            [
                F("x", "x", xattrs={"user.a": "1", "user.bin": os.fsdecode(b"\xff\x00\x01")}),
                D("xd", xattrs={"user.dir": "d"}),
                D("merged", xattrs={"user.low": "1"}),
                F("merged/a", "a"),
            ]
            + (
                [
                    F(
                        "cap",
                        "c",
                        mode=0o755,
                        xattrs={"security.capability": os.fsdecode(CAP_NET_RAW)},
                    )
                ]
                if ROOT
                else []
            ),
            [D("merged"), F("merged/b", "b", xattrs={"user.b": "2"})],
        ],
        {"x": "f:x", "xd": "d", "merged": "d", "merged/a": "f:a", "merged/b": "f:b"}
        | ({"cap": "f:c"} if ROOT else {}),
    ),
    "names": Case(
        lambda _: [
            [
                F(NON_UTF8, "e"),
                F(os.fsdecode(b"gon\xff"), "g"),
                D(os.fsdecode(b"dir\xfe")),
                F(os.fsdecode(b"dir\xfe/in\xfd"), "i"),
                F(LONG_COMPONENT, "long"),
                F(f"{LONG_DIR}/file", "deep"),
                L("longlink", "t" * 1000),
                F("sp ace:colon,comma\nnewline", "odd"),
                F("ünïcødé", "u"),
            ],
            [WH(os.fsdecode(b"gon\xff")), F(os.fsdecode(b"dir\xfe/in2\xfd"), "i2")],
        ],
        {
            NON_UTF8: "f:e",
            os.fsdecode(b"dir\xfe"): "d",
            os.fsdecode(b"dir\xfe/in\xfd"): "f:i",
            os.fsdecode(b"dir\xfe/in2\xfd"): "f:i2",
            LONG_COMPONENT: "f:long",
            **{"/".join(["d" * 100] * n): "d" for n in range(1, 13)},
            f"{LONG_DIR}/file": "f:deep",
            "longlink": "l:" + "t" * 1000,
            "sp ace:colon,comma\nnewline": "f:odd",
            "ünïcødé": "f:u",
        },
    ),
    "specials": Case(
        lambda _: [
            [FIFO("fifo"), DEV("null", tarfile.CHRTYPE, 1, 3), DEV("loop", tarfile.BLKTYPE, 7, 0)],
            [DEV("zero", tarfile.CHRTYPE, 1, 5, uid=3, gid=4), WH("loop")],
        ],
        {"fifo": "p"} | ({"null": "c:1,3", "zero": "c:1,5"} if ROOT else {}),
    ),
    "canary": Case(
        lambda canary: [
            [
                L("evil", canary),
                L("evil2", canary + "/sub"),
                L("rel", "../" * 30 + canary.lstrip("/")),
                L("keep", canary),
            ],
            [F("evil/pwn", "p"), D("evil2"), F("evil2/x", "x"), F("rel/y", "y")],
            [L("evil/pwn2", canary + "/victim"), H("evil/pwn3", "evil/pwn2")],
        ],
        None,
    ),
    "whiteout_in_new_dir": Case(
        lambda _: [
            [F("base", "b"), D("o"), F("o/a", "a"), F("o/b", "b")],
            [D("fresh"), WH("fresh/ghost"), F("fresh/real", "r"), OPQ("o"), WH("o/a")],
        ],
        {"base": "f:b", "fresh": "d", "fresh/real": "f:r", "o": "d"},
    ),
    "single_layer": Case(
        lambda _: [[D("etc"), F("etc/passwd", "root:x:0:0"), L("bin", "usr/bin"), D("usr/bin")]],
        {"etc": "d", "etc/passwd": "f:root:x:0:0", "bin": "l:usr/bin", "usr": "d", "usr/bin": "d"},
    ),
    "many_layers": Case(lambda _: MANY_LAYERS, MANY_EXPECTED),
}


def canary_expected(canary: str) -> dict[str, str]:
    return {
        "evil": "d",
        "evil/pwn": "f:p",
        "evil/pwn2": f"l:{canary}/victim",
        "evil/pwn3": f"l:{canary}/victim",
        "evil2": "d",
        "evil2/x": "f:x",
        "keep": f"l:{canary}",
        "rel": "d",
        "rel/y": "f:y",
    }


def make_canary(where: Path) -> Path:
    canary = where / "canary"
    canary.mkdir()
    (canary / "victim").write_text("untouched")
    (canary / "sub").mkdir()
    return canary


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> WhiteoutFormat:
    value: WhiteoutFormat = request.param
    return value


@dataclass
class Built:
    tree: ComposedTree
    views: list[LayerView]
    expected: dict[str, str]
    canary: Path
    tmp: Path


def build_case(tmp_path: Path, fmt: WhiteoutFormat, name: str) -> Built:
    case = CASES[name]
    tmp_path.mkdir(parents=True, exist_ok=True)
    canary = make_canary(tmp_path)
    views = build_layers(tmp_path / "layers", fmt, case.layers(str(canary)))
    expected = case.expected if case.expected is not None else canary_expected(str(canary))
    return Built(ComposedTree(views), views, expected, canary, tmp_path)


CASE_NAMES = list(CASES)


# --- every case, every driver ------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_walk(tmp_path: Path, fmt: WhiteoutFormat, name: str) -> None:
    built = build_case(tmp_path, fmt, name)
    tree = built.tree
    assert tree_shape(tree) == built.expected
    nodes = list(tree.walk())
    paths = [n.path for n in nodes]
    assert paths[0] == ""
    assert paths == sorted(paths, key=sort_key), "walk must be pre-order, names sorted bytewise"
    assert len(set(paths)) == len(paths)
    for node in nodes:
        # lookup and listdir agree with walk
        again = tree.lookup(node.path, follow_symlinks=False)
        assert (again.path, again.layer, again.source) == (node.path, node.layer, node.source)
        assert os.path.samestat(again.stat, node.stat)
        assert node.source.startswith(tree.layers[node.layer].path)
        assert os.path.samestat(os.lstat(node.source), node.stat)
        if stat.S_ISDIR(node.stat.st_mode):
            listed = [c.path for c in tree.listdir(node.path)]
            prefix = node.path + "/" if node.path else ""
            assert listed == [
                p for p in paths if p.startswith(prefix) and p and "/" not in p[len(prefix) :]
            ]
    assert not any(os.path.basename(p).startswith(".wh.") for p in paths)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_materialize(tmp_path: Path, fmt: WhiteoutFormat, name: str) -> None:
    built = build_case(tmp_path, fmt, name)
    before = snapshot(built.canary)
    dest = tmp_path / "rootfs"
    materialize(built.tree, str(dest))
    assert shape(dest) == built.expected
    assert_same(snapshot(built.canary), before, "canary")
    assert sorted(os.listdir(tmp_path)) == ["canary", "layers", "rootfs"]
    # No overlay xattr or whiteout survives.
    for dirpath, dirnames, filenames in os.walk(dest):
        for entry in dirnames + filenames:
            full = os.path.join(dirpath, entry)
            assert not entry.startswith(".wh.")
            st = os.lstat(full)
            assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0)
            if not os.path.islink(full):
                assert not [x for x in os.listxattr(full) if "overlay" in x]
    # Metadata equals the composer's nodes.
    for node in built.tree.walk():
        st = os.lstat(os.path.join(os.fsencode(dest), os.fsencode(node.path)))
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(node.stat.st_mode), node.path
        assert st.st_mtime_ns == node.stat.st_mtime_ns, node.path
        if not stat.S_ISLNK(st.st_mode):
            assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(node.stat.st_mode), node.path
        if ROOT:
            assert (st.st_uid, st.st_gid) == (node.stat.st_uid, node.stat.st_gid), node.path


@pytest.mark.skipif(GNU_TAR is None, reason="GNU tar not installed")
@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_export_tar(tmp_path: Path, fmt: WhiteoutFormat, name: str) -> None:
    built = build_case(tmp_path, fmt, name)
    data = export_bytes(built.tree)
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as t:
        members = t.getmembers()
    names = [m.name for m in members]
    assert names[0] == "."
    assert [n.rstrip("/") for n in names[1:]] == [n.path for n in built.tree.walk()][1:]
    assert not any(os.path.basename(n).startswith(".wh.") for n in names)
    assert not any(m.ischr() and m.devmajor == 0 and m.devminor == 0 for m in members)
    materialize(built.tree, str(tmp_path / "rootfs"))
    extract_with_gnu_tar(data, tmp_path / "untar")
    assert shape(tmp_path / "untar") == built.expected
    assert_same(
        snapshot(tmp_path / "untar"), snapshot(tmp_path / "rootfs"), "tar -x vs materialize"
    )


# --- layer stack -------------------------------------------------------------------------


def test_effective_layers_and_lowerdir_option() -> None:
    a, b, c, d = (LayerView(f"/l/{x}", OCI) for x in "abcd")
    cut = LayerView("/l/cut", OCI, opaque_root=True)
    assert effective_layers([a, b, c]) == [a, b, c]
    assert lowerdir_option([a, b, c]) == ["/l/c", "/l/b", "/l/a"]
    assert effective_layers([a, cut, b, c]) == [cut, b, c]
    assert lowerdir_option([a, cut, b, c]) == ["/l/c", "/l/b", "/l/cut"]
    top_cut = LayerView("/l/top", OCI, opaque_root=True)
    assert effective_layers([a, cut, b, top_cut]) == [top_cut]
    assert lowerdir_option([a, cut, b, top_cut]) == ["/l/top"]
    assert effective_layers([cut, d]) == [cut, d]
    assert effective_layers([]) == []


def test_no_layers_is_an_error() -> None:
    with pytest.raises(ValueError):
        ComposedTree([])


def test_opaque_root_cuts_the_stack(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    built = build_case(tmp_path, fmt, "opaque_root")
    assert [v.opaque_root for v in built.views] == [False, True, False]
    assert built.tree.layers == built.views[1:]
    assert lowerdir_option(built.views) == [built.views[2].path, built.views[1].path]
    assert built.tree.lookup("d").layer == 1  # index into the effective layers
    with pytest.raises(PathNotFoundError):
        built.tree.lookup("a")


def test_nodes_name_their_layer(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    built = build_case(tmp_path, fmt, "opaque_middle")
    tree = built.tree
    root = tree.lookup("")
    assert (root.path, root.layer, root.source) == ("", 2, built.views[2].path)
    d = tree.lookup("d")
    assert (d.layer, d.source) == (2, os.path.join(built.views[2].path, "d"))
    assert tree.lookup("d/new").layer == 1
    assert tree.lookup("other").layer == 0
    assert tree.lookup("/d/./new/").path == "d/new"
    assert isinstance(d, Node)


# --- lookup ------------------------------------------------------------------------------


LOOKUP_LAYERS: list[list[Member]] = [
    [
        D("usr"),
        D("usr/lib"),
        F("usr/lib/libc.so", "libc"),
        L("lib", "usr/lib"),
        L("abs", "/usr/lib"),
        L("up", "../../../../usr"),
        L("loop1", "loop2"),
        L("loop2", "loop1"),
        L("self", "self"),
        L("host", "/etc/hostname-not-in-image"),
        L("hostdir", "/tmp"),
        D("etc"),
        L("etc/alt", "../lib"),
        L("etc/dot", "."),
        L("etc/root", "/"),
        L("etc/parent", ".."),
        L("dangling", "nowhere"),
        F("file", "data"),
        L("tofile", "/usr/../file"),
    ],
    [
        L("usr/lib64", "lib"),
        F("usr/lib/libm.so", "libm"),
        WH("usr/lib/libc.so"),
        L("libc", "lib/libc.so"),
    ],
]


@pytest.fixture
def lookup_tree(tmp_path: Path, fmt: WhiteoutFormat) -> ComposedTree:
    return ComposedTree(build_layers(tmp_path / "layers", fmt, LOOKUP_LAYERS))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("lib/libm.so", "usr/lib/libm.so"),
        ("/lib/libm.so", "usr/lib/libm.so"),
        ("abs/libm.so", "usr/lib/libm.so"),
        ("up/lib/libm.so", "usr/lib/libm.so"),
        ("/../../../usr/lib/libm.so", "usr/lib/libm.so"),
        ("usr/../../usr/lib/../lib/libm.so", "usr/lib/libm.so"),
        ("etc/alt/libm.so", "usr/lib/libm.so"),
        ("etc/dot/alt/libm.so", "usr/lib/libm.so"),
        ("etc/root/etc/root/usr/lib64/libm.so", "usr/lib/libm.so"),
        ("etc/parent/etc/parent/etc/parent/file", "file"),
        ("tofile", "file"),
        ("lib", "usr/lib"),
        ("etc/root", ""),
        ("etc/parent", ""),
        ("/", ""),
        ("", ""),
        (".", ""),
        ("..", ""),
    ],
)
def test_lookup_follows_symlinks_inside_the_image(
    lookup_tree: ComposedTree, path: str, expected: str
) -> None:
    node = lookup_tree.lookup(path)
    assert node.path == expected


def test_lookup_without_following(lookup_tree: ComposedTree) -> None:
    node = lookup_tree.lookup("lib", follow_symlinks=False)
    assert node.path == "lib"
    assert stat.S_ISLNK(node.stat.st_mode)
    # Intermediate symlinks are always followed.
    assert lookup_tree.lookup("lib/libm.so", follow_symlinks=False).path == "usr/lib/libm.so"
    assert lookup_tree.lookup("usr/lib64", follow_symlinks=False).path == "usr/lib64"
    assert lookup_tree.lookup("loop1", follow_symlinks=False).path == "loop1"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("loop1", "too many levels of symbolic links"),
        ("self/x", "too many levels of symbolic links"),
        ("usr/lib/libc.so", "no such file"),  # whited out above
        ("libc", "no such file"),  # a symlink to the whited-out file
        ("host", "no such file"),  # exists on the host, not in the image
        ("hostdir", "no such file"),
        ("dangling", "no such file"),
        ("missing/x", "no such file"),
        ("file/x", "not a directory"),
        ("file/..", "not a directory"),
    ],
)
def test_lookup_errors(lookup_tree: ComposedTree, path: str, message: str) -> None:
    with pytest.raises(PathNotFoundError, match=message):
        lookup_tree.lookup(path)


def test_lookup_hop_limit(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    chain = [L(f"s{i}", f"s{i + 1}") for i in range(41)] + [F("s41", "end")]
    tree = ComposedTree(build_layers(tmp_path / "layers", fmt, [chain]))
    assert tree.lookup("s1").path == "s41"  # 40 hops
    with pytest.raises(PathNotFoundError, match="too many levels"):
        tree.lookup("s0")  # 41 hops


def test_lookup_non_utf8(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    built = build_case(tmp_path, fmt, "names")
    node = built.tree.lookup(os.fsdecode(b"dir\xfe/in\xfd"))
    assert node.path == os.fsdecode(b"dir\xfe/in\xfd")
    with built.tree.open(node.path) as f:
        assert f.read() == b"i"
    with pytest.raises(PathNotFoundError):
        built.tree.lookup(os.fsdecode(b"gon\xff"))


def test_listdir(lookup_tree: ComposedTree) -> None:
    names = [n.path for n in lookup_tree.listdir("usr/lib")]
    assert names == ["usr/lib/libm.so"]
    assert [n.path for n in lookup_tree.listdir("lib")] == ["usr/lib/libm.so"]
    assert [n.path for n in lookup_tree.listdir("")][:3] == ["abs", "dangling", "etc"]
    assert [n.path for n in lookup_tree.listdir("/")] == [n.path for n in lookup_tree.listdir("")]
    with pytest.raises(PathNotFoundError, match="not a directory"):
        lookup_tree.listdir("file")
    with pytest.raises(PathNotFoundError, match="no such file"):
        lookup_tree.listdir("nope")


def test_open(lookup_tree: ComposedTree) -> None:
    with lookup_tree.open("lib/libm.so") as f:
        assert f.read() == b"libm"
    with lookup_tree.open("/etc/alt/../../file") as f:
        assert f.read() == b"data"
    with pytest.raises(PathNotFoundError, match="directory"):
        lookup_tree.open("usr")
    with pytest.raises(PathNotFoundError):
        lookup_tree.open("usr/lib/libc.so")


def test_canary_lookups_stay_inside(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    built = build_case(tmp_path, fmt, "canary")
    tree = built.tree
    assert tree.lookup("evil/pwn").path == "evil/pwn"
    with pytest.raises(PathNotFoundError):
        tree.lookup("keep/victim")  # the host's canary is not in the image
    with pytest.raises(PathNotFoundError):
        tree.open("evil/pwn2")


# --- materialize details -----------------------------------------------------------------


def test_materialize_dest_rules(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    built = build_case(tmp_path, fmt, "single_layer")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(StorageError, match="not empty"):
        materialize(built.tree, str(full))
    assert os.listdir(full) == ["x"]
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "empty-target")
    (tmp_path / "empty-target").mkdir()
    with pytest.raises(StorageError):
        materialize(built.tree, str(link))
    assert os.listdir(tmp_path / "empty-target") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    materialize(built.tree, str(empty), reflink=False)
    assert shape(empty) == built.expected
    with pytest.raises(StorageError):
        materialize(built.tree, str(tmp_path / "no" / "parent"))


@pytest.mark.parametrize("reflink", [True, False])
def test_materialize_modes_and_owners(tmp_path: Path, fmt: WhiteoutFormat, reflink: bool) -> None:
    built = build_case(tmp_path, fmt, "modes")
    dest = tmp_path / "rootfs"
    materialize(built.tree, str(dest), reflink=reflink)

    def st(p: str) -> os.stat_result:
        return os.lstat(dest / p)

    assert stat.S_IMODE(st("su").st_mode) == 0o4755
    assert stat.S_IMODE(st("sg").st_mode) == 0o2755
    assert stat.S_IMODE(st("sticky").st_mode) == 0o1777
    assert stat.S_IMODE(st("ro").st_mode) == 0o555
    assert stat.S_IMODE(st("ro/sub").st_mode) == 0o500
    assert st("ro/sub").st_mtime_ns == (MTIME - 99) * 10**9
    assert st("nsec").st_mtime_ns == 1_600_000_000_123_456_789
    assert st("old").st_mtime_ns == 0
    assert stat.S_ISFIFO(st("pipe").st_mode) and stat.S_IMODE(st("pipe").st_mode) == 0o640
    # The upper layer only implied "low" (a parent nobody listed): its metadata wins.
    assert stat.S_IMODE(st("low").st_mode) == 0o755
    if ROOT:
        assert (st("su").st_uid, st("su").st_gid) == (1000, 1000)
        assert (st("big").st_uid, st("big").st_gid) == (12_345_678, 3_000_000_000)
        assert st("low").st_uid == 0
        assert stat.S_IMODE(st("none").st_mode) == 0


@needs_root
def test_materialize_without_same_owner(tmp_path: Path) -> None:
    built = build_case(tmp_path, OCI, "modes")
    dest = tmp_path / "rootfs"
    materialize(built.tree, str(dest), same_owner=False)
    assert os.lstat(dest / "su").st_uid == 0
    assert stat.S_IMODE(os.lstat(dest / "su").st_mode) == 0o4755


@needs_root
def test_materialize_not_root_skips_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = build_case(tmp_path, OCI, "specials")
    assert built.expected == {"fifo": "p", "null": "c:1,3", "zero": "c:1,5"}
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    dest = tmp_path / "rootfs"
    materialize(built.tree, str(dest))  # same_owner defaults to False as well
    monkeypatch.undo()
    assert shape(dest) == {"fifo": "p"}


def test_materialize_hardlinks(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    built = build_case(tmp_path, fmt, "hardlinks")
    dest = tmp_path / "rootfs"
    materialize(built.tree, str(dest))
    snap = snapshot(dest)
    assert snap.links == {
        frozenset({"h1", "h2"}),
        frozenset({"dd/m1", "dd/m2"}),
        frozenset({"sym", "sym2"}),
    }
    assert os.lstat(dest / "k2").st_nlink == 1  # its partner was replaced above
    assert os.lstat(dest / "same").st_ino != os.lstat(dest / "h1").st_ino  # other layer


def test_materialize_xattrs(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    built = build_case(tmp_path, fmt, "xattrs")
    dest = tmp_path / "rootfs"
    materialize(built.tree, str(dest))
    assert os.getxattr(dest / "x", "user.a") == b"1"
    assert os.getxattr(dest / "x", "user.bin") == b"\xff\x00\x01"
    assert os.getxattr(dest / "xd", "user.dir") == b"d"
    assert os.getxattr(dest / "merged/b", "user.b") == b"2"
    # A merged directory's xattrs come from its topmost layer (which had none).
    assert [x for x in os.listxattr(dest / "merged") if x.startswith("user.")] == []
    if ROOT:
        assert os.getxattr(dest / "cap", "security.capability") == CAP_NET_RAW


def test_materialize_keeps_holes(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    with open(layer / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(64 << 20)
        f.write(b"tail")
    if os.lstat(layer / "sparse").st_blocks * 512 >= 64 << 20:
        pytest.skip("this filesystem does not make sparse files")
    dest = tmp_path / "rootfs"
    materialize(ComposedTree([LayerView(str(layer), OCI)]), str(dest), reflink=False)
    st = os.lstat(dest / "sparse")
    assert st.st_size == (64 << 20) + 4
    assert st.st_blocks * 512 < 1 << 20
    with open(dest / "sparse", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(64 << 20)
        assert f.read() == b"tail"


def test_oci_markers_only_hide_lower_layers(tmp_path: Path) -> None:
    """Hand-made OCI layer directories: a marker beside a real entry of the same layer."""
    low, up = tmp_path / "low", tmp_path / "up"
    for d in (low / "x", up / "x", low / "y"):
        d.mkdir(parents=True)
    (low / "x" / "old").write_text("o")
    (low / "y" / "old").write_text("o")
    (up / "x" / "new").write_text("n")
    (up / ".wh.x").write_text("")
    (up / ".wh.y").write_text("")
    (up / ".wh..wh..opq").write_text("")  # ignored: only LayerView.opaque_root cuts
    tree = ComposedTree([LayerView(str(low), OCI), LayerView(str(up), OCI)])
    assert tree_shape(tree) == {"x": "d", "x/new": "f:n"}
    assert tree.lookup("x/new").layer == 1
    with pytest.raises(PathNotFoundError):
        tree.lookup("x/old")
    with pytest.raises(PathNotFoundError):
        tree.lookup("y")


# --- export_tar details ------------------------------------------------------------------


def test_export_tar_members(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    built = build_case(tmp_path, fmt, "hardlinks")
    with tarfile.open(fileobj=io.BytesIO(export_bytes(built.tree))) as t:
        members = {m.name: m for m in t.getmembers()}
    assert members["h1"].isreg() and members["h1"].size == 4
    assert members["h2"].islnk() and members["h2"].linkname == "h1"
    assert members["dd/m2"].islnk() and members["dd/m2"].linkname == "dd/m1"
    assert members["sym"].issym() and members["sym2"].islnk() and members["sym2"].linkname == "sym"
    assert members["k2"].isreg() and members["same"].isreg() and members["h4"].isreg()
    assert members["dd"].isdir()


def test_export_tar_pax(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    built = build_case(tmp_path, fmt, "names")
    with tarfile.open(
        fileobj=io.BytesIO(export_bytes(built.tree)), encoding="utf-8", errors="surrogateescape"
    ) as t:
        members = {m.name.rstrip("/"): m for m in t.getmembers()}
    assert NON_UTF8 in members
    assert f"{LONG_DIR}/file" in members
    assert members["longlink"].linkname == "t" * 1000
    built = build_case(tmp_path / "2", fmt, "modes")
    with tarfile.open(fileobj=io.BytesIO(export_bytes(built.tree))) as t:
        members = {m.name: m for m in t.getmembers()}
    assert members["nsec"].pax_headers["mtime"] == "1600000000.123456789"
    assert members["su"].mode == 0o4755
    if ROOT:
        assert (members["big"].uid, members["big"].gid) == (12_345_678, 3_000_000_000)
    built = build_case(tmp_path / "3", fmt, "xattrs")
    with tarfile.open(
        fileobj=io.BytesIO(export_bytes(built.tree)), encoding="utf-8", errors="surrogateescape"
    ) as t:
        members = {m.name: m for m in t.getmembers()}
    assert members["x"].pax_headers["SCHILY.xattr.user.a"] == "1"
    assert "SCHILY.xattr.user.low" not in members["merged"].pax_headers


def _big_file_tree(tmp_path: Path, fmt: WhiteoutFormat) -> tuple[ComposedTree, bytes]:
    """Two layers: a 3 MiB file (sendfile's size) is replaced above by another, beside
    small files, so the export mixes buffered writes and sendfile."""
    big = os.urandom(3 << 20) + b"tail"
    views = build_layers(
        tmp_path / "layers",
        fmt,
        [
            [D("d"), F("d/big", os.urandom(2 << 20)), F("d/a", "a")],
            [D("d"), F("d/big", big), F("d/z", "z" * 700), F("d/exact", b"e" * (1 << 20))],
        ],
    )
    return ComposedTree(views), big


def test_export_tar_big_files_to_a_file_and_a_pipe(tmp_path: Path, fmt: WhiteoutFormat) -> None:
    """A file of 1 MiB or more goes to a real descriptor with sendfile(2): the bytes are
    the same as through Python (a BytesIO has no descriptor), in a file and in a pipe."""
    tree, big = _big_file_tree(tmp_path, fmt)
    reference = export_bytes(tree)
    with open(tmp_path / "out.tar", "wb") as f:
        export_tar(tree, f)
    assert (tmp_path / "out.tar").read_bytes() == reference
    read_fd, write_fd = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(
        target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 1 << 16), b""))
    )
    reader.start()
    with open(write_fd, "wb") as w:
        export_tar(tree, w)
    reader.join()
    os.close(read_fd)
    assert b"".join(chunks) == reference
    with tarfile.open(fileobj=io.BytesIO(reference)) as t:
        got = t.extractfile("d/big")
        assert got is not None and got.read() == big
        exact = t.extractfile("d/exact")
        assert exact is not None and exact.read() == b"e" * (1 << 20)


def test_export_tar_through_wrappers_and_sockets_never_sendfiles_past_them(
    tmp_path: Path, fmt: WhiteoutFormat
) -> None:
    """A GzipFile passes its file's fileno through, and a socket with a timeout is
    non-blocking: sendfile there would skip the compressor or fail half-way."""
    tree, _ = _big_file_tree(tmp_path, fmt)
    reference = export_bytes(tree)
    with gzip.open(tmp_path / "out.tar.gz", "wb") as z:
        export_tar(tree, z)  # type: ignore[arg-type]
    assert gzip.decompress((tmp_path / "out.tar.gz").read_bytes()) == reference
    ours, theirs = socket.socketpair()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: theirs.recv(1 << 16), b"")))
    reader.start()
    ours.settimeout(30)
    with ours, ours.makefile("wb") as w:
        export_tar(tree, w)
    reader.join()
    theirs.close()
    assert b"".join(chunks) == reference


def test_export_tar_falls_back_when_sendfile_cannot_write_there(
    tmp_path: Path, fmt: WhiteoutFormat, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, _ = _big_file_tree(tmp_path, fmt)
    reference = export_bytes(tree)
    calls: list[int] = []

    def refuse(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", refuse)
    with open(tmp_path / "out.tar", "wb") as f:
        export_tar(tree, f)
    assert (tmp_path / "out.tar").read_bytes() == reference
    assert len(calls) == 1  # refused once, then not asked again


def test_export_tar_file_that_shrank_under_sendfile_is_an_error(
    tmp_path: Path, fmt: WhiteoutFormat, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, _ = _big_file_tree(tmp_path, fmt)
    monkeypatch.setattr(os, "sendfile", lambda *args: 0)
    with (
        open(tmp_path / "out.tar", "wb") as f,
        pytest.raises(StorageError, match="changed size while being exported"),
    ):
        export_tar(tree, f)


# --- performance (one rough measurement, printed; run with -s to see it) -----------------


@pytest.mark.skipif(
    not os.environ.get("OCISTORE_BENCH"), reason="set OCISTORE_BENCH=1 to time against cp -a"
)
def test_materialize_timing_vs_cp(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    for d in range(100):
        sub = layer / f"dir{d:03}" / "sub"
        sub.mkdir(parents=True)
        for i in range(100):
            (sub.parent / f"f{i:03}").write_bytes(b"x" * (i * 10))
        for i in range(100):
            (sub / f"g{i:03}").write_bytes(b"y" * 100)
    tree = ComposedTree([LayerView(str(layer), OCI)])
    count = sum(1 for _ in tree.walk())
    start = time.perf_counter()
    materialize(tree, str(tmp_path / "mat"))
    ours = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(["cp", "-a", str(layer), str(tmp_path / "cp")], check=True)
    cp = time.perf_counter() - start
    print(f"\n{count} entries: materialize {ours:.3f}s, cp -a {cp:.3f}s")
    assert shape(tmp_path / "mat") == shape(tmp_path / "cp")
