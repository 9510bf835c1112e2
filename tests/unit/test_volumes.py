"""Tests for ocistore.volumes: volume directories and bind mounts into a container rootfs.

The mount tests need root (bind mounts); they check that a mount point is always found
inside the rootfs, whatever symlinks the image holds, and that a canary directory on the
host is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ocistore import snapshots, volumes
from ocistore.errors import InUseError, MountError, StorageError, UsageError

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="bind mounts need root")


def state(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Everything that could change under ``root`` (names, types, sizes, mtimes, ctimes)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
    return out


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    undo: list[Callable[[], None]] = []
    yield undo
    for fn in reversed(undo):
        with contextlib.suppress(Exception):
            fn()


@pytest.fixture
def can_bind(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("bind mounts need root")
    src, dst = tmp_path / "probe-src", tmp_path / "probe-dst"
    src.mkdir()
    dst.mkdir()
    try:
        snapshots.run_mount(["mount", "--bind", str(src), str(dst)], "probe")
    except MountError as exc:
        pytest.skip(f"bind mounts do not work here: {exc}")
    snapshots.run_mount(["umount", str(dst)], "probe")


# --- volume directories ------------------------------------------------------------------


def test_create_list_remove(tmp_path: Path) -> None:
    volroot = str(tmp_path / "volumes")
    assert volumes.list(volroot) == []
    data = volumes.create(volroot, "db-data_1.x")
    assert (
        data
        == os.path.join(volroot, "db-data_1.x", "_data")
        == volumes.path(volroot, "db-data_1.x")
    )
    assert os.path.isdir(data)
    Path(data, "file").write_text("hello")
    assert volumes.create(volroot, "db-data_1.x") == data  # idempotent: keeps the data
    assert Path(data, "file").read_text() == "hello"
    volumes.create(volroot, "a")
    os.mkdir(os.path.join(volroot, "no-data-dir"))  # not a volume: no _data
    os.mkdir(os.path.join(volroot, ".hidden"))
    assert volumes.list(volroot) == ["a", "db-data_1.x"]
    volumes.remove(volroot, "db-data_1.x")
    assert volumes.list(volroot) == ["a"]
    assert not os.path.exists(os.path.join(volroot, "db-data_1.x"))
    volumes.remove(volroot, "db-data_1.x")  # missing is fine


@pytest.mark.parametrize(
    "name", ["", ".x", "-x", "_x", "a/b", "..", "a b", "é", "x" * 256, "a\x00b"]
)
def test_invalid_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match="invalid volume name"):
        volumes.create(str(tmp_path), name)
    with pytest.raises(UsageError):
        volumes.path(str(tmp_path), name)
    with pytest.raises(UsageError):
        volumes.remove(str(tmp_path), name)


def test_remove_does_not_follow_symlinks(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    volroot = str(tmp_path / "volumes")
    data = volumes.create(volroot, "v")
    os.symlink(canary, os.path.join(data, "link"))
    os.symlink("/", os.path.join(data, "root"))
    before = state(canary)
    volumes.remove(volroot, "v")
    assert state(canary) == before


def test_bind_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    (tmp_path / "rootfs").mkdir()
    with pytest.raises(MountError, match="need root"):
        volumes.bind(str(tmp_path), str(tmp_path / "rootfs"), "/data", False)
    with pytest.raises(MountError, match="need root"):
        volumes.unbind(str(tmp_path / "rootfs"), "/data")


# --- bind mounts -------------------------------------------------------------------------


@needs_root
def test_bind_rw_and_ro(tmp_path: Path, can_bind: None, cleanup: list[Callable[[], None]]) -> None:
    volroot = str(tmp_path / "volumes")
    data = Path(volumes.create(volroot, "v"))
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)

    host = volumes.bind(str(data), str(rootfs), "/srv/data", False)
    cleanup.append(lambda: volumes.unbind(str(rootfs), "/srv/data"))
    assert host == str(rootfs / "srv/data")
    assert volumes.is_bound(str(rootfs), "/srv/data")
    assert volumes.is_bound(str(rootfs), "srv//./data/")
    assert not volumes.is_bound(str(rootfs), "/etc")
    assert not volumes.is_bound(str(rootfs), "/missing/x")
    (rootfs / "srv/data/written").write_text("through the mount")
    assert (data / "written").read_text() == "through the mount"

    ro_host = volumes.bind(str(data), str(rootfs), "/ro", True)
    cleanup.append(lambda: volumes.unbind(str(rootfs), "/ro"))
    assert (Path(ro_host) / "written").read_text() == "through the mount"
    with pytest.raises(OSError) as info:
        (rootfs / "ro/new").write_text("nope")
    assert info.value.errno == errno.EROFS
    (rootfs / "srv/data/still-rw").write_text("ok")  # the ro remount hit only /ro
    assert not os.statvfs(rootfs / "etc").f_flag & os.ST_RDONLY

    volumes.unbind(str(rootfs), "/ro")
    volumes.unbind(str(rootfs), "/srv/data")
    volumes.unbind(str(rootfs), "/srv/data")  # idempotent
    assert not volumes.is_bound(str(rootfs), "/srv/data")
    assert os.listdir(rootfs / "srv/data") == []  # the mount point, empty again
    assert sorted(os.listdir(data)) == ["still-rw", "written"]


@needs_root
def test_bind_a_file(tmp_path: Path, can_bind: None, cleanup: list[Callable[[], None]]) -> None:
    src = tmp_path / "resolv.conf"
    src.write_text("nameserver 10.0.0.1\n")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    volumes.bind(str(src), str(rootfs), "/etc/resolv.conf", True)
    cleanup.append(lambda: volumes.unbind(str(rootfs), "/etc/resolv.conf"))
    assert (rootfs / "etc/resolv.conf").read_text() == "nameserver 10.0.0.1\n"
    volumes.unbind(str(rootfs), "/etc/resolv.conf")
    assert stat.S_ISREG(os.lstat(rootfs / "etc/resolv.conf").st_mode)
    assert (rootfs / "etc/resolv.conf").read_text() == ""


@needs_root
@pytest.mark.parametrize(
    ("links", "target", "lands_at"),
    [
        ({"evil": "/"}, "/evil/mnt", "mnt"),
        ({"evil": "CANARY"}, "/evil", "CANARY"),
        ({"evil": "CANARY"}, "/evil/sub", "CANARY/sub"),
        ({"evil": "../../../../../../.."}, "/evil/mnt", "mnt"),
        ({"a": "b", "b": "/c/../../CANARY"}, "/a/x", "CANARY/x"),
        ({"var/run": "/run"}, "/var/run/sock-dir", "run/sock-dir"),
        ({}, "/../../../CANARY", "CANARY"),
    ],
)
def test_symlinks_in_the_image_stay_inside_the_rootfs(
    tmp_path: Path,
    can_bind: None,
    cleanup: list[Callable[[], None]],
    links: dict[str, str],
    target: str,
    lands_at: str,
) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    canary_in_image = str(canary).lstrip("/")
    data = Path(volumes.create(str(tmp_path / "volumes"), "v"))
    (data / "in-volume").write_text("v")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "var").mkdir()
    for name, link in links.items():
        os.symlink(link.replace("CANARY", str(canary)), rootfs / name)
    target = target.replace("CANARY", str(canary))
    before = state(canary)
    mounts_before = snapshots.mount_points()

    host = volumes.bind(str(data), str(rootfs), target, False)
    cleanup.append(lambda: volumes.unbind(str(rootfs), target))
    expected = rootfs / lands_at.replace("CANARY", canary_in_image)
    assert host == str(expected)
    assert (expected / "in-volume").read_text() == "v"
    new_mounts = [p for p in snapshots.mount_points() if p not in mounts_before]
    assert new_mounts == [str(expected)]
    assert state(canary) == before
    assert volumes.is_bound(str(rootfs), target)
    volumes.unbind(str(rootfs), target)
    assert not volumes.is_bound(str(rootfs), target)
    assert snapshots.mount_points() == mounts_before
    assert state(canary) == before


@needs_root
def test_bad_mount_points(tmp_path: Path, can_bind: None) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "file").write_text("x")
    os.symlink("loop2", rootfs / "loop1")
    os.symlink("loop1", rootfs / "loop2")
    os.symlink("/", rootfs / "to-root")
    src = str(tmp_path)
    with pytest.raises(UsageError, match="root"):
        volumes.bind(src, str(rootfs), "/", False)
    with pytest.raises(UsageError, match="root"):
        volumes.bind(src, str(rootfs), "/to-root", False)
    with pytest.raises(MountError, match="not a directory"):
        volumes.bind(src, str(rootfs), "/file/x", False)
    with pytest.raises(MountError, match="not a directory"):
        volumes.bind(src, str(rootfs), "/file", False)
    with pytest.raises(MountError, match="symlinks"):
        volumes.bind(src, str(rootfs), "/loop1/x", False)
    with pytest.raises(MountError, match="No such file"):
        volumes.bind(str(tmp_path / "missing"), str(rootfs), "/x", False)
    with pytest.raises(StorageError, match="cannot open rootfs"):
        volumes.bind(src, str(tmp_path / "no-rootfs"), "/x", False)


@needs_root
def test_remove_refuses_a_volume_with_a_mount_inside(
    tmp_path: Path, can_bind: None, cleanup: list[Callable[[], None]]
) -> None:
    volroot = str(tmp_path / "volumes")
    data = volumes.create(volroot, "v")
    other = Path(volumes.create(volroot, "other"))
    (other / "keep").write_text("keep")
    volumes.bind(str(other), data, "/nested", False)
    cleanup.append(lambda: volumes.unbind(data, "/nested"))
    with pytest.raises(InUseError, match="still mounted"):
        volumes.remove(volroot, "v")
    assert (other / "keep").read_text() == "keep"
    volumes.unbind(data, "/nested")
    volumes.remove(volroot, "v")
    assert volumes.list(volroot) == ["other"]
