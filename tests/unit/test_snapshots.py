"""Tests for ocistore.snapshots: the overlay and copy drivers of a container's writable layer.

Layers are real layer directories: small tars written with ``tarfile`` and unpacked by
``ocistore.unpack`` (OVERLAY form as root, OCI form for the copy driver). The same
container session (modify, add, delete, delete-and-recreate a directory, replace a file by
a directory and back, hardlink, symlink, FIFO, chmod/chown, xattr) runs on each driver, and
``changes()``, ``export_changes()`` and a round trip (the exported tar unpacked as a new
layer and composed over the image equals the container's rootfs) are checked exactly.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ocistore import compose, snapshots, volumes
from ocistore.compose import LayerView
from ocistore.errors import InUseError, MountError, StorageError, UsageError
from ocistore.snapshots import Change, CopyDriver, OverlayDriver
from ocistore.snapshots.changes import _TarWriter
from ocistore.tarwriter import pax_time
from ocistore.unpack import UnpackOptions, WhiteoutFormat, unpack_layer

ROOT = os.geteuid() == 0
OCI = WhiteoutFormat.OCI
OVERLAY = WhiteoutFormat.OVERLAY
MTIME = 1_600_000_000


# --- layers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class E:
    """One tar entry: kind d(ir) f(ile) l(symlink) h(ardlink) w(hiteout marker file)."""

    name: str
    kind: str
    data: bytes = b""
    mode: int = 0o644
    target: str = ""


def d(name: str, mode: int = 0o755) -> E:
    return E(name, "d", mode=mode)


def f(name: str, data: bytes, mode: int = 0o644) -> E:
    return E(name, "f", data, mode)


def sym(name: str, target: str) -> E:
    return E(name, "l", target=target, mode=0o777)


def hard(name: str, target: str) -> E:
    return E(name, "h", target=target)


def wh(name: str) -> E:
    return E(name, "f", b"", 0o644)


def tar_bytes(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode = e.mode
            info.mtime = MTIME
            info.type = {
                "d": tarfile.DIRTYPE,
                "f": tarfile.REGTYPE,
                "l": tarfile.SYMTYPE,
                "h": tarfile.LNKTYPE,
            }[e.kind]
            info.linkname = e.target
            info.size = len(e.data) if e.kind == "f" else 0
            tar.addfile(info, io.BytesIO(e.data) if e.kind == "f" else None)
    return buf.getvalue()


class Layers:
    """Makes layer directories under one base directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.count = 0

    def from_tar(self, data: bytes, fmt: WhiteoutFormat, name: str | None = None) -> LayerView:
        self.count += 1
        dest = self.base / (name or f"layer{self.count}")
        dest.mkdir(parents=True)
        result = unpack_layer(
            io.BytesIO(data), str(dest), UnpackOptions(whiteouts=fmt, same_owner=ROOT, devices=ROOT)
        )
        return LayerView(str(dest), fmt, result.opaque_root)

    def make(self, entries: list[E], fmt: WhiteoutFormat, name: str | None = None) -> LayerView:
        return self.from_tar(tar_bytes(entries), fmt, name)


BASE = [
    d("etc"),
    f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    f("etc/hosts", b"127.0.0.1\n"),
    d("etc/app"),
    f("etc/app/a.conf", b"a=1\n"),
    d("etc/app/sub"),
    f("etc/app/sub/deep", b"deep\n"),
    d("bin"),
    f("bin/sh", b"#!shell\n", 0o755),
    sym("bin/link", "sh"),
    hard("bin/hard", "bin/sh"),
    d("var"),
    d("var/lib"),
    f("var/lib/data", b"1\n"),
    d("tmp", 0o1777),
    d("home"),
    d("opt"),
    d("opt/old"),
    f("opt/old/x", b"x"),
    d("opt/old/y"),
    f("opt/old/y/z", b"z"),
    d("usr"),
]
TOP = [
    f("etc/hosts", b"127.0.0.1 localhost\n"),
    wh("var/lib/.wh.data"),
    d("usr/bin"),
    f("usr/bin/tool", b"tool\n", 0o755),
    d("opt/old"),
    wh("opt/old/.wh..wh..opq"),
    f("opt/old/n", b"new\n"),
]
# The composed image, in short: path -> ("d",) | ("f", data) | ("l", target)
IMAGE = {
    "bin": ("d",),
    "bin/hard": ("f", b"#!shell\n"),
    "bin/link": ("l", "sh"),
    "bin/sh": ("f", b"#!shell\n"),
    "etc": ("d",),
    "etc/app": ("d",),
    "etc/app/a.conf": ("f", b"a=1\n"),
    "etc/app/sub": ("d",),
    "etc/app/sub/deep": ("f", b"deep\n"),
    "etc/hosts": ("f", b"127.0.0.1 localhost\n"),
    "etc/passwd": ("f", b"root:x:0:0:root:/root:/bin/sh\n"),
    "home": ("d",),
    "opt": ("d",),
    "opt/old": ("d",),
    "opt/old/n": ("f", b"new\n"),
    "tmp": ("d",),
    "usr": ("d",),
    "usr/bin": ("d",),
    "usr/bin/tool": ("f", b"tool\n"),
    "var": ("d",),
    "var/lib": ("d",),
}


