"""fsck finds every kind of damage, --repair removes it, and the next pull restores it;
prune removes only what nothing references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ocistore import Store
from ocistore.digest import Digest
from ocistore.registry.transport import TransportOptions

from .registryd import Registry


@pytest.fixture
def pulled(registry_plain: Registry, tmp_path: Path) -> tuple[Store, str]:
    store = Store(str(tmp_path / "store"), transport=TransportOptions(certs_dir="/nonexistent"))
    image = registry_plain.images.multi
    store.pull(image.reference)
    assert store.fsck().clean
    return store, image.reference


def test_fsck_of_a_fresh_store_is_clean_and_checks_everything(
    pulled: tuple[Store, str],
) -> None:
    store, reference = pulled
    report = store.fsck()
    assert report.problems == []
    assert report.blobs_checked == len(list(store.content.iter_blobs())) > 0
    assert report.layers_checked == len(store.inspect(reference).layers)


def test_corrupt_blob_is_found_repaired_and_refetched(pulled: tuple[Store, str]) -> None:
    store, reference = pulled
    layer = store.inspect(reference).layers[0]
    path = store.content.blob_path(Digest.parse(layer.digest))
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"rot")
    report = store.fsck()
    assert [p for p in report.problems if layer.digest in p], report.problems
    repaired = store.fsck(repair=True)
    assert any(layer.digest in r for r in repaired.repaired)
    assert not store.content.has(Digest.parse(layer.digest))
    result = store.pull(reference)
    assert result.layers_fetched == 1
    assert store.fsck().clean


def test_lost_layer_directory_is_forgotten_and_unpacked_again(
    pulled: tuple[Store, str],
) -> None:
    store, reference = pulled
    layer = store.inspect(reference).layers[1]
    assert layer.directory is not None
    store.layer_dirs.remove(layer.directory)
    report = store.fsck()
    assert any("is missing" in p and layer.diff_id in p for p in report.problems)
    store.fsck(repair=True)
    store.pull(reference)  # the blob is still there: unpacked from it, not downloaded
    again = store.inspect(reference).layers[1]
    assert again.directory is not None and os.path.isdir(again.directory)
    assert store.fsck().clean


def test_pull_killed_between_its_record_and_index_json_leaves_a_leftover_the_next_completes(
    registry_plain: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's metadata row is written, then its index.json entry: a kill between the
    two (seen once in about ten runs of the SIGKILL test) leaves a usable image that the
    OCI layout does not list yet. fsck calls it a leftover, not damage; the next pull of
    the image, or fsck --repair, writes the entry."""
    image = registry_plain.images.multi
    root = tmp_path / "store"

    def killed(self: object, name: str, descriptor: object) -> None:
        raise KeyboardInterrupt("killed after the image's row was written")

    store = Store(str(root), transport=TransportOptions(certs_dir="/nonexistent"))
    with monkeypatch.context() as patch:
        patch.setattr("ocistore.store.content.ContentStore.set_ref", killed)
        with pytest.raises(KeyboardInterrupt):
            store.pull(image.reference)
    store.close()
    store = Store(str(root), transport=TransportOptions(certs_dir="/nonexistent"))
    problems = store.fsck().problems
    assert problems == [
        "leftover temporary state of an interrupted pull or rmi: image "
        f"{store.inspect(image.reference).reference} is recorded but not in index.json"
    ]
    assert store.pull(image.reference).layers_fetched == 0
    assert store.fsck().clean
    names = [
        (m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
        for m in store.content.read_index()["manifests"]
    ]
    assert store.inspect(image.reference).reference in names


def test_prune_removes_orphans_and_leftovers_only(pulled: tuple[Store, str]) -> None:
    store, reference = pulled
    before = {layer.directory for layer in store.inspect(reference).layers}
    orphan = store.layer_dirs.path("0123456789abcdef0123456789")
    os.mkdir(orphan)
    Path(orphan, "junk").write_bytes(b"x" * 10000)
    temp = store.layer_dirs.new_temp()
    stray_blob = store.content.put(b"nobody needs me")
    Path(store.content.ingest_dir, "sha256-dead.partial").write_bytes(b"partial")
    report = store.fsck()
    assert len(report.problems) == 3  # orphan dir, temp dir, partial ingest (stray blob is fine)
    pruned = store.prune()
    assert str(stray_blob) in pruned.blobs
    assert "0123456789abcdef0123456789" in pruned.layers
    assert os.path.basename(temp) in pruned.temporary
    assert pruned.bytes_freed > 10000
    assert {layer.directory for layer in store.inspect(reference).layers} == before
    assert all(os.path.isdir(d) for d in before if d)
    assert store.fsck().clean


def test_prune_after_rmi_keeps_what_the_other_image_uses(
    registry_plain: Registry, tmp_path: Path
) -> None:
    store = Store(str(tmp_path / "store"), transport=TransportOptions(certs_dir="/nonexistent"))
    images = registry_plain.images
    store.pull(images.multi.reference)
    store.pull(images.multi_zstd.reference)
    store.rmi(images.multi.reference)
    assert store.prune().layers == []
    assert store.fsck().clean
    tree = store.inspect(images.multi_zstd.reference)
    assert all(layer.directory and os.path.isdir(layer.directory) for layer in tree.layers)
