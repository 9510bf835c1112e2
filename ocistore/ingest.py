"""Layer ingestion: one pass over a layer blob writes it to the content store, decompresses
it, hashes the uncompressed stream (the diffID) and unpacks it into a new layer directory.

Used by pull (blobs from a registry) and by commit (a blob just written locally). Nothing
becomes visible before both digests matched: the blob is published first, then the layer's
metadata row, then its directory is renamed into place, so every crash point leaves
something a later run completes or a prune removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from ocistore import mediatypes as mt
from ocistore.compression import decompressing_reader
from ocistore.digest import Digest, VerifyingReader
from ocistore.errors import (
    BlobNotFoundError,
    ContentError,
    DiffIDMismatchError,
    Interrupted,
    NetworkError,
    RegistryError,
    SizeMismatchError,
)
from ocistore.fsutil import file_lock, syncfs
from ocistore.model import Descriptor
from ocistore.progress import ProgressFn, PullEvent
from ocistore.store.content import BlobWriter
from ocistore.store.metadata import LayerRecord
from ocistore.unpack import UnpackResult, unpack_layer

if TYPE_CHECKING:
    from ocistore.api import Store

_CHUNK = 1 << 20


def unpack_slots() -> int:
    """How many layers may unpack at once: the tar reader is Python, bound by the GIL, and
    each one also keeps an inflate thread busy. Two unpacks on two cores fight over the GIL
    and the CPU: a 2-layer image of 77k small files pulled 40% slower than one at a time."""
    return max(1, (os.cpu_count() or 1) // 2)


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Tee:
    """Reads the registry's stream, writes every byte to the ingest file, reports progress,
    refuses more bytes than the descriptor declared, and honours cancellation."""

    def __init__(
        self,
        source: _Readable,
        sink: Callable[[bytes], None] | None,
        descriptor: Descriptor,
        on_bytes: Callable[[int], None],
        cancel: threading.Event,
        already_written: int = 0,
        *,
        start: int = 0,
    ) -> None:
        self._source = source
        self._sink = sink
        self._unsunk = already_written  # a resumed download's first bytes are on disk
        self._limit = descriptor.size
        self._digest = descriptor.digest
        self._on_bytes = on_bytes
        self._cancel = cancel
        self.count = start  # bytes before this stream's first (already in the file)

    def read(self, n: int = -1, /) -> bytes:
        if self._cancel.is_set():
            raise Interrupted("pull interrupted")
        data = self._source.read(_CHUNK if n < 0 else n)
        if data:
            self.count += len(data)
            if self.count > self._limit:
                raise SizeMismatchError(
                    f"blob is larger than the {self._limit} bytes its descriptor says",
                    digest=str(self._digest),
                )
            if self._sink is not None:
                if self._unsunk:
                    skip = min(self._unsunk, len(data))
                    self._unsunk -= skip
                    if skip < len(data):
                        self._sink(data[skip:])
                else:
                    self._sink(data)
            self._on_bytes(self.count)
        return data


class _Chain:
    """The first ``length`` bytes of ``head``, then ``tail``."""

    def __init__(self, head: _Readable, length: int, tail: _Readable) -> None:
        self._head = head
        self._left = length
        self._tail = tail

    def read(self, n: int = -1, /) -> bytes:
        if self._left > 0:
            data = self._head.read(min(self._left, _CHUNK if n < 0 else n))
            if data:
                self._left -= len(data)
                return data
            self._left = 0  # the kept file shrank under us: the digest check will say so
        return self._tail.read(n)


class _Prefetch:
    """Runs ``source`` (network read, blob write and hash, inflate) on its own thread, a
    few chunks ahead of the tar reader: zlib/ISA-L, hashlib and file writes release the
    GIL, so download, decompression and file creation use both cores. The queue is
    bounded, so memory is too; an error on either side stops both."""

    _DEPTH = 8  # chunks of up to 1 MiB in flight

    def __init__(
        self, source: _Readable, on_take: Callable[[int, bool], None] | None = None
    ) -> None:
        self._source = source
        # Called by the reader with each chunk's size, and whether the producer is done:
        # what is left is in the queue.
        self._on_take = on_take
        self._produced_all = False
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(self._DEPTH)
        self._stop = threading.Event()
        self._data = b""  # the chunk being served, from _off on
        self._off = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, name="ocistore-inflate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(_CHUNK)
                if not data:
                    self._produced_all = True  # before the end is queued: the reader sees it
                    self._put(data)
                    return
                self._put(data)
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1, /) -> bytes:
        if self._off >= len(self._data):
            if self._done:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            self._data, self._off = item, 0
            if self._on_take is not None:
                self._on_take(len(item), self._produced_all)
        return _serve(self, n)

    def close(self) -> None:
        """Stop the producer (also when the reader gave up early) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self._thread.join()


