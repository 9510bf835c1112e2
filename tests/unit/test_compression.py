"""Streaming decompression: every byte out, and broken streams refused."""

from __future__ import annotations

import errno
import gzip
import io
import os
import threading
from typing import Any

import pytest
import zstandard

from ocistore.compression import GzipWriter, decompressing_reader
from ocistore.errors import LayerFormatError

PAYLOAD = os.urandom(300_000) + b"\0" * 3_000_000


def _read_all(reader: object, size: int = 4096) -> bytes:
    out = bytearray()
    while chunk := reader.read(size):  # type: ignore[attr-defined]
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("size", [1, 512, 10240, 1 << 20])
def test_gzip_round_trip_any_read_size(size: int) -> None:
    reader = decompressing_reader(io.BytesIO(gzip.compress(PAYLOAD)), "gzip")
    assert _read_all(reader, size) == PAYLOAD


def test_gzip_multi_member_is_one_stream() -> None:
    blob = gzip.compress(PAYLOAD[:1000]) + gzip.compress(PAYLOAD[1000:])
    assert _read_all(decompressing_reader(io.BytesIO(blob), "gzip")) == PAYLOAD


def test_gzip_trailing_garbage_is_refused() -> None:
    blob = gzip.compress(b"hello") + b"garbage"
    with pytest.raises(LayerFormatError, match="garbage"):
        _read_all(decompressing_reader(io.BytesIO(blob), "gzip"))