# --- trees ---------------------------------------------------------------------------------


def short(root: str | Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for rel, st, path in _walk(Path(root)):
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("d",)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("f", path.read_bytes())
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(path))
        else:
            out[rel] = ("?", stat.S_IFMT(st.st_mode))
    return out


def _walk(root: Path, rel: str = "") -> Iterator[tuple[str, os.stat_result, Path]]:
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        crel = f"{rel}/{entry.name}" if rel else entry.name
        st = entry.stat(follow_symlinks=False)
        yield crel, st, Path(entry.path)
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, crel)


def _xattrs(path: Path, prefixes: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(
        sorted(
            (n, os.getxattr(path, n, follow_symlinks=False))
            for n in names
            if n.startswith(prefixes)
        )
    )


def full(root: str | Path, *, exact: bool = False) -> dict[str, tuple[Any, ...]]:
    """Everything a container sees: type, mode, owner, user xattrs, content or target or
    device, mtime (not for directories: docker ignores them). ``exact`` adds directory
    mtimes, ctimes and every xattr (to prove a tree was not touched at all)."""
    prefixes = ("",) if exact else ("user.",)
    out: dict[str, tuple[Any, ...]] = {}
    for rel, st, path in _walk(Path(root)):
        mode = st.st_mode
        item: tuple[Any, ...] = (
            stat.S_IFMT(mode),
            stat.S_IMODE(mode) if not stat.S_ISLNK(mode) else 0,
            st.st_uid,
            st.st_gid,
            _xattrs(path, prefixes),
        )
        if stat.S_ISREG(mode):
            item += (path.read_bytes(), st.st_mtime_ns)
        elif stat.S_ISLNK(mode):
            item += (os.readlink(path), st.st_mtime_ns)
        elif not stat.S_ISDIR(mode):
            item += (st.st_rdev, st.st_mtime_ns)
        if exact:
            item += (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_nlink)
        out[rel] = item
    if exact:
        st = os.lstat(root)
        out[""] = (st.st_mode, st.st_mtime_ns, st.st_ctime_ns, _xattrs(Path(root), prefixes))
    return out


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


def names(data: bytes) -> list[tuple[str, str]]:
    kinds = {
        tarfile.DIRTYPE: "d",
        tarfile.REGTYPE: "f",
        tarfile.SYMTYPE: "l",
        tarfile.LNKTYPE: "h",
        tarfile.FIFOTYPE: "p",
    }
    return [(m.name, kinds.get(m.type, repr(m.type))) for m in members(data)]


# --- the container session -----------------------------------------------------------------


def mutate(root: Path) -> None:
    """What a container does; each step's expected report is in EXPECTED_CHANGES."""
    with open(root / "etc/passwd", "a") as out:  # copy-up + modify
        out.write("user:x:1000:1000::/home/user:/bin/sh\n")
    (root / "etc/new.conf").write_bytes(b"new\n")
    os.link(root / "etc/new.conf", root / "etc/new-link")
    with contextlib.suppress(OSError):
        os.setxattr(root / "etc/new.conf", "user.test", b"value")
    os.unlink(root / "bin/link")
    shutil.rmtree(root / "usr/bin")
    shutil.rmtree(root / "etc/app")  # delete a directory, then recreate it
    (root / "etc/app").mkdir()
    os.chmod(root / "etc/app", 0o755)
    (root / "etc/app/a.conf").write_bytes(b"a=2\n")
    (root / "etc/app/b.conf").write_bytes(b"b=1\n")
    os.unlink(root / "etc/hosts")  # a file becomes a directory
    (root / "etc/hosts").mkdir()
    (root / "etc/hosts/x").write_bytes(b"x\n")
    shutil.rmtree(root / "var/lib")  # a directory becomes a file
    (root / "var/lib").write_bytes(b"now a file\n")
    os.chmod(root / "home", 0o700)
    (root / "srv/www").mkdir(parents=True)
    (root / "srv/www/index.html").write_bytes(b"<html>\n")
    if ROOT:
        os.chown(root / "srv/www/index.html", 1000, 1000)
    os.symlink("www", root / "srv/current")
    os.mkfifo(root / "srv/fifo")
    (root / "tmp/scratch").write_bytes(b"gone soon")  # created and deleted: no change
    os.unlink(root / "tmp/scratch")


EXPECTED_CHANGES = [
    ("C", "/bin"),
    ("D", "/bin/link"),
    ("C", "/etc"),
    ("C", "/etc/app"),
    ("C", "/etc/app/a.conf"),
    ("A", "/etc/app/b.conf"),
    ("D", "/etc/app/sub"),
    ("C", "/etc/hosts"),
    ("A", "/etc/hosts/x"),
    ("A", "/etc/new-link"),
    ("A", "/etc/new.conf"),
    ("C", "/etc/passwd"),
    ("C", "/home"),
    ("A", "/srv"),
    ("A", "/srv/current"),
    ("A", "/srv/fifo"),
    ("A", "/srv/www"),
    ("A", "/srv/www/index.html"),
    ("C", "/usr"),
    ("D", "/usr/bin"),
    ("C", "/var"),
    ("C", "/var/lib"),
]

# What the overlay upper holds, as a tar: opaque directories whole, tmp/ copied up.
EXPECTED_OVERLAY_TAR = [
    ("bin", "d"),
    ("bin/.wh.link", "f"),
    ("etc", "d"),
    ("etc/app", "d"),
    ("etc/app/.wh..wh..opq", "f"),
    ("etc/app/a.conf", "f"),
    ("etc/app/b.conf", "f"),
    ("etc/hosts", "d"),
    ("etc/hosts/.wh..wh..opq", "f"),
    ("etc/hosts/x", "f"),
    ("etc/new-link", "f"),
    ("etc/new.conf", "h"),
    ("etc/passwd", "f"),
    ("home", "d"),
    ("srv", "d"),
    ("srv/current", "l"),
    ("srv/fifo", "p"),
    ("srv/www", "d"),
    ("srv/www/index.html", "f"),
    ("tmp", "d"),
    ("usr", "d"),
    ("usr/.wh.bin", "f"),
    ("var", "d"),
    ("var/lib", "f"),
]

# The copy driver writes explicit whiteouts (what OCI prefers) and only what changed.
EXPECTED_COPY_TAR = [
    ("bin", "d"),
    ("bin/.wh.link", "f"),
    ("etc", "d"),
    ("etc/app", "d"),
    ("etc/app/.wh.sub", "f"),
    ("etc/app/a.conf", "f"),
    ("etc/app/b.conf", "f"),
    ("etc/hosts", "d"),
    ("etc/hosts/x", "f"),
    ("etc/new-link", "f"),
    ("etc/new.conf", "h"),
    ("etc/passwd", "f"),
    ("home", "d"),
    ("srv", "d"),
    ("srv/current", "l"),
    ("srv/fifo", "p"),
    ("srv/www", "d"),
    ("srv/www/index.html", "f"),
    ("usr", "d"),
    ("usr/.wh.bin", "f"),
    ("var", "d"),
    ("var/lib", "f"),
]


def as_pairs(changes: list[Change]) -> list[tuple[str, str]]:
    return [(c.kind, c.path) for c in changes]


def check_members(data: bytes, root: Path) -> None:
    """Details every driver's tar must get right."""
    by_name = {m.name: m for m in members(data)}
    for name, m in by_name.items():
        base = name.rsplit("/", 1)[-1]
        if base.startswith(".wh."):
            assert m.isreg() and m.size == 0, name
    link = by_name["etc/new.conf"]
    assert link.type == tarfile.LNKTYPE and link.linkname == "etc/new-link"
    assert by_name["srv/current"].linkname == "www"
    passwd = by_name["etc/passwd"]
    st = os.lstat(root / "etc/passwd")
    assert passwd.size == st.st_size
    assert passwd.pax_headers.get("mtime") == pax_time(st.st_mtime_ns)
    if ROOT:
        assert (by_name["srv/www/index.html"].uid, by_name["srv/www/index.html"].gid) == (
            1000,
            1000,
        )
    assert by_name["home"].mode == 0o700
    assert not any(name.startswith(("/", "./")) for name in by_name)
    # every member is followed by the end-of-archive blocks: the tar is complete
    assert len(data) % tarfile.RECORDSIZE == 0


def compose_tree(layers: list[LayerView], dest: Path) -> Path:
    compose.materialize(compose.ComposedTree(layers), str(dest))
    return dest


def without_root(tree: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    return {k: v for k, v in tree.items() if k}


# --- fixtures ------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(not ROOT, reason="needs root (overlayfs, mknod, trusted.* xattrs)")


@pytest.fixture(scope="session")
def overlay_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip when overlayfs cannot be mounted here (not root, no overlay, nested overlay)."""
    if not ROOT:
        pytest.skip("overlayfs needs root")
    base = tmp_path_factory.mktemp("overlay-probe")
    for name in ("lower", "upper", "work", "merged"):
        (base / name).mkdir()
    opts = f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work"
    proc = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(base / "merged")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount overlayfs here: {proc.stderr.strip()}")
    subprocess.run(["umount", str(base / "merged")], check=True)


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path / "layers")


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    """Undo mounts even when a test fails (remove() would refuse to delete through them)."""
    undo: list[Callable[[], None]] = []
    yield undo
    for fn in reversed(undo):
        with contextlib.suppress(Exception):
            fn()


def image(layers: Layers, fmt: WhiteoutFormat) -> list[LayerView]:
    return [layers.make(BASE, fmt), layers.make(TOP, fmt)]


# --- driver-independent behaviour ----------------------------------------------------------


def test_get_driver_by_name_and_choice(layers: Layers) -> None:
    assert isinstance(snapshots.get_driver("overlay"), OverlayDriver)
    assert isinstance(snapshots.get_driver("copy"), CopyDriver)
    with pytest.raises(UsageError, match="unknown snapshot driver"):
        snapshots.get_driver("btrfs")
    oci = image(layers, OCI)
    assert snapshots.get_driver(None, oci).name == "copy"
    with pytest.raises(StorageError, match=r"cannot be used: .*(OCI form|needs root)"):
        snapshots.get_driver("overlay", oci)
    assert snapshots.get_driver("copy", oci).name == "copy"


def test_overlay_availability_reasons(layers: Layers, monkeypatch: pytest.MonkeyPatch) -> None:
    oci = image(layers, OCI)
    verdict = OverlayDriver().available(oci)
    assert not verdict
    assert ("OCI form" in verdict.reason) or ("root" in verdict.reason)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    verdict = OverlayDriver().available(oci)
    assert not verdict.ok and "needs root" in verdict.reason
    assert CopyDriver().available(oci)


def test_remove_tree_never_follows_symlinks_and_handles_readonly_dirs(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    victim = tmp_path / "victim"
    (victim / "ro/deeper").mkdir(parents=True)
    (victim / "ro/deeper/file").write_text("x")
    os.symlink(canary, victim / "to-canary")
    os.symlink(canary / "keep", victim / "ro/to-keep")
    os.symlink("/", victim / "to-root")
    os.chmod(victim / "ro/deeper", 0o500)
    os.chmod(victim / "ro", 0o000)
    before = full(canary, exact=True)
    snapshots.remove_tree(str(victim))
    assert not victim.exists()
    assert full(canary, exact=True) == before
    snapshots.remove_tree(str(victim))  # missing is fine


def test_change_str_and_order() -> None:
    changes = [Change("A", "/a-b"), Change("C", "/a"), Change("A", "/a/b")]
    assert [str(c) for c in snapshots._sorted_changes(changes)] == ["C /a", "A /a/b", "A /a-b"]


# --- overlay -------------------------------------------------------------------------------


@needs_root
def test_overlay_session(
    layers: Layers, tmp_path: Path, overlay_works: None, cleanup: list[Callable[[], None]]
) -> None:
    drv = OverlayDriver()
    img = image(layers, OVERLAY)
    assert drv.available(img)
    before = [full(layer.path, exact=True) for layer in img]
    cdir = tmp_path / "containers" / "c1"
    rootfs = drv.prepare(img, str(cdir))
    cleanup.append(lambda: drv.remove(str(cdir)))
    assert rootfs == str(cdir / "merged") == drv.rootfs(str(cdir))
    assert snapshots.driver_name(str(cdir)) == "overlay"
    assert os.listdir(cdir / "upper") == []
    assert not drv.is_mounted(str(cdir))

    assert drv.mount(str(cdir), img) == rootfs
    assert drv.mount(str(cdir), img) == rootfs  # idempotent
    assert drv.is_mounted(str(cdir))
    assert snapshots.mounts_under(str(cdir)).count(os.path.realpath(rootfs)) == 1
    assert os.listdir(cdir / "upper") == []  # nothing copied: constant time in image size
    assert short(rootfs) == IMAGE
    assert os.lstat(Path(rootfs) / "tmp").st_mode & 0o7777 == 0o1777
    assert drv.changes(str(cdir), img) == []
    assert drv.writable_size(str(cdir)) == 0

    mutate(Path(rootfs))
    assert as_pairs(drv.changes(str(cdir), img)) == EXPECTED_CHANGES
    assert os.getxattr(cdir / "upper/etc/app", "trusted.overlay.opaque") == b"y"
    assert drv.writable_size(str(cdir)) > 0

    out = io.BytesIO()
    drv.export_changes(str(cdir), img, out)
    data = out.getvalue()
    assert names(data) == EXPECTED_OVERLAY_TAR
    check_members(data, Path(rootfs))
    again = io.BytesIO()
    drv.export_changes(str(cdir), img, again)
    assert again.getvalue() == data  # deterministic

    # Round trip: the tar as a new layer over the image is the container's rootfs, both as
    # the composer builds it and as the kernel mounts it.
    new = layers.from_tar(data, OVERLAY)
    container = without_root(full(rootfs))
    assert without_root(full(compose_tree([*img, new], tmp_path / "composed"))) == container
    check = tmp_path / "check"
    check.mkdir()
    lower = ":".join(layer.path for layer in reversed([*img, new]))
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", check], check=True
    )
    try:
        assert without_root(full(check)) == container
    finally:
        subprocess.run(["umount", check], check=True)

    # Changes and export also work unmounted (they read the upper directory).
    drv.umount(str(cdir))
    drv.umount(str(cdir))  # idempotent
    assert not drv.is_mounted(str(cdir))
    assert as_pairs(drv.changes(str(cdir), img)) == EXPECTED_CHANGES

    drv.mount(str(cdir), img)
    drv.remove(str(cdir))  # unmounts first
    assert not cdir.exists()
    assert not drv.is_mounted(str(cdir))
    assert [full(layer.path, exact=True) for layer in img] == before


@needs_root
def test_overlay_containers_are_independent(
    layers: Layers, tmp_path: Path, overlay_works: None, cleanup: list[Callable[[], None]]
) -> None:
    drv = OverlayDriver()
    img = image(layers, OVERLAY)
    c1, c2 = str(tmp_path / "c1"), str(tmp_path / "c2")
    for cdir in (c1, c2):
        drv.prepare(img, cdir)
        cleanup.append(lambda cdir=cdir: drv.remove(cdir))  # type: ignore[misc]
        drv.mount(cdir, img)
    mutate(Path(drv.rootfs(c1)))
    assert short(drv.rootfs(c2)) == IMAGE
    assert drv.changes(c2, img) == []
    (Path(drv.rootfs(c2)) / "etc/passwd").write_text("c2\n")
    assert (Path(drv.rootfs(c1)) / "etc/passwd").read_text().startswith("root:")
    assert as_pairs(drv.changes(c2, img)) == [("C", "/etc"), ("C", "/etc/passwd")]
    drv.remove(c1)
    assert short(drv.rootfs(c2))["etc/passwd"] == ("f", b"c2\n")
    drv.remove(c2)


@needs_root
def test_overlay_128_layers_mount(
    layers: Layers, tmp_path: Path, overlay_works: None, cleanup: list[Callable[[], None]]
) -> None:
    img = []
    for i in range(128):
        entries = [d("data"), f(f"data/f{i:03d}", b"%d\n" % i), f("common", b"%d\n" % i)]
        if i % 10 == 9:
            entries.append(wh(f"data/.wh.f{i - 1:03d}"))
        img.append(layers.make(entries, OVERLAY, name=f"{i:03d}-" + "x" * 60))
    # The plain absolute option would not fit in one page.
    assert len(":".join(layer.path for layer in img)) > 4096
    drv = OverlayDriver()
    cdir = str(tmp_path / "deep" / ("c" * 100))
    start = time.monotonic()
    drv.prepare(img, cdir)
    cleanup.append(lambda: drv.remove(cdir))
    assert time.monotonic() - start < 5
    assert len(drv.mount_options(128)) < 4096
    root = Path(drv.mount(cdir, img))
    assert os.listdir(Path(cdir) / "upper") == []
    assert (root / "common").read_text() == "127\n"
    expected = {f"f{i:03d}" for i in range(128)} - {f"f{i - 1:03d}" for i in range(9, 128, 10)}
    assert set(os.listdir(root / "data")) == expected
    assert drv.changes(cdir, img) == []
    os.unlink(root / "data/f000")
    assert as_pairs(drv.changes(cdir, img)) == [("C", "/data"), ("D", "/data/f000")]
    drv.remove(cdir)
    assert not os.path.exists(cdir)


@needs_root
def test_overlay_opaque_root_layer_cuts_the_stack(
    layers: Layers, tmp_path: Path, overlay_works: None, cleanup: list[Callable[[], None]]
) -> None:
    img = [
        layers.make([f("old", b"old\n")], OVERLAY),
        layers.make([wh(".wh..wh..opq"), f("new", b"new\n")], OVERLAY),
    ]
    assert img[1].opaque_root
    drv = OverlayDriver()
    cdir = str(tmp_path / "c")
    drv.prepare(img, cdir)
    cleanup.append(lambda: drv.remove(cdir))
    root = drv.mount(cdir, img)
    assert short(root) == {"new": ("f", b"new\n")}
    assert drv.changes(cdir, img) == []


@needs_root
def test_overlay_mount_options_take_effect(
    layers: Layers, tmp_path: Path, overlay_works: None, cleanup: list[Callable[[], None]]
) -> None:
    """redirect_dir=off: renaming a lower directory is EXDEV (tools fall back to copying,
    so the upper never holds a redirect); metacopy=off: a chmod copies the data up too."""
    img = image(layers, OVERLAY)
    drv = OverlayDriver()
    cdir = str(tmp_path / "c")
    drv.prepare(img, cdir)
    cleanup.append(lambda: drv.remove(cdir))
    root = Path(drv.mount(cdir, img))
    with pytest.raises(OSError) as info:
        os.rename(root / "etc/app", root / "etc/app2")
    assert info.value.errno == errno.EXDEV
    shutil.move(root / "etc/app", root / "etc/app2")
    os.chmod(root / "bin/sh", 0o700)
    upper = Path(cdir) / "upper"
    assert (upper / "bin/sh").read_bytes() == b"#!shell\n"
    assert "trusted.overlay.metacopy" not in os.listxattr(upper / "bin/sh")
    assert as_pairs(drv.changes(cdir, img)) == [
        ("C", "/bin"),
        ("C", "/bin/sh"),
        ("C", "/etc"),
        ("D", "/etc/app"),
        ("A", "/etc/app2"),
        ("A", "/etc/app2/a.conf"),
        ("A", "/etc/app2/sub"),
        ("A", "/etc/app2/sub/deep"),
    ]


@pytest.mark.parametrize("driver", ["overlay", "copy"])
def test_export_refuses_names_that_read_as_whiteouts(
    layers: Layers, tmp_path: Path, driver: str, cleanup: list[Callable[[], None]], request: Any
) -> None:
    if driver == "overlay":
        request.getfixturevalue("overlay_works")
    drv = snapshots.get_driver(driver)
    img = image(layers, OVERLAY if driver == "overlay" else OCI)
    cdir = str(tmp_path / "c")
    drv.prepare(img, cdir)
    cleanup.append(lambda: drv.remove(cdir))
    root = Path(drv.mount(cdir, img))
    (root / "etc/.wh.passwd").write_text("would delete /etc/passwd once applied")
    assert ("A", "/etc/.wh.passwd") in as_pairs(drv.changes(cdir, img))
    with pytest.raises(StorageError, match=r"/etc/\.wh\.passwd: names starting with '\.wh\.'"):
        drv.export_changes(cdir, img, io.BytesIO())


@needs_root
def test_overlay_mount_failure_is_a_clear_mount_error(
    layers: Layers, tmp_path: Path, overlay_works: None
) -> None:
    img = [layers.make([f("a", b"a")], OVERLAY)]
    drv = OverlayDriver()
    cdir = str(tmp_path / "c")
    drv.prepare(img, cdir)
    shutil.rmtree(img[0].path)  # the lowerdir is gone
    with pytest.raises(MountError, match=r"^cannot mount overlay at .*merged: \S"):
        drv.mount(cdir, img)
    assert not drv.is_mounted(cdir)
    drv.remove(cdir)


@needs_root
def test_overlay_refuses_oci_layers_and_unprepared_dirs(layers: Layers, tmp_path: Path) -> None:
    drv = OverlayDriver()
    with pytest.raises(StorageError, match="OCI whiteouts"):
        drv.prepare(image(layers, OCI), str(tmp_path / "c"))
    with pytest.raises(StorageError, match="not prepared"):
        drv.changes(str(tmp_path / "nothing"), [])


@needs_root
def test_remove_refuses_while_a_volume_is_bound_inside(
    layers: Layers, tmp_path: Path, overlay_works: None, cleanup: list[Callable[[], None]]
) -> None:
    vol = volumes.create(str(tmp_path / "volumes"), "data")
    Path(vol, "precious").write_text("keep me")
    for drv in (OverlayDriver(), CopyDriver()):
        fmt = OVERLAY if drv.name == "overlay" else OCI
        img = image(layers, fmt)
        cdir = str(tmp_path / f"c-{drv.name}")
        drv.prepare(img, cdir)
        cleanup.append(lambda drv=drv, cdir=cdir: drv.remove(cdir))  # type: ignore[misc]
        rootfs = drv.mount(cdir, img)
        volumes.bind(vol, rootfs, "/data", False)
        cleanup.append(lambda rootfs=rootfs: volumes.unbind(rootfs, "/data"))  # type: ignore[misc]
        if drv.name == "overlay":
            with pytest.raises(MountError, match="busy"):
                drv.remove(cdir)
        else:
            # the volume is not part of the diff: only its (new) mount point is
            changes = as_pairs(drv.changes(cdir, img))
            assert changes == [("A", "/data")]
            out = io.BytesIO()
            drv.export_changes(cdir, img, out)
            assert names(out.getvalue()) == [("data", "d")]
            with pytest.raises(InUseError, match="still mounted"):
                drv.remove(cdir)
        assert Path(vol, "precious").read_text() == "keep me"
        volumes.unbind(rootfs, "/data")
        drv.remove(cdir)
        assert not os.path.exists(cdir)
        assert Path(vol, "precious").read_text() == "keep me"


# --- copy ----------------------------------------------------------------------------------

COPY_FORMATS = [
    pytest.param(OCI, id="oci"),
    pytest.param(OVERLAY, id="overlay-form", marks=needs_root),
]


@pytest.mark.parametrize("fmt", COPY_FORMATS)
def test_copy_session(layers: Layers, tmp_path: Path, fmt: WhiteoutFormat) -> None:
    drv = CopyDriver()
    img = image(layers, fmt)
    before = [full(layer.path, exact=True) for layer in img]
    cdir = tmp_path / "containers" / "c1"
    rootfs = drv.prepare(img, str(cdir))
    assert not drv.is_mounted(str(cdir))
    assert rootfs == str(cdir / "rootfs") == drv.mount(str(cdir), img) == drv.rootfs(str(cdir))
    assert drv.is_mounted(str(cdir))
    assert drv.mount(str(cdir), img) == rootfs
    assert snapshots.driver_name(str(cdir)) == "copy"
    assert short(rootfs) == IMAGE
    assert drv.changes(str(cdir), img) == []
    assert drv.writable_size(str(cdir)) == 0
    out = io.BytesIO()
    drv.export_changes(str(cdir), img, out)
    assert members(out.getvalue()) == []

    mutate(Path(rootfs))
    assert as_pairs(drv.changes(str(cdir), img)) == EXPECTED_CHANGES
    changed_files = [p[1:] for k, p in EXPECTED_CHANGES if k != "D"]
    sizes = {}
    for rel in changed_files:
        st = os.lstat(Path(rootfs) / rel)
        if not stat.S_ISDIR(st.st_mode):
            sizes[st.st_ino] = st.st_size
    assert drv.writable_size(str(cdir)) == sum(sizes.values())

    out = io.BytesIO()
    drv.export_changes(str(cdir), img, out)
    data = out.getvalue()
    assert names(data) == EXPECTED_COPY_TAR
    check_members(data, Path(rootfs))

    new = layers.from_tar(data, fmt)
    composed = compose_tree([*img, new], tmp_path / "composed")
    assert without_root(full(composed)) == without_root(full(rootfs))

    drv.umount(str(cdir))  # only the recorded state changes
    assert not drv.is_mounted(str(cdir))
    assert short(rootfs)["etc/passwd"][1].endswith(b"/bin/sh\n")
    drv.remove(str(cdir))
    assert not cdir.exists()
    assert [full(layer.path, exact=True) for layer in img] == before


def test_copy_containers_are_independent(layers: Layers, tmp_path: Path) -> None:
    drv = CopyDriver()
    img = image(layers, OCI)
    c1, c2 = str(tmp_path / "c1"), str(tmp_path / "c2")
    drv.prepare(img, c1)
    drv.prepare(img, c2)
    mutate(Path(drv.rootfs(c1)))
    assert short(drv.rootfs(c2)) == IMAGE
    assert drv.changes(c2, img) == []
    drv.remove(c1)
    assert short(drv.rootfs(c2)) == IMAGE
    drv.remove(c2)


def test_copy_sees_in_place_rewrite_with_restored_mtime(layers: Layers, tmp_path: Path) -> None:
    """Same size, same mtime, same inode: only ctime tells (docker's rule would miss it)."""
    drv = CopyDriver()
    img = image(layers, OCI)
    cdir = str(tmp_path / "c")
    root = Path(drv.prepare(img, cdir))
    target = root / "etc/passwd"
    st = os.stat(target)
    with open(target, "r+b") as out:
        out.write(b"R")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert as_pairs(drv.changes(cdir, img)) == [("C", "/etc"), ("C", "/etc/passwd")]


def test_copy_prepare_refuses_a_prepared_dir(layers: Layers, tmp_path: Path) -> None:
    drv = CopyDriver()
    img = image(layers, OCI)
    cdir = str(tmp_path / "c")
    drv.prepare(img, cdir)
    with pytest.raises(StorageError, match="already prepared"):
        drv.prepare(img, cdir)
    with pytest.raises(StorageError, match="belongs to the 'copy' driver"):
        OverlayDriver().changes(cdir, img)


def test_copy_manifest_round_trips(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f\udcff").write_bytes(b"x")  # a non-UTF-8 name
    os.symlink("/nowhere", root / "a" / "l")
    entries = list(snapshots._Manifest.take(str(root)))
    path = str(tmp_path / "manifest")
    snapshots._Manifest.write(path, entries)
    loaded = snapshots._Manifest.load(path)
    assert set(loaded.records) == {"", "a", "a/b", "a/b/f\udcff", "a/l"}
    assert loaded.records["a/l"] == snapshots._Rec.of(os.lstat(root / "a" / "l"))
    assert sorted(loaded.children["a"]) == ["b", "l"]
    Path(path).write_bytes(b"garbage")
    with pytest.raises(StorageError, match="not a copy manifest"):
        snapshots._Manifest.load(path)


def test_changes_tar_writer_ends_the_archive_once() -> None:
    """Two zero blocks padded to a 10 KiB record, as tarfile's close(), and only once."""
    out = io.BytesIO()
    writer = _TarWriter(out)
    writer.marker("etc", ".wh.gone")
    writer.close()
    writer.close()
    data = out.getvalue()
    assert len(data) == 10240
    assert data[512:] == bytes(10240 - 512)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert t.getnames() == ["etc/.wh.gone"]
