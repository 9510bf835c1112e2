"""Store maintenance: ``prune`` (remove what nothing references) and ``fsck`` (verify
every blob, layer directory and metadata row; with ``repair``, remove what is broken so
that the next pull restores it).

Both run under the store lock taken exclusively, so they never race a pull (pulls hold
it shared for their whole run): nothing a running pull has fetched can be pruned.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ocistore.digest import Digest
from ocistore.errors import InvalidDigestError

if TYPE_CHECKING:
    from ocistore.api import Store

_CHUNK = 1 << 20
_RESUMABLE = re.compile(r"^sha(256-[0-9a-f]{64}|512-[0-9a-f]{128})\.partial$")


@dataclass
class PruneReport:
    blobs: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # directory names
    temporary: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    bytes_freed: int = 0


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    resumable: list[str] = field(default_factory=list)  # kept partial downloads
    blobs_checked: int = 0
    layers_checked: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems


def _size(path: str) -> int:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_blocks * 512
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:  # read-only directories would stop rmtree as non-root
                full = os.path.join(dirpath, name)
                if not os.path.islink(full):
                    os.chmod(full, 0o700)
        os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _referenced_blobs(store: Store) -> set[str]:
    blobs, _ = store.metadata.referenced()
    for container in store.metadata.containers():
        blobs.add(container.manifest_digest)
    return blobs


def prune(store: Store) -> PruneReport:
    report = PruneReport()
    if not store.exists():
        return report
    with store.exclusive():
        keep_blobs = _referenced_blobs(store)
        _, keep_layers = store.metadata.referenced()
        for digest in list(store.content.iter_blobs()):
            if str(digest) not in keep_blobs:
                path = store.content.blob_path(digest)
                report.bytes_freed += _size(path)
                store.content.delete(digest)
                report.blobs.append(str(digest))
        known_dirs = set()
        for layer in store.metadata.layers():
            if layer.diff_id not in keep_layers:
                path = store.layer_dirs.path(layer.dir)
                report.bytes_freed += _size(path)
                store.metadata.remove_layer(layer.diff_id)
                _remove(path)
                report.layers.append(layer.dir)
            else:
                known_dirs.add(layer.dir)
        for name in store.layer_dirs.names():
            if name not in known_dirs:
                path = store.layer_dirs.path(name)
                report.bytes_freed += _size(path)
                _remove(path)
                report.layers.append(name)
        for path in store.layer_dirs.temp_dirs() + [
            os.path.join(store.content.ingest_dir, n) for n in os.listdir(store.content.ingest_dir)
        ]:
            report.bytes_freed += _size(path)
            _remove(path)
            report.temporary.append(os.path.basename(path))
        cdir = os.path.join(store.root, "containers")
        if os.path.isdir(cdir):
            ids = {c.id for c in store.metadata.containers()}
            for name in os.listdir(cdir):
                if name not in ids and not _has_mounts(os.path.join(cdir, name)):
                    report.bytes_freed += _size(os.path.join(cdir, name))
                    _remove(os.path.join(cdir, name))
                    report.containers.append(name)
    return report


def _has_mounts(path: str) -> bool:
    prefix = os.path.realpath(path) + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4].startswith(prefix) for line in f)
    except OSError:
        return False


def fsck(store: Store, *, repair: bool = False) -> FsckReport:
    report = FsckReport()
    if not store.exists():
        return report
    # Exclusive even to read: a running pull's temporary files would look like leftovers.
    with store.exclusive():
        _check_blobs(store, report, repair)
        _check_layers(store, report, repair)
        _check_images(store, report, repair)
        leftovers = store.layer_dirs.temp_dirs()
        for name in sorted(os.listdir(store.content.ingest_dir)):
            if _RESUMABLE.match(name):
                # An interrupted download kept for the next pull to resume: not damage
                # (its bytes are checked against the digest when the download completes).
                report.resumable.append(name)
            else:
                leftovers.append(os.path.join(store.content.ingest_dir, name))
        for path in leftovers:
            report.problems.append(f"leftover temporary {os.path.relpath(path, store.root)}")
            if repair:
                _remove(path)
                report.repaired.append(f"removed {os.path.relpath(path, store.root)}")
    return report


def _check_blobs(store: Store, report: FsckReport, repair: bool) -> None:
    expected_sizes = dict(store.metadata.layer_blob_sizes())
    for algorithm in sorted(os.listdir(store.content.blobs_dir)):
        directory = os.path.join(store.content.blobs_dir, algorithm)
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            report.blobs_checked += 1
            try:
                digest = Digest.parse(f"{algorithm}:{name}")
            except InvalidDigestError:
                report.problems.append(f"blob {algorithm}/{name}: not a digest name")
                if repair:
                    _remove(path)
                    report.repaired.append(f"removed blob {algorithm}/{name}")
                continue
            h = digest.hasher()
            size = 0
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            problem = None
            if h.hexdigest() != digest.hex:
                problem = f"blob {digest}: content hashes to {algorithm}:{h.hexdigest()}"
            elif str(digest) in expected_sizes and expected_sizes[str(digest)] != size:
                problem = f"blob {digest}: {size} bytes, expected {expected_sizes[str(digest)]}"
            if problem:
                report.problems.append(problem)
                if repair:
                    store.content.delete(digest)
                    report.repaired.append(f"removed blob {digest}")


def _check_layers(store: Store, report: FsckReport, repair: bool) -> None:
    known = set()
    _, in_use = store.metadata.referenced()
    for layer in store.metadata.layers():
        report.layers_checked += 1
        path = store.layer_dirs.path(layer.dir)
        known.add(layer.dir)
        if not os.path.isdir(path) or os.path.islink(path):
            if layer.diff_id not in in_use:
                # A pull records a layer's row just before renaming its directory into
                # place (ingest.LayerIngester._publish_layer): killed in between, it leaves
                # this row, which no image uses, and a .tmp- directory. A leftover like
                # the temporary files, not damage: the next pull redoes it, prune drops it.
                report.problems.append(
                    f"leftover temporary layer record {layer.diff_id}: directory "
                    f"{layer.dir} was never published (an interrupted pull)"
                )
            else:
                report.problems.append(f"layer {layer.diff_id}: directory {layer.dir} is missing")
            if repair:
                store.metadata.remove_layer(layer.diff_id)
                _remove(path)
                report.repaired.append(f"forgot layer {layer.diff_id}")
    for name in store.layer_dirs.names():
        if name not in known:
            report.problems.append(f"layer directory {name} is not in the metadata")
            if repair:
                _remove(store.layer_dirs.path(name))
                report.repaired.append(f"removed layer directory {name}")


def _check_images(store: Store, report: FsckReport, repair: bool) -> None:
    refs = set()
    try:
        index = store.content.read_index()
    except (OSError, ValueError) as exc:
        report.problems.append(f"index.json is unreadable: {exc}")
        index = {"manifests": []}
    for entry in index.get("manifests", []):
        name = (entry.get("annotations") or {}).get("org.opencontainers.image.ref.name")
        refs.add(name)
    for image in store.metadata.images():
        needed = [image.manifest_digest, image.config_digest]
        if image.index_digest:
            needed.append(image.index_digest)
        layers = store.metadata.image_layers(image.name)
        needed += [layer.blob_digest for layer in layers]
        for digest in needed:
            if not store.content.has(Digest.parse(digest)):
                report.problems.append(f"image {image.name}: blob {digest} is missing")
        for layer in layers:
            if store.metadata.layer(layer.diff_id) is None:
                report.problems.append(f"image {image.name}: layer {layer.diff_id} is missing")
        if image.name not in refs:
            # A pull (or commit) records the image, then writes its index.json entry; rmi
            # removes the entry, then the record. A kill between the two leaves this: the
            # next pull of the image (or --repair) writes the entry, the next rmi ends it.
            report.problems.append(
                f"leftover temporary state of an interrupted pull or rmi: image {image.name} "
                "is recorded but not in index.json"
            )
            if repair and store.content.has(Digest.parse(image.manifest_digest)):
                from ocistore.model import Descriptor
                from ocistore.platform import Platform

                store.content.set_ref(
                    image.name,
                    Descriptor(
                        image.manifest_type,
                        Digest.parse(image.manifest_digest),
                        image.manifest_size,
                        Platform.parse(image.platform),
                    ),
                )
                report.repaired.append(f"restored {image.name} in index.json")
    names = {image.name for image in store.metadata.images()}
    for name in sorted(r for r in refs if r and r not in names):
        report.problems.append(f"index.json names {name}, which is not in the metadata")
        if repair:
            store.content.remove_ref(name)
            report.repaired.append(f"removed {name} from index.json")
