"""Composed image filesystems measured against oracles: the kernel's overlayfs, GNU tar
extracting our export, and umoci's own unpack of the same image (built by umoci)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ocistore import Store
from ocistore.errors import ContainerNotFoundError, PathNotFoundError
from ocistore.registry.transport import TransportOptions

from . import trees
from .registryd import Registry

ROOT_USER = os.geteuid() == 0


def _store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"), transport=TransportOptions(certs_dir="/nonexistent"))


def _untar(path: Path, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=user.*", "-xpf", str(path), "-C", str(dest)],
        check=True,
        capture_output=True,
    )


def _umoci_rootfs(layout: Path, tag: str, dest: Path) -> Path:
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)],
        check=True,
        capture_output=True,
    )
    return dest / "rootfs"


@pytest.mark.parametrize("variant", ["multi", "multi_v2s2", "multi_zstd"])
def test_copy_export_and_umoci_agree(
    registry_plain: Registry, tmp_path: Path, variant: str
) -> None:
    image = getattr(registry_plain.images, variant)
    store = _store(tmp_path)
    store.pull(image.reference)
    copy = tmp_path / "copy"
    store.rootfs(image.reference, str(copy))
    tar_path = tmp_path / "export.tar"
    with open(tar_path, "wb") as out:
        store.export(image.reference, out)
    _untar(tar_path, tmp_path / "untar")
    umoci = _umoci_rootfs(Path(image.source_layout), image.source_tag, tmp_path / "umoci")

    ours = trees.snapshot(copy)
    assert trees.diff(ours, trees.snapshot(tmp_path / "untar")) == []
    assert trees.diff(ours, trees.snapshot(umoci)) == []
    # The oracle comparison saw the hard parts of this image.
    assert b"etc/rpc" not in ours  # whited out in layer 2
    assert b"usr/share/doc/netbase" not in ours  # a whited-out directory
    assert isinstance(ours[b"usr/share/cowsay/cows"], trees.Entry)  # dir -> file in layer 3
    assert ours[b"usr/share/cowsay/cows"].kind == "file"
    assert isinstance(ours[b"etc/protocols"], trees.Entry)
    assert ours[b"etc/protocols"].kind == "dir"  # file -> dir
    doc = sorted(p for p in ours if p.startswith(b"usr/share/doc/busybox-static/"))
    assert doc == [b"usr/share/doc/busybox-static/README.opaque"]  # opaque in layer 4
    assert b"ocistore-test/hardlink-b" not in ours


def test_export_to_stdout_from_the_cli(registry_plain: Registry, tmp_path: Path) -> None:
    image = registry_plain.images.multi
    root = tmp_path / "store"
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path)}
    base = [sys.executable, "-m", "ocistore", "--root", str(root)]
    subprocess.run([*base, "pull", "-q", image.reference], check=True, env=env, capture_output=True)
    proc = subprocess.run([*base, "export", image.reference], env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        names = set(tar.getnames())
    assert "usr/bin/hello" in names
    assert not any(os.path.basename(n).startswith(".wh.") for n in names)


def test_ls_and_cat_resolve_through_layers(registry_plain: Registry, tmp_path: Path) -> None:
    image = registry_plain.images.multi
    store = _store(tmp_path)
    store.pull(image.reference)
    copy = tmp_path / "copy"
    store.rootfs(image.reference, str(copy))
    tree = store.tree(image.reference)
    for directory in ("", "etc", "usr/share/doc/busybox-static", "ocistore-test"):
        listed = sorted(os.path.basename(n.path) for n in tree.listdir(directory))
        assert listed == sorted(os.listdir(copy / directory)), directory
    with tree.open("/etc/protocols/README") as f:
        assert f.read() == (copy / "etc/protocols/README").read_bytes()
    # /usr/bin/hi is a symlink to hello: cat follows it inside the image.
    with tree.open("/usr/bin/hi") as f:
        assert f.read() == (copy / "usr/bin/hello").read_bytes()
    with pytest.raises(PathNotFoundError):
        tree.lookup("/etc/rpc")  # whited out


def test_cat_cli_and_missing_path_exit_code(registry_plain: Registry, tmp_path: Path) -> None:
    image = registry_plain.images.multi
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path)}
    base = [sys.executable, "-m", "ocistore", "--root", str(tmp_path / "store")]
    subprocess.run([*base, "pull", "-q", image.reference], check=True, env=env, capture_output=True)
    ok = subprocess.run(
        [*base, "cat", image.reference, "/etc/protocols/README"], env=env, capture_output=True
    )
    assert ok.returncode == 0 and ok.stdout
    missing = subprocess.run(
        [*base, "cat", image.reference, "/etc/rpc"], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 3
    assert missing.stderr.startswith("ocistore: ") and len(missing.stderr.splitlines()) == 1
    listing = subprocess.run(
        [*base, "ls", "-l", image.reference, "/usr/bin"], env=env, capture_output=True, text=True
    )
    assert listing.returncode == 0
    assert any(
        line.startswith("l") and "hi -> hello" in line for line in listing.stdout.splitlines()
    )


def test_rootfs_refuses_a_non_empty_destination(registry_plain: Registry, tmp_path: Path) -> None:
    from ocistore.errors import UsageError

    image = registry_plain.images.multi
    store = _store(tmp_path)
    store.pull(image.reference)
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(UsageError):
        store.rootfs(image.reference, str(dest))
    assert (dest / "keep").read_text() == "mine"


def test_layers_listing_and_overlay_option(registry_plain: Registry, tmp_path: Path) -> None:
    image = registry_plain.images.multi
    store = _store(tmp_path)
    store.pull(image.reference)
    info = store.inspect(image.reference)
    views = store.layer_views(image.reference)
    assert [v.path for v in views] == [layer.directory for layer in info.layers]
    from ocistore.compose import lowerdir_option

    assert lowerdir_option(views) == [v.path for v in reversed(views)]


# --- containers ---------------------------------------------------------------------------
@pytest.mark.skipif(not ROOT_USER, reason="overlayfs needs root")
def test_overlay_mount_equals_copy_driver_and_umoci(
    registry_plain: Registry, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    store = _store(tmp_path)
    store.pull(image.reference)
    record = store.containers.create(image.reference, driver="overlay")
    try:
        assert os.listdir(Path(store.root) / "containers" / record.id / "upper") == []
        merged = store.containers.mount(record.name)
        copy = tmp_path / "copy"
        store.rootfs(image.reference, str(copy))
        umoci = _umoci_rootfs(Path(image.source_layout), image.source_tag, tmp_path / "umoci")
        seen = trees.snapshot(merged)
        assert trees.diff(seen, trees.snapshot(copy)) == []
        assert trees.diff(seen, trees.snapshot(umoci)) == []
    finally:
        store.containers.rm(record.name, force=True)


@pytest.mark.parametrize("driver", ["overlay", "copy"])
def test_container_changes_diff_commit_and_rm(
    registry_plain: Registry, tmp_path: Path, driver: str
) -> None:
    if driver == "overlay" and not ROOT_USER:
        pytest.skip("overlayfs needs root")
    image = registry_plain.images.multi
    store = _store(tmp_path)
    store.pull(image.reference)
    layer_dirs = [layer.directory for layer in store.inspect(image.reference).layers]
    before = {d: trees.snapshot(d, whiteouts="overlay") for d in layer_dirs if d}
    record = store.containers.create(image.reference, driver=driver, name=f"c-{driver}")
    other = store.containers.create(image.reference, driver=driver)
    try:
        _change_diff_commit(store, tmp_path, record.name, other.name)
        store.containers.rm(record.name, force=True)
        assert not (Path(store.root) / "containers" / record.id).exists()
        assert {d: trees.snapshot(d, whiteouts="overlay") for d in layer_dirs if d} == before
    finally:
        for name in (record.name, other.name):
            with contextlib.suppress(ContainerNotFoundError):
                store.containers.rm(name, force=True)


def _change_diff_commit(store: Store, tmp_path: Path, name: str, other: str) -> None:
    rootfs = Path(store.containers.mount(name))
    (rootfs / "etc/hostname").write_text("changed\n")  # new file
    (rootfs / "etc/protocols/README").write_text("edited\n")  # changed file
    os.unlink(rootfs / "usr/bin/hello")  # deleted file
    os.unlink(rootfs / "usr/share/cowsay/cows")  # a file since layer 3 (was a dir)
    changes = {(c.kind, c.path) for c in store.containers.diff(name)}
    assert ("A", "/etc/hostname") in changes
    assert ("C", "/etc/protocols/README") in changes
    assert ("D", "/usr/bin/hello") in changes
    assert ("D", "/usr/share/cowsay/cows") in changes

    committed = store.containers.commit(name, "localhost/committed:1")
    copy = tmp_path / "committed"
    store.rootfs("localhost/committed:1", str(copy))
    assert trees.diff(trees.snapshot(copy), trees.snapshot(rootfs)) == []
    # umoci reads the committed image straight from the store and agrees.
    umoci = _umoci_rootfs(Path(store.root), committed.name, tmp_path / "umoci-committed")
    assert trees.diff(trees.snapshot(umoci), trees.snapshot(rootfs)) == []
    # The other container is untouched.
    other_root = Path(store.containers.mount(other))
    assert (other_root / "usr/bin/hello").exists()


@pytest.mark.skipif(not ROOT_USER, reason="bind mounts need root")
@pytest.mark.parametrize("driver", ["overlay", "copy"])
def test_volumes_are_shared_and_survive_rm(
    registry_plain: Registry, tmp_path: Path, driver: str
) -> None:
    from ocistore.errors import InUseError

    image = registry_plain.images.multi
    store = _store(tmp_path)
    store.pull(image.reference)
    a = store.containers.create(image.reference, driver=driver, volume_specs=["data:/data"])
    b = store.containers.create(image.reference, driver=driver, volume_specs=["data:/mnt/ro:ro"])
    try:
        root_a = Path(store.containers.mount(a.name))
        root_b = Path(store.containers.mount(b.name))
        (root_a / "data/hello").write_text("from a")
        assert (root_b / "mnt/ro/hello").read_text() == "from a"
        with pytest.raises(OSError):
            (root_b / "mnt/ro/nope").write_text("x")
        with pytest.raises(InUseError):
            store.containers.volume_rm("data")
        # The volume's data is outside the container's writable layer.
        assert not any(c.path.startswith("/data/") for c in store.containers.diff(a.name))
    finally:
        store.containers.rm(a.name, force=True)
        store.containers.rm(b.name, force=True)
    mountpoint = store.containers.volume_inspect("data")["mountpoint"]
    assert isinstance(mountpoint, str)
    assert Path(mountpoint, "hello").read_text() == "from a"
    store.containers.volume_rm("data")


def test_ps_sizes_and_df_do_not_overcount(registry_plain: Registry, tmp_path: Path) -> None:
    images = registry_plain.images
    store = _store(tmp_path)
    store.pull(images.multi.reference)
    store.pull(images.multi_zstd.reference)
    c = store.containers.create(images.multi.reference, driver="copy")
    rootfs = Path(store.containers.mount(c.name))
    (rootfs / "grow").write_bytes(b"x" * 100_000)
    [status] = store.containers.ps(all=True, sizes=True)
    layers_total = sum(
        layer.unpacked_size or 0 for layer in store.inspect(images.multi.reference).layers
    )
    assert status.size is not None and status.size >= 100_000
    assert status.virtual_size == status.size + layers_total
    usage = store.df()
    assert len(usage.images) == 2
    # Two images sharing every layer: the layers count once, and are all shared.
    assert usage.layers_total == layers_total
    assert usage.layers_shared == layers_total
    assert all(i.unique == 0 for i in usage.images)
    assert sum(i.size for i in usage.images) == 2 * layers_total
    # The CLI's --json forms carry the same figures, as objects keyed by field name.
    base = [sys.executable, "-m", "ocistore", "--root", str(tmp_path / "store")]
    ps = subprocess.run([*base, "ps", "-a", "-s", "--json"], capture_output=True, check=True)
    [listed] = json.loads(ps.stdout)
    assert listed["id"] == status.id and listed["name"] == c.name
    assert (listed["size"], listed["virtual_size"]) == (status.size, status.virtual_size)
    df = subprocess.run([*base, "df", "--json"], capture_output=True, check=True)
    assert json.loads(df.stdout)["layers_total"] == layers_total
    store.containers.rm(c.name, force=True)


@pytest.fixture(scope="module")
def deep_image(registry_plain: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """128 layers, added by umoci: each adds a file, rewrites a shared one, and every
    tenth removes an earlier layer's file (a whiteout written by hand, as tar does)."""
    work = tmp_path_factory.mktemp("deep")
    layout = work / "layout"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:deep"], check=True)
    for i in range(128):
        tar_path = work / f"layer-{i}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in ((f"layers/{i:03d}", f"layer {i}\n"), ("shared", f"from {i}\n")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 1_700_000_000 + i
                tar.addfile(info, io.BytesIO(data.encode()))
            if i and i % 10 == 0:
                info = tarfile.TarInfo(f"layers/.wh.{i - 5:03d}")
                tar.addfile(info, io.BytesIO(b""))
        subprocess.run(
            ["umoci", "raw", "add-layer", "--image", f"{layout}:deep", str(tar_path)],
            check=True,
            capture_output=True,
        )
    pushed = registry_plain.push(layout, "deep", "ocistore-test/deep")
    assert len(pushed.layer_digests) == 128
    return pushed.reference


@pytest.mark.skipif(not ROOT_USER, reason="overlayfs needs root")
def test_128_layer_image_mounts_and_composes(deep_image: str, tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.pull(deep_image)
    record = store.containers.create(deep_image, driver="overlay")
    try:
        merged = Path(store.containers.mount(record.name))
        copy = tmp_path / "copy"
        store.rootfs(deep_image, str(copy))
        assert trees.diff(trees.snapshot(merged), trees.snapshot(copy)) == []
        assert (merged / "shared").read_text() == "from 127\n"
        names = sorted(os.listdir(merged / "layers"))
        removed = {f"{i - 5:03d}" for i in range(10, 128, 10)}
        assert names == sorted(f"{i:03d}" for i in range(128) if f"{i:03d}" not in removed)
    finally:
        store.containers.rm(record.name, force=True)
