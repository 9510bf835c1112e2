"""The kernel is the oracle: every composer case against a real read-only overlayfs mount.

Each case of ``test_compose.CASES`` is unpacked in OVERLAY form; the layer directories are
mounted as overlayfs lowerdirs and a full snapshot of the mount (type, mode, owner, size,
content hash, symlink target, xattrs, mtimes, hardlink groups) must equal both
``materialize``'s tree and GNU ``tar -x`` of ``export_tar``.

Mounting: overlayfs reads its options from ONE page (4096 bytes on x86-64), so long stacks
of absolute paths do not fit. We run ``mount`` with ``cwd=`` a private scratch directory
holding short symlinks ``l/0``, ``l/1``... to the layer directories and pass
``lowerdir=l/0:l/1:...`` (top first); overlayfs resolves the relative paths against the
mounting process's working directory and follows the symlinks once, at mount time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from ocistore.compose import ComposedTree, lowerdir_option, materialize
from ocistore.export import export_tar
from ocistore.unpack import WhiteoutFormat
from tests.unit.test_compose import (
    CASES,
    GNU_TAR,
    ROOT,
    Snapshot,
    assert_same,
    build_case,
    extract_with_gnu_tar,
    snapshot,
)

OVERLAY = WhiteoutFormat.OVERLAY
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not ROOT, reason="mounting overlayfs needs root"),
    pytest.mark.skipif(shutil.which("mount") is None, reason="no mount(8)"),
]


def _run_mount(option: str, target: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", option, str(target)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def overlay_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip the module if this kernel/container cannot mount overlayfs."""
    base = tmp_path_factory.mktemp("probe")
    for name in ("a", "b", "mnt"):
        (base / name).mkdir()
    result = _run_mount("ro,lowerdir=a:b", base / "mnt", base)
    if result.returncode != 0:
        pytest.skip(f"mount -t overlay fails here: {result.stderr.strip()}")
    _umount(base / "mnt")


@contextmanager
def mounted(lowers: Sequence[str], scratch: Path) -> Iterator[tuple[Path, str]]:
    """Mount ``lowers`` (top first) read-only; yields (mount point, option string).

    The option names short relative symlinks ``l/N`` (mount runs with ``cwd=scratch``), so
    hundreds of layers fit in one page. overlayfs needs two lowerdirs when there is no
    upperdir: a single layer gets an empty directory below it."""
    scratch.mkdir()
    links = scratch / "l"
    links.mkdir()
    lowers = list(lowers)
    if len(lowers) == 1:
        (scratch / "empty").mkdir()
        lowers.append(str(scratch / "empty"))
    for index, path in enumerate(lowers):
        os.symlink(path, links / str(index))
    option = "ro,lowerdir=" + ":".join(f"l/{i}" for i in range(len(lowers)))
    assert len(option) < PAGE_SIZE
    target = scratch / "mnt"
    target.mkdir()
    result = _run_mount(option, target, scratch)
    assert result.returncode == 0, f"mount -o {option} failed: {result.stderr}"
    try:
        # The symlinks were resolved at mount time; the mount does not need them any more.
        shutil.rmtree(links)
        yield target, option
    finally:
        _umount(target)


def _drivers(tree: ComposedTree, where: Path) -> tuple[Snapshot, Snapshot]:
    materialize(tree, str(where / "rootfs"))
    with open(where / "export.tar", "wb") as out:
        export_tar(tree, out)
    extract_with_gnu_tar((where / "export.tar").read_bytes(), where / "untar")
    return snapshot(where / "rootfs"), snapshot(where / "untar")


# Cases whose layer directories hold whiteouts in a directory only one layer provides
# (a new directory, or an opaque one): overlayfs passes such a directory's listing through
# unfiltered, so readdir shows the whiteout names although lookup finds nothing there.
KNOWN_PHANTOMS = {"whiteout_in_new_dir": {"fresh/ghost", "o/a"}}


@pytest.mark.skipif(GNU_TAR is None, reason="GNU tar not installed")
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_agrees(overlay_works: None, tmp_path: Path, name: str) -> None:
    built = build_case(tmp_path, OVERLAY, name)
    with mounted(lowerdir_option(built.views), tmp_path / "ovl") as (mnt, _):
        kernel = snapshot(mnt)
    mat, untar = _drivers(built.tree, tmp_path)
    assert_same(mat, kernel, "materialize vs overlayfs")
    assert_same(untar, kernel, "tar -x of export_tar vs overlayfs")
    assert kernel.phantoms <= KNOWN_PHANTOMS.get(name, set())
    assert not mat.phantoms and not untar.phantoms


def test_opaque_root_needs_the_cut(overlay_works: None, tmp_path: Path) -> None:
    """overlayfs ignores the opaque xattr on a lowerdir's root: mounting every layer shows
    what the opaque root hid; mounting lowerdir_option's cut stack matches the composer."""
    built = build_case(tmp_path, OVERLAY, "opaque_root")
    assert os.getxattr(built.views[1].path, "trusted.overlay.opaque") == b"y"
    everything = [v.path for v in reversed(built.views)]
    assert lowerdir_option(built.views) == everything[:2]
    with mounted(everything, tmp_path / "all") as (mnt, _):
        uncut = snapshot(mnt)
    with mounted(lowerdir_option(built.views), tmp_path / "cut") as (mnt, _):
        cut = snapshot(mnt)
    mat, _ = _drivers(built.tree, tmp_path)
    assert {"a", "b", "b/c"} <= set(uncut.entries)  # the kernel gets it wrong
    assert not {"a", "b", "b/c"} & set(cut.entries)
    assert_same(mat, cut, "materialize vs cut overlayfs")


def test_long_stack_needs_short_lowerdir_paths(overlay_works: None, tmp_path: Path) -> None:
    """128 layers by absolute path overflow the one-page option buffer; the same stack
    through short relative symlinks mounts, and matches the composer."""
    built = build_case(tmp_path, OVERLAY, "many_layers")
    lowers = lowerdir_option(built.views)
    assert len(lowers) == 128
    naive = "ro,lowerdir=" + ":".join(lowers)
    if len(naive) >= PAGE_SIZE:
        (tmp_path / "naive").mkdir()
        result = _run_mount(naive, tmp_path / "naive", tmp_path)
        if result.returncode == 0:  # pragma: no cover - a kernel without the limit
            _umount(tmp_path / "naive")
        assert result.returncode != 0
    with mounted(lowers, tmp_path / "ovl") as (mnt, option):
        assert option.startswith("ro,lowerdir=l/0:l/1:l/2:")
        assert option.endswith(":l/127")
        assert len(option) < 1024
        kernel = snapshot(mnt)
    mat, untar = _drivers(built.tree, tmp_path)
    assert_same(mat, kernel, "materialize vs overlayfs (128 layers)")
    assert_same(untar, kernel, "tar -x vs overlayfs (128 layers)")
