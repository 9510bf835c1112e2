"""Pulling: the one place the registry client, content store and layer store meet.

resolve the reference -> pick the platform's manifest -> fetch and verify the config ->
for each layer, concurrently: stream the blob once, hashing and writing it to the content
store while it is decompressed, hashed again (diffID) and unpacked into a new layer
directory -> publish blob and directory only when both digests match -> record the image.
Layers and blobs already present are skipped, so a second pull downloads no blob.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, NamedTuple

import requests

from ocistore import mediatypes as mt
from ocistore.digest import Digest, VerifyingReader
from ocistore.errors import (
    Interrupted,
    ManifestInvalidError,
    PlatformNotFoundError,
    SizeMismatchError,
    StorageError,
    UnsupportedMediaTypeError,
)
from ocistore.ingest import LayerIngester, short_digest
from ocistore.model import (
    MAX_CONFIG_BYTES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    chain_ids,
    parse_config,
    parse_manifest,
)
from ocistore.platform import Platform, choose
from ocistore.progress import ProgressFn, PullEvent
from ocistore.reference import Reference
from ocistore.registry.client import RegistryClient
from ocistore.store.metadata import ImageLayer, ImageRecord

if TYPE_CHECKING:
    from ocistore.api import Store

_CHUNK = 1 << 20


class PulledImage(NamedTuple):
    name: str
    manifest_digest: Digest
    index_digest: Digest | None
    platform: Platform
    layers_fetched: int
    bytes_fetched: int
    layers: list[str]


class Puller:
    def __init__(
        self,
        store: Store,
        *,
        platform: Platform | None,
        jobs: int,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
        client_factory: Callable[[Reference], RegistryClient] | None = None,
    ) -> None:
        self.store = store
        self.platform = platform
        self.jobs = max(1, jobs)
        self._emit = progress or (lambda event: None)
        self.cancel = cancel or threading.Event()
        self._client_factory = client_factory or (
            lambda ref: RegistryClient.for_reference(ref, options=store.transport)
        )
        self._stats_lock = threading.Lock()
        self._ingester = LayerIngester(store, emit=self._emit, cancel=self.cancel)
        self.layers_fetched = 0
        self.bytes_fetched = 0

    # --- resolution ----------------------------------------------------------------------
    def pull(self, ref: Reference) -> PulledImage:
        client = self._client_factory(ref)
        try:
            return self._pull(ref, client)
        except OSError as exc:
            # A failure of the store (disk full, permissions, read-only filesystem) from a
            # blob write, an unpack or a rename: the library raises OcistoreErrors only, so
            # this becomes a StorageError (exit 8) saying where, not a bare OSError.
            if isinstance(exc, requests.RequestException):
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            raise StorageError(
                f"cannot write to the store at {self.store.root}: {exc.strerror or exc}{where}",
                reference=str(ref),
            ) from exc
        except sqlite3.Error as exc:
            # sqlite reports a full disk as "database or disk is full" (not an OSError).
            raise StorageError(
                f"the store's metadata at {self.store.root} failed: {exc}", reference=str(ref)
            ) from exc
        finally:
            client.close()

    def _pull(self, ref: Reference, client: RegistryClient) -> PulledImage:
        self._emit(PullEvent("resolving", message=str(ref)))
        fetched = client.get_manifest(ref)
        doc = parse_manifest(fetched.data, fetched.content_type)
        index_digest: Digest | None = None
        index_data: bytes | None = None
        platform = self.platform
        manifest_data, manifest_digest, manifest_type = fetched.data, fetched.digest, ""
        if isinstance(doc, Index):
            index_digest, index_data = fetched.digest, fetched.data
            entry = self._choose(ref, doc)
            platform = entry.platform
            child = client.get_manifest(ref.with_digest(entry.digest))
            if len(child.data) != entry.size:
                raise SizeMismatchError(
                    f"manifest {entry.digest} has {len(child.data)} bytes, the index says "
                    f"{entry.size}",
                    reference=str(ref),
                    digest=str(entry.digest),
                )
            doc = parse_manifest(child.data, child.content_type)
            if not isinstance(doc, Manifest):
                raise ManifestInvalidError(
                    f"index entry {entry.digest} is not an image manifest", reference=str(ref)
                )
            manifest_data, manifest_digest = child.data, child.digest
        assert isinstance(doc, Manifest)
        manifest_type = doc.media_type
        self._emit(PullEvent("resolved", message=str(manifest_digest)))

        for layer in doc.layers:
            if layer.media_type not in mt.LAYER_COMPRESSION:
                raise UnsupportedMediaTypeError(
                    f"layer {layer.digest} has unsupported media type {layer.media_type!r}",
                    reference=str(ref),
                    digest=str(layer.digest),
                )
        config = self._config(ref, client, doc.config)
        if platform is None:
            platform = config.platform
            if self.platform is not None and (
                platform.os,
                platform.architecture,
            ) != (self.platform.os, self.platform.architecture):
                raise PlatformNotFoundError(
                    f"{ref} is a single-platform image for {platform}, not {self.platform}",
                    reference=str(ref),
                )
        if len(config.diff_ids) != len(doc.layers):
            raise ManifestInvalidError(
                f"manifest has {len(doc.layers)} layers but its config lists "
                f"{len(config.diff_ids)} diffIDs",
                reference=str(ref),
            )
        self._fetch_layers(ref, client, doc.layers, config.diff_ids)

        # Only now, with every blob and layer in place, does the image become visible.
        content = self.store.content
        if index_data is not None and index_digest is not None:
            content.put(index_data, index_digest)
        content.put(manifest_data, manifest_digest)
        name = ref.store_name
        chains = chain_ids(config.diff_ids)
        # The metadata row is the commit point; index.json (the OCI layout's view) follows.
        # Killed in between, fsck calls the missing entry a leftover, and the next pull of
        # this image (or fsck --repair) writes it.
        self.store.metadata.put_image(
            ImageRecord(
                name=name,
                manifest_digest=str(manifest_digest),
                manifest_type=manifest_type,
                manifest_size=len(manifest_data),
                index_digest=str(index_digest) if index_digest else None,
                config_digest=str(doc.config.digest),
                platform=str(platform),
                pulled=time.time(),
            ),
            [
                ImageLayer(i, str(layer.digest), str(diff_id), str(chain))
                for i, (layer, diff_id, chain) in enumerate(
                    zip(doc.layers, config.diff_ids, chains, strict=True)
                )
            ],
        )
        content.set_ref(
            name, Descriptor(manifest_type, manifest_digest, len(manifest_data), platform)
        )
        self._emit(PullEvent("done", message=str(manifest_digest)))
        return PulledImage(
            name=name,
            manifest_digest=manifest_digest,
            index_digest=index_digest,
            platform=platform,
            layers_fetched=self.layers_fetched,
            bytes_fetched=self.bytes_fetched,
            layers=[str(d) for d in config.diff_ids],
        )

    def _choose(self, ref: Reference, index: Index) -> Descriptor:
        wanted = self.platform or Platform.host()
        entries = [
            d
            for d in index.manifests
            if d.platform is not None
            and d.platform.os != "unknown"
            and d.media_type in ("", *mt.MANIFEST_TYPES)
        ]
        pick = choose(wanted, [d.platform for d in entries if d.platform is not None])
        if pick is None:
            available = ", ".join(sorted({str(d.platform) for d in entries})) or "none"
            raise PlatformNotFoundError(
                f"{ref} has no image for {wanted}; available: {available}", reference=str(ref)
            )
        return entries[pick]

    def _config(self, ref: Reference, client: RegistryClient, desc: Descriptor) -> ImageConfig:
        content = self.store.content
        if desc.size > MAX_CONFIG_BYTES:
            raise ManifestInvalidError(
                f"config {desc.digest} is {desc.size} bytes, over the limit", reference=str(ref)
            )
        if not content.has(desc.digest):
            with client.open_blob(ref.repository, desc.digest) as (stream, _):
                reader = VerifyingReader(stream, desc.digest, desc.size)
                chunks = []
                while chunk := reader.read(_CHUNK):
                    chunks.append(chunk)
            content.put(b"".join(chunks), desc.digest)
        return parse_config(content.read(desc.digest))

    # --- layers --------------------------------------------------------------------------
    def _fetch_layers(
        self,
        ref: Reference,
        client: RegistryClient,
        layers: list[Descriptor],
        diff_ids: list[Digest],
    ) -> None:
        for layer in layers:
            self._emit(PullEvent("waiting", short_digest(layer.digest), 0, layer.size))
        futures: list[Future[None]] = []
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="ocistore-layer") as pool:
            try:
                # Submitting is inside the try: a Ctrl-C while starting the workers (busy
                # downloading already) must cancel them too.
                for layer, diff_id in zip(layers, diff_ids, strict=True):
                    futures.append(pool.submit(self._ensure_layer, ref, client, layer, diff_id))
                self._wait_layers(futures)
            except BaseException:  # Ctrl-C in this thread
                self.cancel.set()
                raise
            finally:
                # Stopping (a layer failed, Ctrl-C, the caller's cancel): the workers remove
                # their partial blob and temp directory before the pool's exit returns. One
                # blocked reading a stalled or trickling registry held that (and Ctrl-C) up
                # until its read timeout, or for good when bytes kept trickling in: wake it
                # by shutting its connection down, again until every worker is done.
                if self.cancel.is_set():
                    for f in futures:
                        f.cancel()
                    while not all(f.done() for f in futures):
                        self._ingester.abort_reads()
                        wait(futures, timeout=0.1)
        errors = [exc for f in futures if not f.cancelled() and (exc := f.exception()) is not None]
        # The layers stopped because another failed report Interrupted: the cause is the
        # first error that is not that.
        for exc in errors:
            if not isinstance(exc, Interrupted):
                raise exc
        if errors:
            raise errors[0]
        if any(f.cancelled() for f in futures):  # cancelled before they started
            raise Interrupted("pull interrupted", reference=str(ref))

    def _wait_layers(self, futures: list[Future[None]]) -> None:
        """Return once every layer is done, one failed, or the pull was cancelled (polled:
        the caller may set ``cancel`` from another thread)."""
        while True:
            done, pending = wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION)
            if not pending:
                return
            if self.cancel.is_set() or any(
                not f.cancelled() and f.exception() is not None for f in done
            ):
                self.cancel.set()  # stop the other layers early
                return

    def _ensure_layer(
        self, ref: Reference, client: RegistryClient, desc: Descriptor, diff_id: Digest
    ) -> None:
        fetched = self._ingester.ensure(
            desc,
            diff_id,
            lambda offset: client.open_blob(ref.repository, desc.digest, offset=offset),
        )
        if fetched:
            with self._stats_lock:
                self.layers_fetched += 1
                self.bytes_fetched += fetched
