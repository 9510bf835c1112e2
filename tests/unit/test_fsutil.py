"""fsutil.atomic_write: readers see the old file or the new one, and no temp file stays."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ocistore import fsutil


def test_atomic_write_replaces_with_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    fsutil.atomic_write(str(target), b"new", mode=0o640)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fsutil.atomic_write(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_atomic_write_temp_names_do_not_collide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A leftover with the name the next temp would get must not be reused or clobbered.
    names = iter([b"\x00" * 8, b"\x00" * 8, b"\x01" * 8])
    leftover = tmp_path / (".tmp-" + "00" * 8)
    leftover.write_bytes(b"someone else's")
    monkeypatch.setattr(os, "urandom", lambda n: next(names))
    fsutil.atomic_write(str(tmp_path / "f"), b"data")
    assert leftover.read_bytes() == b"someone else's"
    assert (tmp_path / "f").read_bytes() == b"data"
    assert sorted(os.listdir(tmp_path)) == [".tmp-" + "00" * 8, "f"]
