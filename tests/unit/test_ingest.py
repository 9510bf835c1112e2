"""The ingest pipeline's helpers: the writeback schedule and the read-ahead thread."""

from __future__ import annotations

import io
import threading
import time

import pytest

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


def _dues(wb: ingest._Writeback, *notes: tuple[int, bool]) -> list[bool]:
    """Whether a syncfs was due after each (bytes taken, producer done) note."""
    dues = []
    for nbytes, produced_all in notes:
        wb.note(nbytes, produced_all)
        dues.append(_due(wb))
    return dues


def test_writeback_every_32_mib_while_far_from_the_end() -> None:
    wb = _schedule([0.5])
    # 16 MiB since the last syncfs is not yet due: far from the end the step is 32 MiB.
    steps = [(31 * MiB, False), (1 * MiB, False), (16 * MiB, False), (16 * MiB, False)]
    assert _dues(wb, *steps) == [False, True, False, True]


def test_writeback_every_8_mib_near_the_end_of_the_blob() -> None:
    fraction = [0.5]
    wb = _schedule(fraction)
    assert _dues(wb, (32 * MiB, False), (7 * MiB, False)) == [True, False]
    fraction[0] = 0.9
    # 7.5 MiB since the last one is under the short step too; 8 MiB is not.
    steps = [(512 * 1024, False), (512 * 1024, False), (8 * MiB, False)]
    assert _dues(wb, *steps) == [False, True, True]


def test_writeback_at_every_chunk_once_the_producer_is_done() -> None:
    # Far from the end by bytes (a tail of small files, or a compressed blob read to its
    # end long before the zeros it inflates to are): only the producer's end says so.
    # After the last syncfs, counting starts again from zero.
    wb = _schedule([0.5])
    steps = [(1 * MiB, False), (1 * MiB, True), (4096, True), (1 * MiB, False)]
    assert _dues(wb, *steps) == [False, True, True, False]


def test_prefetch_reports_each_chunk_the_reader_takes() -> None:
    data = bytes(range(256)) * (3 * MiB // 256 + 7)
    taken: list[tuple[int, bool]] = []
    ahead = ingest._Prefetch(io.BytesIO(data), lambda n, done: taken.append((n, done)))
    try:
        out = bytearray()
        while chunk := ahead.read(100_000):
            out += chunk
    finally:
        ahead.close()
    assert bytes(out) == data
    assert sum(n for n, _ in taken) == len(data)
    assert len(taken) == 4  # 1 MiB chunks: counted when taken, not per small read


def test_prefetch_tells_the_reader_when_the_producer_is_done() -> None:
    go = threading.Event()

    class Source:
        def __init__(self) -> None:
            self.chunks = [b"a" * 10, b"b" * 20, b""]

        def read(self, n: int = -1, /) -> bytes:
            if len(self.chunks) == 2:
                go.wait(10)  # the producer holds here until the first chunk is taken
            return self.chunks.pop(0)

    taken: list[tuple[int, bool]] = []
    ahead = ingest._Prefetch(Source(), lambda n, done: taken.append((n, done)))
    try:
        assert ahead.read(100) == b"a" * 10
        go.set()
        ahead._thread.join(10)  # it has put the second chunk and the end, and stopped
        assert ahead.read(100) == b"b" * 20
        assert ahead.read(100) == b""
    finally:
        ahead.close()
    assert taken == [(10, False), (20, True)]


def test_writeback_stop_is_not_lost_between_wake_up_and_clear(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Replays one interleaving: the helper wakes for a syncfs and, before it clears the
    # event, stop() sets _stopping and the event. That wake-up must not be lost.
    in_clear = threading.Event()
    stop_seen = threading.Event()

    class HeldEvent(threading.Event):
        def clear(self) -> None:
            if threading.current_thread().name == "ocistore-writeback":
                in_clear.set()
                stop_seen.wait(10)  # the helper loses the CPU right here
            super().clear()

    with monkeypatch.context() as m:
        m.setattr(threading, "Event", HeldEvent)
        wb = ingest._Writeback("/nonexistent", lambda: 0.0)
    wb.note(4096, True)
    assert in_clear.wait(10)
    stopper = threading.Thread(target=wb.stop, daemon=True)
    stopper.start()
    deadline = time.monotonic() + 10
    while not (wb._stopping and wb._due.is_set()) and time.monotonic() < deadline:
        pass  # stop() sets both, then joins
    stop_seen.set()
    stopper.join(10)
    assert not stopper.is_alive(), "stop() still waiting for the writeback thread"
