"""The content store: blobs named by digest, kept as an OCI image layout.

``ROOT/oci-layout``, ``ROOT/index.json`` and ``ROOT/blobs/<alg>/<hex>`` make the root a valid
OCI image layout, so skopeo (``oci:ROOT:NAME``) and umoci (``--image ROOT:NAME``) read it.
A blob is written to ``ROOT/ingest/``, hashed as it is written, checked against its size
and digest, fsynced and only then renamed into ``blobs/``: a blob that is visible is whole
and verified. This module knows nothing of registries, layers or filesystems in blobs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, TYPE_CHECKING, Any

from ocistore import mediatypes as mt
from ocistore.errors import BlobNotFoundError, DigestMismatchError, SizeMismatchError
from ocistore.fsutil import atomic_write, file_lock, fsync_dir

if TYPE_CHECKING:
    from ocistore.digest import Digest
    from ocistore.model import Descriptor

# json and Digest are imported where used: create, for one, reads no blob and writes no
# layout file.

_INDEX_LOCK = "index.lock"


def resumable_name(digest: Digest) -> str:
    """The ingest file of a download that may be resumed by a later process."""
    return f"{digest.algorithm}-{digest.hex}.partial"


class BlobWriter:
    """A blob being ingested. ``commit()`` verifies and publishes it; ``abort()`` drops it;
    ``keep()`` leaves a resumable download's bytes for the next attempt.

    A resumable writer (the caller holds a lock on the digest) continues the bytes an
    interrupted download left in ``ingest/``: ``resumed`` says how many, and they are
    hashed again here so that the final digest check covers them too.
    """

    def __init__(
        self, store: ContentStore, digest: Digest, size: int | None, *, resumable: bool = False
    ) -> None:
        self._store = store
        self.digest = digest
        self.expected_size = size
        self._hash = digest.hasher()
        self.written = 0
        self.resumed = 0
        if resumable:
            self.path = os.path.join(store.ingest_dir, resumable_name(digest))
            self._file: IO[bytes] = open(self.path, "a+b")  # noqa: SIM115 - closed by commit/abort/keep
            have = os.fstat(self._file.fileno()).st_size
            if size is not None and have > size:
                self._file.truncate(0)  # not a prefix of this blob: start again
                have = 0
            self._file.seek(0)
            while chunk := self._file.read(1 << 20):
                self._hash.update(chunk)
            self.written = self.resumed = have
        else:
            self.path = os.path.join(
                store.ingest_dir,
                f"{digest.algorithm}-{digest.hex}.{os.urandom(4).hex()}.partial",
            )
            self._file = open(self.path, "xb")  # noqa: SIM115 - closed by commit/abort
        self._keep = False

    def replay(self) -> IO[bytes]:
        """The bytes a previous attempt left, to feed the unpacker before the network's."""
        return open(self.path, "rb")

    def flush(self) -> None:
        """Make what was written readable through :meth:`replay`."""
        self._file.flush()

    def keep(self) -> None:
        """Keep what was written (flushed, fsynced) for the next attempt to resume."""
        with suppress(OSError):
            self._file.flush()
            os.fsync(self._file.fileno())
        self._keep = True

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.written += len(data)

    def verify(self) -> None:
        """Raise unless what was written has the expected size and digest."""
        try:
            self._check()
        except BaseException:
            self.abort()
            raise

    def _check(self) -> None:
        if self.expected_size is not None and self.written != self.expected_size:
            raise SizeMismatchError(
                f"blob has {self.written} bytes, its descriptor says {self.expected_size}",
                digest=str(self.digest),
            )
        actual = self._hash.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatchError(
                f"content does not match digest {self.digest} "
                f"(got {self.digest.algorithm}:{actual})",
                digest=str(self.digest),
            )

    def commit(self) -> str:
        """Verify size and digest, fsync, and rename into place; returns the blob's path."""
        try:
            self._check()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            final = self._store.blob_path(self.digest)
            os.chmod(self.path, 0o444)
            os.rename(self.path, final)
            fsync_dir(os.path.dirname(final))
            return final
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self._keep:
            with suppress(OSError):
                self._file.close()
            return
        # close() flushes what is still buffered; on a full disk that fails again (ENOSPC)
        # after the descriptor is closed. The partial file must go all the same: without
        # the suppress, the error skipped the unlink and left it in ingest/.
        with suppress(OSError):
            if not self._file.closed:
                self._file.close()
        with suppress(FileNotFoundError):
            os.unlink(self.path)