class _Writeback:
    """Flushes a layer directory to disk while it is still being unpacked: each time
    another ``EVERY`` bytes went by, a helper thread calls syncfs. The syncfs that makes the
    finished layer durable (LayerDirs.make_durable) then has only the tail left to write,
    instead of the whole layer after the last byte. Near the end of the blob the step is
    shorter, so that tail is a few MiB whatever the layer's size.

    Once the inflate thread is done, every chunk the unpacker takes starts a syncfs (one at
    a time): a core is free then, and a layer's last megabytes can be thousands of small
    files (a Debian tree ends with /var/lib/dpkg/info: 3.2k of its 6.7k entries in the
    last 15 MiB), which byte counts never reach but which the final syncfs would have to
    write while nothing else runs."""

    EVERY = 32 << 20
    EVERY_NEAR_END = 8 << 20
    NEAR_END = 0.85  # of the compressed blob read

    def __init__(self, path: str, fraction_read: Callable[[], float]) -> None:
        self._path = path
        self._fraction_read = fraction_read
        self._due = threading.Event()
        self._stopping = False
        self._seen = 0
        self._last = 0
        self._thread = threading.Thread(target=self._run, name="ocistore-writeback", daemon=True)
        self._thread.start()

    def note(self, nbytes: int, produced_all: bool) -> None:
        self._seen += nbytes
        since = self._seen - self._last
        if (
            produced_all
            or since >= self.EVERY
            or (since >= self.EVERY_NEAR_END and self._fraction_read() >= self.NEAR_END)
        ):
            self._last = self._seen
            self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            # Clear, then look: the other order could clear stop()'s wake-up after seeing
            # _stopping still False, and then wait for good while stop() joins.
            self._due.clear()
            if self._stopping:
                return
            with contextlib.suppress(OSError):  # only a head start: make_durable decides
                syncfs(self._path)

    def stop(self) -> None:
        self._stopping = True
        self._due.set()
        self._thread.join()


class _Hashing:
    """Hashes what passes through, in big chunks, while serving the tar reader's small reads."""

    def __init__(self, source: _Readable) -> None:
        self._source = source
        self._hash = hashlib.sha256()
        self._data = b""  # the chunk being served, from _off on
        self._off = 0
        self._eof = False

    def read(self, n: int = -1, /) -> bytes:
        if self._off >= len(self._data) and not self._eof:
            data = self._source.read(_CHUNK)
            if data:
                self._hash.update(data)
            else:
                self._eof = True
            self._data, self._off = data, 0
        return _serve(self, n)

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    @property
    def digest(self) -> Digest:
        return Digest("sha256", self._hash.hexdigest())


class _Served(Protocol):
    _data: bytes
    _off: int


def _serve(reader: _Served, n: int) -> bytes:
    """Up to ``n`` bytes of ``reader``'s current chunk: the chunk itself when all of it is
    asked for (no copy: these are megabytes per call), else a slice."""
    data, off = reader._data, reader._off
    if off == 0 and (n < 0 or n >= len(data)):
        reader._off = len(data)
        return data
    end = len(data) if n < 0 else min(off + n, len(data))
    reader._off = end
    return data[off:end]


def _drain(stream: _Readable) -> None:
    while stream.read(_CHUNK):
        pass


# Opens the blob at its registry from a byte offset: yields (stream, offset it starts at).
OpenRemote = Callable[[int], AbstractContextManager[tuple[_Readable, int]]]

MAX_ATTEMPTS_WITHOUT_PROGRESS = 5