def test_gzip_truncated_is_refused() -> None:
    blob = gzip.compress(PAYLOAD)
    with pytest.raises(LayerFormatError, match="truncated"):
        _read_all(decompressing_reader(io.BytesIO(blob[: len(blob) // 2]), "gzip"))


def test_gzip_corrupt_is_refused() -> None:
    blob = bytearray(gzip.compress(PAYLOAD))
    blob[100:110] = b"\xff" * 10
    with pytest.raises(LayerFormatError):
        _read_all(decompressing_reader(io.BytesIO(bytes(blob)), "gzip"))


def test_empty_gzip_stream_is_refused() -> None:
    with pytest.raises(LayerFormatError):
        _read_all(decompressing_reader(io.BytesIO(b""), "gzip"))


def test_zstd_round_trip_multi_frame() -> None:
    c = zstandard.ZstdCompressor()
    blob = c.compress(PAYLOAD[:5000]) + c.compress(PAYLOAD[5000:])
    assert _read_all(decompressing_reader(io.BytesIO(blob), "zstd")) == PAYLOAD


def test_zstd_trailing_garbage_is_refused() -> None:
    blob = zstandard.ZstdCompressor().compress(PAYLOAD) + b"garbage!garbage!"
    with pytest.raises(LayerFormatError, match="zstd"):
        _read_all(decompressing_reader(io.BytesIO(blob), "zstd"))


def test_uncompressed_passes_through() -> None:
    assert _read_all(decompressing_reader(io.BytesIO(PAYLOAD), "none")) == PAYLOAD


def test_gzip_many_small_members_in_one_read() -> None:
    blob = b"".join(gzip.compress(bytes([i]) * 10) for i in range(50))
    expected = b"".join(bytes([i]) * 10 for i in range(50))
    assert _read_all(decompressing_reader(io.BytesIO(blob), "gzip"), 7) == expected


class _Exact:
    """Hands out the stream in the given pieces, whatever size is asked for."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def read(self, n: int = -1) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def test_gzip_member_boundary_on_read_boundary() -> None:
    first, second = gzip.compress(b"a" * 100), gzip.compress(b"b" * 100)
    reader = decompressing_reader(_Exact([first, second]), "gzip")
    assert _read_all(reader) == b"a" * 100 + b"b" * 100
    bad = decompressing_reader(_Exact([first, b"junk"]), "gzip")
    with pytest.raises(LayerFormatError, match="garbage"):
        _read_all(bad)


def test_gzip_next_members_magic_split_across_reads() -> None:
    first, second = gzip.compress(b"a" * 100), gzip.compress(b"b" * 100)
    # The first read ends one byte into the second member: its magic comes in two halves.
    reader = decompressing_reader(_Exact([first + second[:1], second[1:]]), "gzip")
    assert _read_all(reader) == b"a" * 100 + b"b" * 100
    lone = decompressing_reader(_Exact([first + b"\x1f"]), "gzip")
    with pytest.raises(LayerFormatError, match="garbage"):
        _read_all(lone)


def test_gzip_highly_compressed_member_comes_out_in_bounded_chunks() -> None:
    # 64 MiB of zeros from a few dozen KiB: each read hands out at most a chunk, the
    # rest of the input stays inside the inflater until asked for.
    blob = gzip.compress(bytes(64 << 20), compresslevel=1)
    reader = decompressing_reader(io.BytesIO(blob), "gzip")
    sizes = []
    while chunk := reader.read(1 << 20):
        assert chunk == bytes(len(chunk))
        sizes.append(len(chunk))
    assert sum(sizes) == 64 << 20 and max(sizes) <= 1 << 20


def _compress(data: bytes, pieces: int = 4096) -> bytes:
    out = io.BytesIO()
    with GzipWriter(out) as gz:  # in pieces of any size, as the tar writer writes
        for i in range(0, len(data), pieces):
            gz.write(data[i : i + pieces])
    return out.getvalue()


def test_gzip_writer_writes_a_reproducible_stream_any_reader_takes() -> None:
    text = b"".join(b"line %d of a layer that compresses\n" % i for i in range(100_000))
    data = text + PAYLOAD + text  # several of the writer's 1 MiB blocks
    blob = _compress(data)
    assert gzip.decompress(blob) == data  # the stdlib's reader, not only ours
    assert _read_all(decompressing_reader(io.BytesIO(blob), "gzip")) == data
    # No time, no name: the same changes committed twice are the same blob.
    assert blob[:3] == b"\x1f\x8b\x08" and blob[3] == 0 and blob[4:8] == bytes(4)
    # Whatever pieces the tar writer writes in (1 MiB exactly, ragged, larger than a block).
    assert {_compress(data, n) for n in (1 << 20, 1000, 512 * 3 + 7, 3 << 20)} == {blob}
    assert len(blob) < len(text) // 4  # it does compress


class _FillsUp:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return len(data)

    def flush(self) -> None:
        pass


def test_gzip_writer_raises_a_full_disk_and_stops_its_thread() -> None:
    before = set(threading.enumerate())
    with pytest.raises(OSError, match="No space left"), GzipWriter(_FillsUp(100_000)) as gz:
        for _ in range(20):
            gz.write(PAYLOAD)
    assert set(threading.enumerate()) <= before


def test_gzip_writer_lets_the_callers_error_through() -> None:
    # The snapshot driver fails while the disk fills up: ending the stream fails too, but
    # the driver's error (which names the container) is the one to report.
    before = set(threading.enumerate())
    raw = _FillsUp(1 << 40)
    with pytest.raises(ValueError, match="driver failed"), GzipWriter(raw) as gz:
        gz.write(PAYLOAD[:5000])
        raw.room = 0  # the disk is full from now on
        raise ValueError("driver failed")
    assert set(threading.enumerate()) <= before


class _CtrlC:
    """igzip's writer as a Ctrl-C finds it: blocked handing a block to its full queue."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pressed = False

    def write(self, data: object) -> int:
        if not self.pressed:  # once: what comes after the Ctrl-C goes through
            self.pressed = True
            raise KeyboardInterrupt
        return int(self.inner.write(data))

    def close(self) -> None:
        self.inner.close()


def test_gzip_writer_ctrl_c_while_handing_over_a_block_stays_a_ctrl_c() -> None:
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt), GzipWriter(io.BytesIO()) as gz:
        gz._gz = _CtrlC(gz._gz)  # type: ignore[assignment]
        gz.write(bytes(3 << 20))  # three whole blocks: the first hand-over is interrupted
    assert set(threading.enumerate()) <= before