class ContentStore:
    def __init__(self, root: str) -> None:
        self.root = root
        self.blobs_dir = os.path.join(root, "blobs")
        self.ingest_dir = os.path.join(root, "ingest")

    def init(self) -> None:
        os.makedirs(os.path.join(self.blobs_dir, "sha256"), exist_ok=True)
        os.makedirs(self.ingest_dir, exist_ok=True)
        layout = os.path.join(self.root, "oci-layout")
        if not os.path.exists(layout):
            import json

            atomic_write(layout, json.dumps({"imageLayoutVersion": mt.OCI_LAYOUT_VERSION}).encode())
        index = os.path.join(self.root, "index.json")
        if not os.path.exists(index):
            self._write_index({"schemaVersion": 2, "manifests": []})

    # --- blobs ---------------------------------------------------------------------------
    def blob_path(self, digest: Digest) -> str:
        directory = os.path.join(self.blobs_dir, digest.algorithm)
        return os.path.join(directory, digest.hex)

    def has(self, digest: Digest) -> bool:
        return os.path.exists(self.blob_path(digest))

    def size(self, digest: Digest) -> int:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            raise BlobNotFoundError(
                f"blob {digest} is not in the store", digest=str(digest)
            ) from None

    def open(self, digest: Digest) -> IO[bytes]:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise BlobNotFoundError(
                f"blob {digest} is not in the store", digest=str(digest)
            ) from None

    def read(self, digest: Digest) -> bytes:
        with self.open(digest) as f:
            return f.read()

    @contextmanager
    def writer(
        self, digest: Digest, size: int | None, *, resumable: bool = False
    ) -> Iterator[BlobWriter]:
        """Ingest a blob; it becomes visible only if the block ends after ``commit()``."""
        os.makedirs(os.path.join(self.blobs_dir, digest.algorithm), exist_ok=True)
        writer = BlobWriter(self, digest, size, resumable=resumable)
        try:
            yield writer
        finally:
            writer.abort()  # no-op after a successful commit: the partial file is gone

    def ingest_temp(self) -> tuple[int, str]:
        """A new temp file in ``ingest/`` (same filesystem as ``blobs/``): (fd, path)."""
        import tempfile

        return tempfile.mkstemp(dir=self.ingest_dir, prefix="local-", suffix=".partial")

    def adopt(self, path: str, digest: Digest) -> None:
        """Publish a file this process wrote into ``ingest/`` and hashed while writing:
        re-verified (it is read once more, but locally made blobs are small next to the
        cost of a wrong one), fsynced, made read-only and renamed into place."""
        h = digest.hasher()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
            os.fsync(f.fileno())
        if h.hexdigest() != digest.hex:
            os.unlink(path)
            raise DigestMismatchError(f"local blob does not match {digest}", digest=str(digest))
        final = self.blob_path(digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.chmod(path, 0o444)
        os.rename(path, final)
        fsync_dir(os.path.dirname(final))

    def put(self, data: bytes, digest: Digest | None = None) -> Digest:
        """Store small content (manifests, configs); idempotent."""
        if digest is None:
            from ocistore.digest import Digest

            digest = Digest.of(data)
        if self.has(digest):
            return digest
        with self.writer(digest, len(data)) as w:
            w.write(data)
            w.commit()
        return digest

    def delete(self, digest: Digest) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self.blob_path(digest))

    def iter_blobs(self) -> Iterator[Digest]:
        from ocistore.digest import Digest

        for algorithm in sorted(os.listdir(self.blobs_dir)):
            for name in sorted(os.listdir(os.path.join(self.blobs_dir, algorithm))):
                yield Digest(algorithm, name)

    # --- index.json (the layout's references) --------------------------------------------
    def _index_path(self) -> str:
        return os.path.join(self.root, "index.json")

    def read_index(self) -> dict[str, Any]:
        import json

        with open(self._index_path(), "rb") as f:
            doc: dict[str, Any] = json.load(f)
        return doc

    def _write_index(self, doc: dict[str, Any]) -> None:
        import json

        atomic_write(self._index_path(), json.dumps(doc, indent=1).encode() + b"\n")

    def set_ref(self, name: str, descriptor: Descriptor) -> None:
        """Point ``name`` (the ref.name annotation) at ``descriptor``, replacing any old one."""
        entry = descriptor.to_json()
        entry.setdefault("annotations", {})[mt.ANNOTATION_REF_NAME] = name
        with file_lock(os.path.join(self.root, _INDEX_LOCK)):
            doc = self.read_index()
            manifests = [m for m in doc.get("manifests", []) if _ref_name(m) != name]
            manifests.append(entry)
            doc["manifests"] = sorted(manifests, key=lambda m: _ref_name(m) or "")
            self._write_index(doc)

    def remove_ref(self, name: str) -> None:
        with file_lock(os.path.join(self.root, _INDEX_LOCK)):
            doc = self.read_index()
            doc["manifests"] = [m for m in doc.get("manifests", []) if _ref_name(m) != name]
            self._write_index(doc)


def _ref_name(entry: Any) -> str | None:
    annotations = entry.get("annotations") if isinstance(entry, dict) else None
    if isinstance(annotations, dict):
        value = annotations.get(mt.ANNOTATION_REF_NAME)
        return value if isinstance(value, str) else None
    return None
