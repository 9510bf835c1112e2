"""The public, typed API: ``Store(root).pull("ubuntu:22.04")`` and friends.

A ``Store`` composes the content store (blobs, OCI layout), the layer directories and the
metadata database under one root. It never prints or exits; errors are ``ocistore.errors``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from ocistore.digest import Digest
from ocistore.errors import (
    BlobNotFoundError,
    ImageNotFoundError,
    InvalidReferenceError,
    StorageError,
)
from ocistore.fsutil import file_lock
from ocistore.platform import Platform
from ocistore.progress import ProgressFn
from ocistore.pull import PulledImage, Puller
from ocistore.reference import Reference
from ocistore.registry.transport import TransportOptions
from ocistore.store.content import ContentStore
from ocistore.store.layers import LayerDirs
from ocistore.store.metadata import ImageRecord, Metadata
from ocistore.unpack import UnpackOptions, WhiteoutFormat, probe_whiteout_format


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


@dataclass(frozen=True)
class LayerInfo:
    digest: str
    media_type: str
    size: int
    diff_id: str
    chain_id: str
    directory: str | None
    unpacked_size: int | None


@dataclass(frozen=True)
class ImageInfo:
    reference: str
    manifest_digest: str
    manifest_media_type: str
    index_digest: str | None
    platform: str
    config_digest: str
    config: dict[str, Any]
    layers: list[LayerInfo]
    pulled: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageSummary:
    reference: str
    manifest_digest: str
    platform: str
    created: str | None
    size: int  # unpacked bytes of all its layers
    compressed_size: int
    layers: int


@dataclass(frozen=True)
class RemovedImage:
    reference: str
    blobs: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)


_ID_PREFIX = re.compile(r"^(?:sha256:)?[0-9a-f]{6,64}$")


class Store:
    def __init__(
        self,
        root: str | None = None,
        *,
        transport: TransportOptions | None = None,
    ) -> None:
        self.root = os.path.abspath(root or default_root())
        self.transport = transport or TransportOptions()
        self.content = ContentStore(self.root)
        self.layer_dirs = LayerDirs(self.root)
        self._init_lock = threading.Lock()

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

    def _store_lock(self, *, shared: bool) -> Any:
        self.metadata  # noqa: B018 - creates the root before locking in it
        return file_lock(os.path.join(self.root, "store.lock"), shared=shared)

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
        ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
        plat = Platform.parse(platform) if isinstance(platform, str) else platform
        self.unpack_options  # noqa: B018 - probe before threads race to do it
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
        doc = json.loads(self.content.read(Digest.parse(record.config_digest)))
        return doc if isinstance(doc, dict) else {}

    def inspect(self, reference: str) -> ImageInfo:
        record = self.resolve(reference)
        manifest = json.loads(self.content.read(Digest.parse(record.manifest_digest)))
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

    # --- removing ------------------------------------------------------------------------
    def rmi(self, reference: str) -> RemovedImage:
        """Remove a reference, then the blobs and layer directories nothing else uses."""
        record = self.resolve(reference)
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
                self.content.delete(Digest.parse(digest))
                removed_blobs.append(digest)
        return RemovedImage(record.name, removed_blobs, removed_layers)


def _blob_size(content: ContentStore, digest: str) -> int:
    try:
        return content.size(Digest.parse(digest))
    except BlobNotFoundError:
        return 0