class ResumingReader:
    """A blob stream that survives dropped connections: it reopens the blob with a Range
    from the bytes already received, or from 0 when the server ignores Range (skipping
    what was already passed on). Only attempts that got no byte further count against the
    budget, so a link that drops every few MiB still completes a large layer; the digest
    check at the end is what guarantees the joined bytes."""

    def __init__(
        self,
        open_at: OpenRemote,
        descriptor: Descriptor,
        *,
        sleep: Callable[[float], None] = time.sleep,
        cancel: threading.Event | None = None,
        start: int = 0,
    ) -> None:
        self._open_at = open_at
        self._size = descriptor.size
        self._digest = descriptor.digest
        self._sleep = sleep
        self._cancel = cancel
        self._stack: contextlib.ExitStack | None = None
        self._stream: _Readable | None = None
        self.position = start
        self.reconnects = 0

    def read(self, n: int = -1, /) -> bytes:
        if self.position >= self._size and self._stream is None:
            return b""  # a kept partial already holds every byte: nothing to ask for
        failures = 0
        while True:
            try:
                if self._stream is None:
                    self._connect()
                assert self._stream is not None
                data = self._stream.read(n)
                if not data and self.position < self._size:
                    raise NetworkError(
                        f"blob {self._digest} ended after {self.position} of {self._size} bytes",
                        digest=str(self._digest),
                    )
                self.position += len(data)
                return data
            except RegistryError:
                # An HTTP answer (a 5xx or 429 the client already retried MAX_ATTEMPTS times
                # with backoff, or an unexpected status), not a broken link: retrying it
                # here too would multiply the attempts (5 x 5 requests for a dead registry).
                self.close()
                raise
            except NetworkError as exc:
                self.close()
                failures += 1
                if self._cancel is not None and self._cancel.is_set():
                    # Most likely abort() broke the connection on purpose: that is the
                    # interruption, not a network failure.
                    raise Interrupted("pull interrupted", digest=str(self._digest)) from None
                if failures >= MAX_ATTEMPTS_WITHOUT_PROGRESS:
                    # Say that we tried, and how often: the last error alone reads as if
                    # the first drop had been fatal.
                    raise NetworkError(
                        f"{exc.message}; gave up after {failures} attempts without progress",
                        reference=exc.reference,
                        digest=exc.digest,
                    ) from None
                self.reconnects += 1
                self._sleep(min(8.0, 0.25 * 2 ** (failures - 1)))

    def _connect(self) -> None:
        stack = contextlib.ExitStack()
        try:
            stream, start = stack.enter_context(self._open_at(self.position))
            skip = self.position - start
            while skip > 0:  # the server ignored Range: drop what we already have
                chunk = stream.read(min(skip, _CHUNK))
                if not chunk:
                    raise NetworkError(
                        f"blob {self._digest} ended while resuming", digest=str(self._digest)
                    )
                skip -= len(chunk)
        except BaseException:
            stack.close()
            raise
        self._stack, self._stream = stack, stream

    def abort(self) -> None:
        """From another thread: make a read blocked on the network return now."""
        abort = getattr(self._stream, "abort", None)
        if abort is not None:
            abort()

    def close(self) -> None:
        stack, self._stack, self._stream = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                stack.close()


