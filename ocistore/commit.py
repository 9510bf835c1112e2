"""Turning a container's writable layer into a new image, stored like any pulled one.

The snapshot driver writes the changes as an uncompressed OCI layer tar; here it is hashed
(its diffID), gzip-compressed into the content store, unpacked into a layer directory by
the same ingestion path a pull uses, and a new config (diffID and history appended) and
OCI manifest are written on top of the base image's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

from ocistore import mediatypes as mt
from ocistore.compression import GzipWriter
from ocistore.digest import Digest
from ocistore.ingest import LayerIngester
from ocistore.model import Descriptor, Manifest, chain_ids, parse_config, parse_manifest
from ocistore.platform import Platform
from ocistore.reference import Reference
from ocistore.store.metadata import ImageLayer, ImageRecord

if TYPE_CHECKING:
    from ocistore.api import Store

# Docker's layer types are the same bytes as OCI's; an OCI manifest names them the OCI way
# so that OCI-only readers (umoci) accept the committed image.
_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_AS_OCI = {
    f"{_DOCKER_LAYER}.gzip": f"{_OCI_LAYER}+gzip",
    _DOCKER_LAYER: _OCI_LAYER,
    f"{_DOCKER_LAYER}.zstd": f"{_OCI_LAYER}+zstd",
}


def commit_image(
    store: Store,
    base: ImageRecord,
    write_changes: Callable[[IO[bytes]], None],
    new_reference: str,
    *,
    comment: str = "",
) -> ImageRecord:
    """Create ``new_reference`` = ``base`` + one layer holding what ``write_changes`` writes."""
    ref = Reference.parse(new_reference)
    content = store.content
    gz_fd, gz_path = content.ingest_temp()
    try:
        # The changes go through a pipeline: hashed (their diffID) on this thread,
        # compressed on the gzip writer's own, hashed again (the blob digest) as they reach
        # the file. Nothing uncompressed touches the disk.
        with os.fdopen(gz_fd, "wb") as gz:
            blob = _Hashed(gz)
            with GzipWriter(blob) as compressed:
                changes = _Hashed(compressed)
                write_changes(cast("IO[bytes]", changes))
        diff_id = Digest("sha256", changes.hash.hexdigest())
        layer = Descriptor(f"{_OCI_LAYER}+gzip", Digest("sha256", blob.hash.hexdigest()), blob.size)
        if not content.has(layer.digest):
            content.adopt(gz_path, layer.digest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(gz_path)
    LayerIngester(store, emit=lambda event: None, cancel=threading.Event()).ensure(
        layer, diff_id, None
    )

    manifest = parse_manifest(content.read(Digest.parse(base.manifest_digest)), base.manifest_type)
    assert isinstance(manifest, Manifest)
    config_doc: dict[str, Any] = json.loads(content.read(Digest.parse(base.config_digest)))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config_doc = dict(config_doc)
    rootfs = dict(config_doc.get("rootfs") or {})
    rootfs["type"] = "layers"
    rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), str(diff_id)]
    config_doc["rootfs"] = rootfs
    history = list(config_doc.get("history") or [])
    entry: dict[str, Any] = {"created": now, "created_by": "ocistore commit"}
    if comment:
        entry["comment"] = comment
    history.append(entry)
    config_doc["history"] = history
    config_doc["created"] = now
    config_bytes = json.dumps(config_doc, separators=(",", ":"), sort_keys=True).encode()
    config_digest = content.put(config_bytes)
    config = parse_config(config_bytes)

    layers = [
        Descriptor(_AS_OCI.get(d.media_type, d.media_type), d.digest, d.size)
        for d in manifest.layers
    ] + [layer]
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {
            "mediaType": mt.OCI_CONFIG,
            "digest": str(config_digest),
            "size": len(config_bytes),
        },
        "layers": [d.to_json() for d in layers],
    }
    manifest_bytes = json.dumps(manifest_doc, separators=(",", ":")).encode()
    manifest_digest = content.put(manifest_bytes)
    record = ImageRecord(
        name=ref.store_name,
        manifest_digest=str(manifest_digest),
        manifest_type=mt.OCI_MANIFEST,
        manifest_size=len(manifest_bytes),
        index_digest=None,
        config_digest=str(config_digest),
        platform=base.platform,
        pulled=time.time(),
    )
    chains = chain_ids(config.diff_ids)
    store.metadata.put_image(
        record,
        [
            ImageLayer(i, str(desc.digest), str(d), str(c))
            for i, (desc, d, c) in enumerate(zip(layers, config.diff_ids, chains, strict=True))
        ],
    )

    content.set_ref(
        record.name,
        Descriptor(
            mt.OCI_MANIFEST, manifest_digest, len(manifest_bytes), Platform.parse(base.platform)
        ),
    )
    return record


class _Hashed:
    """Writes through to ``out``, hashing and counting what goes by (only ``write`` and
    ``flush``: what the tar writer and the gzip writer call)."""

    def __init__(self, out: _Sink) -> None:
        self._out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        n = self._out.write(data)
        self.size += n
        return n

    def flush(self) -> None:
        flush = getattr(self._out, "flush", None)  # a GzipWriter has none: blocks are whole
        if flush is not None:
            flush()


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...
