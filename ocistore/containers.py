"""Containers: an image's read-only layers plus one writable layer, Docker-style.

This module keeps the records (in the store's metadata database) and the rules: names and
ids, which driver, volumes in use, what ``rm`` may remove. The filesystem mechanics of
each driver (overlay mounts, the copy driver's materialised tree, diffs, the changes tar)
are in ``ocistore.snapshots``; volume directories and bind mounts in ``volumes.py``.

Layout: ``ROOT/containers/<id>/`` is the driver's directory, ``ROOT/volumes/<name>/_data``
a volume's data — both outside ``ROOT/layers``, which a container never writes.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, NamedTuple

from ocistore import snapshots
from ocistore.compose import LayerView
from ocistore.errors import (
    AlreadyExistsError,
    ContainerNotFoundError,
    InUseError,
    InvalidReferenceError,
    UsageError,
    VolumeNotFoundError,
)
from ocistore.store.metadata import ContainerRecord, ImageRecord, VolumeMount
from ocistore.whiteouts import WhiteoutFormat

# volumes.py (bind mounts) is imported by what mounts, unmounts or manages volumes.
if TYPE_CHECKING:
    from ocistore.api import Store

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


class ContainerStatus(NamedTuple):
    id: str
    name: str
    image: str
    driver: str
    created: float
    mounted: bool
    rootfs: str
    size: int | None  # the writable layer's bytes (docker ps -s SIZE)
    virtual_size: int | None  # writable plus read-only layers (docker's "virtual")


def parse_volume_spec(spec: str) -> VolumeMount:
    """``VOL:/path[:ro|rw]`` as ``--volume`` takes it."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
        raise UsageError(f"invalid volume {spec!r}: expected VOLUME:/PATH[:ro]")
    readonly = False
    if len(parts) == 3:
        if parts[2] not in ("ro", "rw"):
            raise UsageError(f"invalid volume {spec!r}: mode must be ro or rw")
        readonly = parts[2] == "ro"
    return VolumeMount(parts[0], os.path.normpath(parts[1]), readonly)