class LayerIngester:
    def __init__(self, store: Store, *, emit: ProgressFn, cancel: threading.Event) -> None:
        self.store = store
        self._emit = emit
        self.cancel = cancel
        self._reading: set[ResumingReader] = set()  # downloads in progress, for abort_reads
        self._reading_lock = threading.Lock()
        # A layer that finds every slot taken downloads its blob into ingest/ meanwhile,
        # then unpacks from there: downloads stay concurrent, unpacks don't compete.
        self._unpack_slots = threading.BoundedSemaphore(unpack_slots())

    @contextlib.contextmanager
    def _unpack_slot(self) -> Iterator[None]:
        while not self._unpack_slots.acquire(timeout=0.1):
            if self.cancel.is_set():
                raise Interrupted("pull interrupted")
        try:
            yield
        finally:
            self._unpack_slots.release()

    def abort_reads(self) -> None:
        """Wake every download blocked on the network (once ``cancel`` is set)."""
        with self._reading_lock:
            readers = list(self._reading)
        for reader in readers:
            reader.abort()

    def ensure(self, desc: Descriptor, diff_id: Digest, remote: OpenRemote | None) -> int:
        """Make the layer's blob and directory present; returns the blob bytes fetched.

        ``remote`` opens the blob at its registry; None when it must already be local.
        Under a per-diffID file lock, so concurrent pulls (threads or processes) of one
        layer unpack it once.
        """
        store = self.store
        short = short_digest(desc.digest)
        compression = mt.LAYER_COMPRESSION[desc.media_type]
        with file_lock(store.lock_path(diff_id)):
            record = store.metadata.layer(str(diff_id))
            if record is not None and not os.path.isdir(store.layer_dirs.path(record.dir)):
                store.metadata.remove_layer(str(diff_id))  # its directory was lost: redo it
                record = None
            have_blob = store.content.has(desc.digest)
            # What the blob unpacked to when it was verified; a config that names another
            # diffID lies, also when that other layer is here (docker refuses it too).
            known = store.metadata.blob_diff_id(str(desc.digest)) if have_blob else None
            if known is not None and known != str(diff_id):
                raise DiffIDMismatchError(
                    f"layer {desc.digest} unpacks to {known}, but the config says its "
                    f"diffID is {diff_id}",
                    digest=str(desc.digest),
                )
            if record is not None and known is not None:
                store.metadata.add_layer_blob(
                    str(desc.digest), str(diff_id), desc.media_type, desc.size
                )
                self._emit(PullEvent("already-exists", short, desc.size, desc.size))
                return 0
            fetched = 0
            unpack = record is None
            if have_blob:
                with store.content.open(desc.digest) as f, self._unpack_slot():
                    source = VerifyingReader(f, desc.digest, desc.size)
                    self._emit(PullEvent("unpacking", short, 0, desc.size))
                    self._stream_layer(source, desc, diff_id, compression, unpack, None)
            elif remote is None:
                raise BlobNotFoundError(
                    f"layer blob {desc.digest} is not in the store", digest=str(desc.digest)
                )
            else:
                fetched = self._download(desc, diff_id, compression, unpack, remote)
            if not unpack:
                store.metadata.add_layer_blob(
                    str(desc.digest), str(diff_id), desc.media_type, desc.size
                )
        self._emit(PullEvent("done", short, desc.size, desc.size))
        return fetched

    def _download(
        self,
        desc: Descriptor,
        diff_id: Digest,
        compression: mt.Compression,
        unpack: bool,
        remote: OpenRemote,
    ) -> int:
        """Fetch the blob (resuming what an interrupted attempt left in ingest/) while
        unpacking it; returns the bytes fetched now."""
        store = self.store
        with store.content.writer(desc.digest, desc.size, resumable=True) as writer:
            stream = ResumingReader(remote, desc, cancel=self.cancel, start=writer.resumed)
            with self._reading_lock:
                self._reading.add(stream)
            with contextlib.ExitStack() as stack:
                try:
                    if unpack and not self._unpack_slots.acquire(blocking=False):
                        self._spool(stream, desc, writer)
                        stack.enter_context(self._unpack_slot())
                    elif unpack:
                        stack.callback(self._unpack_slots.release)
                    source: _Readable = stream
                    if writer.written:
                        # The unpacker needs the blob from byte 0: what is already in the
                        # ingest file (kept by an earlier attempt, or spooled), then the rest.
                        source = _Chain(
                            stack.enter_context(writer.replay()), writer.written, stream
                        )
                    self._stream_layer(source, desc, diff_id, compression, unpack, writer)
                except (NetworkError, Interrupted, KeyboardInterrupt):
                    writer.keep()  # verified or not, these bytes are worth resuming from
                    raise
                finally:
                    with self._reading_lock:
                        self._reading.discard(stream)
                    stream.close()
            return desc.size - writer.resumed

    def _spool(self, stream: _Readable, desc: Descriptor, writer: BlobWriter) -> None:
        """Download the rest of the blob into its ingest file, unverified yet: the digest
        and diffID checks come with the unpack that reads it back (from the page cache)."""
        short = short_digest(desc.digest)
        step = max(desc.size // 100, 1 << 16)
        last = 0

        def on_bytes(count: int) -> None:
            nonlocal last
            if count - last >= step or count == desc.size:
                last = count
                self._emit(PullEvent("downloading", short, count, desc.size))

        tee = _Tee(stream, writer.write, desc, on_bytes, self.cancel, start=writer.written)
        while tee.read(_CHUNK):
            pass
        writer.flush()

    def _stream_layer(
        self,
        source: _Readable,
        desc: Descriptor,
        diff_id: Digest,
        compression: mt.Compression,
        unpack: bool,
        blob: BlobWriter | None,
    ) -> None:
        """One pass over the blob: write it, decompress it, hash it, unpack it.

        Publishing order keeps every crash point consistent: the blob (verified) first, then
        the metadata row, then the directory's rename; a later pull finishes what is missing.
        """
        store = self.store
        short = short_digest(desc.digest)
        step = max(desc.size // 100, 1 << 16)
        last = [0]

        def on_bytes(count: int) -> None:
            if count - last[0] >= step or count == desc.size:
                last[0] = count
                phase = "downloading" if blob else "unpacking"
                self._emit(PullEvent(phase, short, count, desc.size))

        tee = _Tee(
            source,
            blob.write if blob else None,
            desc,
            on_bytes,
            self.cancel,
            already_written=blob.written if blob else 0,
        )
        temp = store.layer_dirs.new_temp() if unpack else None
        writeback = (
            _Writeback(temp, lambda: tee.count / max(desc.size, 1)) if temp is not None else None
        )
        # Written bytes are counted as the unpacker takes them, not as they are inflated:
        # the inflate thread runs up to _DEPTH MiB ahead of what is on disk.
        ahead = _Prefetch(
            decompressing_reader(tee, compression), writeback.note if writeback else None
        )
        # The diffID hash runs on the unpacking side of the queue. On the inflate thread it
        # made that thread the pipeline's bottleneck (the unpacker waited ~200 ms of a
        # Debian pull for chunks); here the two take turns at being the slower one, as the
        # tar's content changes (docs/bench.md).
        uncompressed = _Hashing(ahead)
        try:
            try:
                try:
                    result = (
                        unpack_layer(uncompressed, temp, store.unpack_options) if temp else None
                    )
                    _drain(uncompressed)  # the diffID covers every byte, also after the tar's end
                finally:
                    ahead.close()
                    if writeback is not None:
                        writeback.stop()
            except ContentError:
                # Broken or hostile content may just be a registry serving the wrong bytes:
                # if the blob's own digest does not match, that is the error to report.
                _drain(tee)
                if blob is not None:
                    blob.verify()
                raise
            _drain(tee)
            if tee.count != desc.size:
                raise SizeMismatchError(
                    f"blob has {tee.count} bytes, its descriptor says {desc.size}",
                    digest=str(desc.digest),
                )
            if blob is not None:
                self._emit(PullEvent("verifying", short, desc.size, desc.size))
                blob.verify()  # the blob's own digest first: a lie there explains the rest
            if uncompressed.digest != diff_id:
                raise DiffIDMismatchError(
                    f"layer {desc.digest} unpacks to {uncompressed.digest}, but the config "
                    f"says its diffID is {diff_id}",
                    digest=str(desc.digest),
                )
            if temp is not None and result is not None:
                # First: this syncfs also writes the blob's bytes when ingest/ is on the
                # same filesystem, so the blob's own fsync in commit() finds little to do.
                store.layer_dirs.make_durable(temp)
            if blob is not None:
                blob.commit()
            if temp is not None and result is not None:
                self._publish_layer(temp, result, desc, diff_id)
                temp = None
        finally:
            if temp is not None:
                store.layer_dirs.remove(temp)

    def _publish_layer(
        self, temp: str, result: UnpackResult, desc: Descriptor, diff_id: Digest
    ) -> None:
        """Record the layer's row, then rename its verified temp directory into place.

        In this order a crash between the two leaves a row whose directory does not exist
        (no image refers to it yet: images are recorded after all their layers) plus a
        ``.tmp-`` leftover: the next pull finds the directory missing and unpacks the layer
        again, prune forgets the row, fsck counts it as an interrupted pull's leftover. The
        other order (rename, then row) could leave
        a complete directory that no row names, which nothing can tell from damage.
        """
        store = self.store
        name = store.layer_dirs.reserve_name()
        store.metadata.add_layer(
            LayerRecord(
                diff_id=str(diff_id),
                dir=name,
                size=result.size,
                entries=result.entries,
                opaque_root=result.opaque_root,
                whiteouts=store.unpack_options.whiteouts.value,
            ),
            str(desc.digest),
            desc.media_type,
            desc.size,
        )
        try:
            store.layer_dirs.install(temp, name)
        except BaseException:
            with contextlib.suppress(Exception):
                store.metadata.remove_layer(str(diff_id))
            raise


def short_digest(digest: Digest) -> str:
    return digest.hex[:12]
