"""The ingest pipeline's helpers: the writeback schedule and the read-ahead thread."""

from __future__ import annotations

import io

from ocistore import ingest

MiB = 1 << 20


def _schedule(fraction: list[float]) -> ingest._Writeback:
    # Its thread stopped at once: note() still decides, and nothing clears _due behind
    # the test's back.
    wb = ingest._Writeback("/nonexistent", lambda: fraction[0])
    wb.stop()
    wb._due.clear()
    return wb


def _due(wb: ingest._Writeback) -> bool:
    due = wb._due.is_set()
    wb._due.clear()
    return due


def test_writeback_every_32_mib_while_far_from_the_end() -> None:
    fraction = [0.5]
    wb = _schedule(fraction)
    wb.note(31 * MiB)
    assert not _due(wb)
    wb.note(1 * MiB)
    assert _due(wb)
    wb.note(16 * MiB)
    assert not _due(wb)  # 16 MiB since the last syncfs, not yet near the end
    wb.note(16 * MiB)
    assert _due(wb)


def test_writeback_every_8_mib_near_the_end_of_the_blob() -> None:
    fraction = [0.5]
    wb = _schedule(fraction)
    wb.note(32 * MiB)
    assert _due(wb)
    wb.note(7 * MiB)
    fraction[0] = 0.9
    wb.note(512 * 1024)
    assert not _due(wb)  # 7.5 MiB since the last one: under the short step too
    wb.note(512 * 1024)
    assert _due(wb)
    wb.note(8 * MiB)
    assert _due(wb)


def test_prefetch_reports_each_chunk_the_reader_takes() -> None:
    data = bytes(range(256)) * (3 * MiB // 256 + 7)
    taken: list[int] = []
    ahead = ingest._Prefetch(io.BytesIO(data), taken.append)
    try:
        out = bytearray()
        while chunk := ahead.read(100_000):
            out += chunk
    finally:
        ahead.close()
    assert bytes(out) == data
    assert sum(taken) == len(data)
    assert len(taken) == 4  # 1 MiB chunks: counted when taken, not per small read