class Containers:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.dir = os.path.join(store.root, "containers")
        self.volume_dir = os.path.join(store.root, "volumes")

    # --- lookups -------------------------------------------------------------------------
    def get(self, name_or_id: str) -> ContainerRecord:
        if not self.store.exists():
            raise ContainerNotFoundError(f"no container {name_or_id!r}")
        records = self.store.metadata.containers()
        for record in records:
            if name_or_id in (record.name, record.id):
                return record
        matches = [r for r in records if len(name_or_id) >= 4 and r.id.startswith(name_or_id)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise UsageError(f"{name_or_id!r} is ambiguous: it matches several containers")
        raise ContainerNotFoundError(f"no container {name_or_id!r}")

    def _cdir(self, record: ContainerRecord) -> str:
        return os.path.join(self.dir, record.id)

    def _layers(self, diff_ids: Sequence[str]) -> list[LayerView]:
        views = []
        for diff_id in diff_ids:
            layer = self.store.metadata.layer(diff_id)
            if layer is None:
                raise ContainerNotFoundError(f"layer {diff_id} of the container is missing")
            views.append(
                LayerView(
                    self.store.layer_dirs.path(layer.dir),
                    WhiteoutFormat(layer.whiteouts),
                    layer.opaque_root,
                )
            )
        return views

    # --- lifecycle -----------------------------------------------------------------------
    def create(
        self,
        reference: str,
        *,
        name: str | None = None,
        driver: str | None = None,
        volume_specs: Sequence[str] = (),
    ) -> ContainerRecord:
        image = self.store.resolve(reference)
        diff_ids = [layer.diff_id for layer in self.store.metadata.image_layers(image.name)]
        layers = self._layers(diff_ids)
        chosen = snapshots.get_driver(driver, layers)
        mounts = [parse_volume_spec(spec) for spec in volume_specs]
        if len({m.target for m in mounts}) != len(mounts):
            raise UsageError("two volumes are mounted at the same path")
        if name is not None and not _NAME.match(name):
            raise InvalidReferenceError(
                f"invalid container name {name!r}: letters, digits, '_', '.', '-'"
            )
        cid = os.urandom(32).hex()  # what secrets.token_hex(32) is, without its imports
        name = name or cid[:12]
        if self.store.metadata.container_name_taken(name):
            raise AlreadyExistsError(f"a container named {name!r} exists")
        for mount in mounts:
            self.volume_create(mount.volume, exist_ok=True)
        os.makedirs(self.dir, exist_ok=True)
        cdir = os.path.join(self.dir, cid)
        os.mkdir(cdir, 0o700)
        try:
            chosen.prepare(layers, cdir)
            record = ContainerRecord(
                cid,
                name,
                image.name,
                image.manifest_digest,
                chosen.name,
                time.time(),
                tuple(diff_ids),
                tuple(mounts),
            )
            self.store.metadata.add_container(record)
        except BaseException:
            chosen.remove(cdir)
            raise
        return record

    def mount(self, name_or_id: str) -> str:
        from ocistore import volumes

        record = self.get(name_or_id)
        driver = snapshots.get_driver(record.driver)
        cdir = self._cdir(record)
        layers = self._layers(record.diff_ids)
        rootfs = driver.mount(cdir, layers)
        for mount in record.volumes:
            if not volumes.is_bound(rootfs, mount.target):
                volumes.bind(
                    volumes.path(self.volume_dir, mount.volume),
                    rootfs,
                    mount.target,
                    mount.readonly,
                )
        return rootfs

    def umount(self, name_or_id: str) -> None:
        record = self.get(name_or_id)
        self._umount(record)

    def _umount(self, record: ContainerRecord) -> None:
        from ocistore import volumes

        driver = snapshots.get_driver(record.driver)
        cdir = self._cdir(record)
        rootfs = driver.rootfs(cdir)
        for mount in reversed(record.volumes):
            if volumes.is_bound(rootfs, mount.target):
                volumes.unbind(rootfs, mount.target)
        if driver.is_mounted(cdir):
            driver.umount(cdir)

    def is_mounted(self, record: ContainerRecord) -> bool:
        return snapshots.get_driver(record.driver).is_mounted(self._cdir(record))

    def diff(self, name_or_id: str) -> list[snapshots.Change]:
        record = self.get(name_or_id)
        driver = snapshots.get_driver(record.driver)
        return driver.changes(self._cdir(record), self._layers(record.diff_ids))

    def commit(self, name_or_id: str, new_reference: str) -> ImageRecord:
        from ocistore.commit import commit_image

        record = self.get(name_or_id)
        driver = snapshots.get_driver(record.driver)
        base = self.store.image_by_digest(record.image, record.manifest_digest)
        cdir = self._cdir(record)
        layers = self._layers(record.diff_ids)

        def write(out: IO[bytes]) -> None:
            driver.export_changes(cdir, layers, out)

        return commit_image(self.store, base, write, new_reference)

    def rm(self, name_or_id: str, *, force: bool = False) -> ContainerRecord:
        record = self.get(name_or_id)
        if self.is_mounted(record) and not force:
            raise InUseError(f"container {record.name} is mounted; umount it or use rm -f")
        self._umount(record)
        driver = snapshots.get_driver(record.driver)
        # The record goes first: a crash after it leaves a directory for prune, never a
        # record whose directory is half gone.
        self.store.metadata.remove_container(record.id)
        driver.remove(self._cdir(record))
        return record

    def ps(self, *, all: bool = False, sizes: bool = False) -> list[ContainerStatus]:
        if not self.store.exists():
            return []
        out = []
        for record in self.store.metadata.containers():
            mounted = self.is_mounted(record)
            if not all and not mounted:
                continue
            driver = snapshots.get_driver(record.driver)
            cdir = self._cdir(record)
            size = virtual = None
            if sizes:
                size = driver.writable_size(cdir)
                virtual = size + sum(
                    (layer.size if (layer := self.store.metadata.layer(d)) else 0)
                    for d in record.diff_ids
                )
            out.append(
                ContainerStatus(
                    record.id,
                    record.name,
                    record.image,
                    record.driver,
                    record.created,
                    mounted,
                    driver.rootfs(cdir),
                    size,
                    virtual,
                )
            )
        return out

    # --- volumes -------------------------------------------------------------------------
    def volume_create(self, name: str, *, exist_ok: bool = False) -> str:
        from ocistore import volumes

        path = volumes.create(self.volume_dir, name)
        if not self.store.metadata.add_volume(name, time.time()) and not exist_ok:
            raise AlreadyExistsError(f"a volume named {name!r} exists")
        return path

    def volume_ls(self) -> list[tuple[str, float, str]]:
        from ocistore import volumes

        if not self.store.exists():
            return []
        return [
            (name, created, volumes.path(self.volume_dir, name))
            for name, created in self.store.metadata.volumes()
        ]

    def volume_inspect(self, name: str) -> dict[str, object]:
        for vname, created, path in self.volume_ls():
            if vname == name:
                return {
                    "name": vname,
                    "created": created,
                    "mountpoint": path,
                    "users": self.store.metadata.volume_users(name),
                    "size": _du(path),
                }
        raise VolumeNotFoundError(f"no volume {name!r}")

    def volume_rm(self, name: str) -> None:
        from ocistore import volumes

        self.volume_inspect(name)
        users = self.store.metadata.volume_users(name)
        if users:
            raise InUseError(f"volume {name} is used by container(s) {', '.join(users)}")
        self.store.metadata.remove_volume(name)
        volumes.remove(self.volume_dir, name)


def _du(path: str) -> int:
    """Disk usage, each inode once (hardlinks do not double-count)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for entry in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, entry))
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total
