"""Layer directories: each layer unpacked once into ``ROOT/layers/<random name>/``.

A directory is first built as ``ROOT/layers/.tmp-<random>`` (same filesystem) and renamed
to its final random name only after its diffID was verified, so a visible layer directory
is always complete. Names say nothing about the layer (as in Docker's overlay2): the
metadata database maps diffIDs and chainIDs to them.
"""

from __future__ import annotations

import os
import stat

from ocistore.fsutil import fsync_dir, syncfs

TMP_PREFIX = ".tmp-"


class LayerDirs:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "layers")

    def init(self) -> None:
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def new_temp(self) -> str:
        path = os.path.join(self.dir, TMP_PREFIX + os.urandom(8).hex())
        os.mkdir(path, 0o755)
        return path

    def make_durable(self, temp: str) -> None:
        """Write a finished temp directory's whole tree to disk (one syncfs, not an fsync
        per file); before anything names it."""
        syncfs(temp)

    def reserve_name(self) -> str:
        """The random name a durable temp directory will get: the caller records it, then
        ``install``s (see ingest's publishing order)."""
        while True:
            name = os.urandom(13).hex()  # what secrets.token_hex(13) is, without its imports
            if not os.path.lexists(self.path(name)):
                return name

    def install(self, temp: str, name: str) -> None:
        os.rename(temp, self.path(name))
        fsync_dir(self.dir)

    def remove(self, path: str) -> None:
        if os.path.lexists(path):
            import shutil

            _make_writable(path)
            shutil.rmtree(path, ignore_errors=True)

    def temp_dirs(self) -> list[str]:
        return [self.path(n) for n in os.listdir(self.dir) if n.startswith(TMP_PREFIX)]

    def names(self) -> list[str]:
        return [n for n in os.listdir(self.dir) if not n.startswith(".")]


def _make_writable(path: str) -> None:
    # Layers may hold read-only directories (mode 0555); as non-root, rmtree would fail.
    if os.geteuid() == 0:
        return
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(full, st.st_mode | 0o700)
    os.chmod(path, os.lstat(path).st_mode | 0o700)
