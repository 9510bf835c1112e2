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


def test_creation_defaults_say_when_create_gives_the_final_mode_and_owner(
    tmp_path: Path,
) -> None:
    from ocistore.fsutil import CreationDefaults, creation_defaults

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        old = os.umask(0o022)
        try:
            found = creation_defaults(fd, same_owner=True)
        finally:
            os.umask(old)
        assert found == CreationDefaults((os.geteuid(), os.getegid()), 0o022)
        assert creation_defaults(fd, same_owner=False) is not None
        if os.geteuid() == 0:  # a directory whose owner new files might not get
            os.chown(tmp_path, 0, os.getegid() + 1)
            assert creation_defaults(fd, same_owner=True) is None
            assert creation_defaults(fd, same_owner=False) is not None
            os.chown(tmp_path, 0, os.getegid())
        os.chmod(tmp_path, 0o2755)  # a setgid directory gives its own group: unknown
        assert creation_defaults(fd, same_owner=True) is None
    finally:
        os.close(fd)

    me = CreationDefaults((0, 0), 0o022)
    assert me.gives_file(0o644, 0, 0) and me.gives_file(0o400, 0, 0)
    assert not me.gives_file(0o664, 0, 0)  # the umask takes g+w
    assert not me.gives_file(0o4755, 0, 0)  # setuid goes on after the chown
    assert not me.gives_file(0o644, 1000, 0)
    assert me.gives_dir(0o755, 0, 0) and me.gives_dir(0o700, 0, 0)
    assert not me.gives_dir(0o555, 0, 0)  # children still have to go in
    assert not me.gives_dir(0o1777, 0, 0)
    anyone = CreationDefaults(None, 0)  # owners not kept
    assert anyone.gives_file(0o664, 1000, 1000) and anyone.gives_dir(0o755, 5, 5)
    # Nobody else writes into a directory while its children are made: 0700 till then.
    assert not anyone.gives_dir(0o775, 5, 5) and not anyone.gives_dir(0o757, 5, 5)
