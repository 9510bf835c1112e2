"""The public, typed API: ``Store(root).pull("ubuntu:22.04")`` and friends.

A ``Store`` composes the content store (blobs, OCI layout), the layer directories and the
metadata database under one root. It never prints or exits; errors are ``ocistore.errors``.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import re
from contextlib import AbstractContextManager
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any

from ocistore.errors import (
    BlobNotFoundError,
    ImageNotFoundError,
    InUseError,
    InvalidReferenceError,
    StorageError,
    UsageError,
)
from ocistore.fsutil import file_lock
from ocistore.reference import Reference
from ocistore.store.content import ContentStore
from ocistore.store.layers import LayerDirs
from ocistore.store.metadata import ImageRecord, Metadata

# What only some commands need is imported where it is used (json, platform, transport
# options, whiteouts...): `images`, `create` and the like should not pay for `pull`.
if TYPE_CHECKING:
    import threading

    from ocistore.compose import ComposedTree, LayerView
    from ocistore.containers import Containers
    from ocistore.digest import Digest
    from ocistore.platform import Platform
    from ocistore.progress import ProgressFn
    from ocistore.pull import PulledImage
    from ocistore.registry.options import TransportOptions
    from ocistore.results import DiskUsage, ImageInfo, ImageSummary, RemovedImage
    from ocistore.store.maintenance import FsckReport, PruneReport
    from ocistore.whiteouts import UnpackOptions


def default_root() -> str:
    """``$OCISTORE_ROOT``, else /var/lib/ocistore for root, else the XDG data directory."""
    env = os.environ.get("OCISTORE_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/ocistore"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(data, "ocistore")


_ID_PREFIX = re.compile(r"^(?:sha256:)?[0-9a-f]{6,64}$")


class Store:
    def __init__(
        self,
        root: str | None = None,
        *,
        transport: TransportOptions | None = None,
    ) -> None:
        self.root = os.path.abspath(root or default_root())
        self._transport = transport
        self.content = ContentStore(self.root)
        self.layer_dirs = LayerDirs(self.root)
        # threading.Lock is _thread.allocate_lock; importing threading costs ~1 ms that
        # only pull (which imports it anyway) would use.
        self._init_lock = _thread.allocate_lock()

    @property
    def transport(self) -> TransportOptions:
        """How pulls reach registries; the defaults unless given (made on first use: only
        pull asks)."""
        if self._transport is None:
            from ocistore.registry.options import TransportOptions

            self._transport = TransportOptions()
        return self._transport

    @transport.setter
    def transport(self, value: TransportOptions) -> None:
        self._transport = value

    # --- opening -------------------------------------------------------------------------
    @cached_property
    def metadata(self) -> Metadata:
        with self._init_lock:
            try:
                os.makedirs(self.root, exist_ok=True)
                self.content.init()
                self.layer_dirs.init()
                os.makedirs(os.path.join(self.root, "locks"), exist_ok=True)
                return Metadata(os.path.join(self.root, "metadata.db"))
            except OSError as exc:
                raise StorageError(f"cannot open store at {self.root}: {exc.strerror}") from None

    @cached_property
    def unpack_options(self) -> UnpackOptions:
        from ocistore.whiteouts import UnpackOptions, WhiteoutFormat, probe_whiteout_format

        stored = self.metadata.get_meta("whiteouts")
        if stored is None:
            probed = probe_whiteout_format(self.layer_dirs.dir)
            stored = self.metadata.set_meta_default("whiteouts", probed.value)
        privileged = os.geteuid() == 0
        return UnpackOptions(
            whiteouts=WhiteoutFormat(stored), same_owner=privileged, devices=privileged
        )

    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.root, "metadata.db"))

    def lock_path(self, digest: Digest) -> str:
        return os.path.join(self.root, "locks", f"{digest.algorithm}-{digest.hex}.lock")

    def _store_lock(self, *, shared: bool) -> AbstractContextManager[None]:
        self.metadata  # noqa: B018 - creates the root before locking in it
        return file_lock(os.path.join(self.root, "store.lock"), shared=shared)

    def shared(self) -> AbstractContextManager[None]:
        """Held by every pull for its whole run."""
        return self._store_lock(shared=True)

    def exclusive(self) -> AbstractContextManager[None]:
        """Held by what removes things (rmi, prune, fsck --repair): waits for pulls."""
        return self._store_lock(shared=False)

    def close(self) -> None:
        if "metadata" in self.__dict__:
            self.metadata.close()
            del self.__dict__["metadata"]

    # --- pulling -------------------------------------------------------------------------
    def pull(
        self,
        reference: str | Reference,
        *,
        platform: str | Platform | None = None,
        jobs: int = 3,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> PulledImage:
        from ocistore.platform import Platform

        ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
        plat = Platform.parse(platform) if isinstance(platform, str) else platform
        self.unpack_options  # noqa: B018 - probe before threads race to do it
        from ocistore.pull import Puller  # lazily: it brings in the HTTP stack

        with self._store_lock(shared=True):
            puller = Puller(self, platform=plat, jobs=jobs, progress=progress, cancel=cancel)
            return puller.pull(ref)

    # --- reading -------------------------------------------------------------------------
    def resolve(self, reference: str) -> ImageRecord:
        """The local image a user's reference names: a reference, or a digest prefix."""
        if not self.exists():
            raise ImageNotFoundError(f"no image {reference!r} in {self.root}", reference=reference)
        try:
            ref: Reference | None = Reference.parse(reference)
        except InvalidReferenceError:
            ref = None
        if ref is not None:
            record = self.metadata.image(ref.store_name)
            if record is not None:
                return record
        if _ID_PREFIX.match(reference):
            prefix = reference if reference.startswith("sha256:") else f"sha256:{reference}"
            matches = self.metadata.images_by_digest(prefix)
            if len({m.manifest_digest for m in matches}) == 1:
                return matches[0]
            if matches:
                raise InvalidReferenceError(
                    f"{reference!r} is ambiguous: it matches several images"
                )
        if ref is None:
            Reference.parse(reference)  # raise the parse error, it says what is wrong
        raise ImageNotFoundError(f"no image {reference!r} in the store", reference=reference)

    def images(self) -> list[ImageSummary]:
        from ocistore.results import ImageSummary

        if not self.exists():
            return []
        out = []
        for record in self.metadata.images():
            layers = self.metadata.image_layers(record.name)
            size = 0
            compressed = 0
            for layer in layers:
                info = self.metadata.layer(layer.diff_id)
                size += info.size if info else 0
                compressed += _blob_size(self.content, layer.blob_digest)
            created = None
            with contextlib.suppress(OSError, ValueError):
                created = self._config(record).get("created")
            out.append(
                ImageSummary(
                    record.name,
                    record.manifest_digest,
                    record.platform,
                    created if isinstance(created, str) else None,
                    size,
                    compressed,
                    len(layers),
                )
            )
        return out

    def _config(self, record: ImageRecord) -> dict[str, Any]:
        import json

        doc = json.loads(self.content.read(_digest(record.config_digest)))
        return doc if isinstance(doc, dict) else {}

    def inspect(self, reference: str) -> ImageInfo:
        import json

        from ocistore.results import ImageInfo, LayerInfo

        record = self.resolve(reference)
        manifest = json.loads(self.content.read(_digest(record.manifest_digest)))
        media_types = {
            str(entry.get("digest")): str(entry.get("mediaType", ""))
            for entry in manifest.get("layers", [])
        }
        layers = []
        for layer in self.metadata.image_layers(record.name):
            info = self.metadata.layer(layer.diff_id)
            layers.append(
                LayerInfo(
                    digest=layer.blob_digest,
                    media_type=media_types.get(layer.blob_digest, ""),
                    size=_blob_size(self.content, layer.blob_digest),
                    diff_id=layer.diff_id,
                    chain_id=layer.chain_id,
                    directory=self.layer_dirs.path(info.dir) if info else None,
                    unpacked_size=info.size if info else None,
                )
            )
        return ImageInfo(
            reference=record.name,
            manifest_digest=record.manifest_digest,
            manifest_media_type=record.manifest_type,
            index_digest=record.index_digest,
            platform=record.platform,
            config_digest=record.config_digest,
            config=self._config(record),
            layers=layers,
            pulled=record.pulled,
        )

    def image_by_digest(self, name: str, manifest_digest: str) -> ImageRecord:
        """The image ``name`` if it still is ``manifest_digest``, else any image that is."""
        record = self.metadata.image(name)
        if record is not None and record.manifest_digest == manifest_digest:
            return record
        for other in self.metadata.images_by_digest(manifest_digest):
            if other.manifest_digest == manifest_digest:
                return other
        raise ImageNotFoundError(
            f"the image {name} ({manifest_digest}) is no longer in the store", reference=name
        )

    # --- composing -----------------------------------------------------------------------
    def layer_views(self, reference: str) -> list[LayerView]:
        """The image's layer directories as the composer reads them, base first."""
        from ocistore.compose import LayerView
        from ocistore.whiteouts import WhiteoutFormat

        record = self.resolve(reference)
        views = []
        for layer in self.metadata.image_layers(record.name):
            info = self.metadata.layer(layer.diff_id)
            if info is None or not os.path.isdir(self.layer_dirs.path(info.dir)):
                raise ImageNotFoundError(
                    f"layer {layer.diff_id} of {record.name} is missing; pull it again",
                    reference=record.name,
                )
            views.append(
                LayerView(
                    self.layer_dirs.path(info.dir), WhiteoutFormat(info.whiteouts), info.opaque_root
                )
            )
        return views

    def tree(self, reference: str) -> ComposedTree:
        from ocistore.compose import ComposedTree

        return ComposedTree(self.layer_views(reference))

    def rootfs(self, reference: str, dest: str) -> None:
        """Materialise the image's composed tree into ``dest`` (new or empty)."""
        from ocistore.compose import materialize

        tree = self.tree(reference)
        if os.path.lexists(dest):
            if not os.path.isdir(dest) or os.path.islink(dest) or os.listdir(dest):
                raise UsageError(f"{dest} exists and is not an empty directory")
        else:
            os.mkdir(dest, 0o755)
        materialize(tree, dest)

    def export(self, reference: str, out: IO[bytes]) -> None:
        from ocistore.export import export_tar

        export_tar(self.tree(reference), out)

    @cached_property
    def containers(self) -> Containers:
        from ocistore.containers import Containers

        return Containers(self)

    def df(self) -> DiskUsage:
        """Space used, without the over-count of summing images that share layers."""
        from ocistore.results import DiskUsage, ImageUsage

        if not self.exists():
            return DiskUsage([], 0, 0, 0, 0, 0, [], [])
        users: dict[str, set[str]] = {}
        per_image: dict[str, list[str]] = {}
        for record in self.metadata.images():
            ids = [layer.diff_id for layer in self.metadata.image_layers(record.name)]
            per_image[record.name] = ids
            for diff_id in ids:
                users.setdefault(diff_id, set()).add(record.name)
        sizes = {layer.diff_id: layer.size for layer in self.metadata.layers()}
        images = []
        for name, ids in per_image.items():
            total = sum(sizes.get(d, 0) for d in set(ids))
            shared = sum(sizes.get(d, 0) for d in set(ids) if len(users[d]) > 1)
            images.append(ImageUsage(name, total, shared, total - shared))
        blobs = [self.content.size(d) for d in self.content.iter_blobs()]
        containers = [(c.name, c.size or 0) for c in self.containers.ps(all=True, sizes=True)]
        volumes = [
            (name, int(str(self.containers.volume_inspect(name)["size"])))
            for name, _, _ in self.containers.volume_ls()
        ]
        return DiskUsage(
            images=images,
            layers_total=sum(sizes.values()),
            layers_shared=sum(sizes[d] for d, u in users.items() if len(u) > 1 and d in sizes),
            layers_count=len(sizes),
            blobs_total=sum(blobs),
            blobs_count=len(blobs),
            containers=containers,
            volumes=volumes,
        )

    # --- maintenance ---------------------------------------------------------------------
    def prune(self) -> PruneReport:
        from ocistore.store.maintenance import prune

        return prune(self)

    def fsck(self, *, repair: bool = False) -> FsckReport:
        from ocistore.store.maintenance import fsck

        return fsck(self, repair=repair)

    # --- removing ------------------------------------------------------------------------
    def rmi(self, reference: str, *, force: bool = False) -> RemovedImage:
        """Remove a reference, then the blobs and layer directories nothing else uses.

        Refused while a container was made from it and no other name keeps its manifest,
        unless ``force`` (the container keeps its layers either way).
        """
        record = self.resolve(reference)
        users = [
            c.name
            for c in self.metadata.containers()
            if c.manifest_digest == record.manifest_digest
        ]
        others = [
            i
            for i in self.metadata.images_by_digest(record.manifest_digest)
            if i.name != record.name
        ]
        if users and not others and not force:
            raise InUseError(
                f"image {record.name} is used by container(s) {', '.join(users)}; "
                "remove them first or use rmi -f",
                reference=record.name,
            )
        with self._store_lock(shared=False):
            layers = self.metadata.image_layers(record.name)
            candidates = {record.manifest_digest, record.config_digest}
            if record.index_digest:
                candidates.add(record.index_digest)
            candidates.update(layer.blob_digest for layer in layers)
            diff_ids = {layer.diff_id for layer in layers}
            # The reference goes first: a crash after this leaves only garbage for prune,
            # never an image whose blobs are missing.
            self.content.remove_ref(record.name)
            self.metadata.remove_image(record.name)
            still_blobs, still_layers = self.metadata.referenced()
            removed_layers = []
            for diff_id in sorted(diff_ids - still_layers):
                info = self.metadata.layer(diff_id)
                self.metadata.remove_layer(diff_id)
                if info is not None:
                    self.layer_dirs.remove(self.layer_dirs.path(info.dir))
                    removed_layers.append(diff_id)
            removed_blobs = []
            for digest in sorted(candidates - still_blobs):
                self.content.delete(_digest(digest))
                removed_blobs.append(digest)
        from ocistore.results import RemovedImage

        return RemovedImage(record.name, removed_blobs, removed_layers)


def _blob_size(content: ContentStore, digest: str) -> int:
    try:
        return content.size(_digest(digest))
    except BlobNotFoundError:
        return 0


def _digest(text: str) -> Digest:
    """``Digest.parse``, imported on first use: resolving a name (create) needs none."""
    from ocistore.digest import Digest

    return Digest.parse(text)
