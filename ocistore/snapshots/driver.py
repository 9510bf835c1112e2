"""What every snapshot driver shares: the interface, and the record in ``CDIR`` of which
driver prepared a container directory (``CDIR/driver``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, NamedTuple, Protocol

from ocistore.compose import LayerView
from ocistore.errors import StorageError
from ocistore.fsutil import atomic_write
from ocistore.snapshots.mounts import remove_tree

if TYPE_CHECKING:
    from ocistore.snapshots.changes import Change

#: text file naming the driver ("overlay\n" / "copy\n"); written first by prepare.
DRIVER_FILE = "driver"

#: One image layer as the drivers read it (path, whiteout form, opaque root).
Layer = LayerView


class Availability(NamedTuple):
    """Whether a driver can be used here, and if not, why (true in a boolean context)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class SnapshotDriver(Protocol):
    """The interface both drivers implement. ``layers`` are always base first."""

    name: str

    def available(self, layers: Sequence[Layer]) -> Availability: ...

    def prepare(self, layers: Sequence[Layer], cdir: str) -> str: ...

    def mount(self, cdir: str, layers: Sequence[Layer]) -> str: ...

    def umount(self, cdir: str) -> None: ...

    def is_mounted(self, cdir: str) -> bool: ...

    def remove(self, cdir: str) -> None: ...

    def rootfs(self, cdir: str) -> str: ...

    def changes(self, cdir: str, layers: Sequence[Layer]) -> list[Change]: ...

    def writable_size(self, cdir: str) -> int: ...

    def export_changes(self, cdir: str, layers: Sequence[Layer], out: IO[bytes]) -> None: ...


def driver_name(cdir: str) -> str | None:
    """The driver a prepared container directory was made by (``CDIR/driver``), or None."""
    try:
        with open(os.path.join(cdir, DRIVER_FILE), encoding="ascii") as f:
            name = f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"cannot read the snapshot driver of {cdir}: {exc}") from exc
    return name or None


def _begin(cdir: str, driver: str, own: Sequence[str]) -> None:
    """Create ``cdir`` if needed, refuse one a driver already prepared, record the driver."""
    try:
        os.makedirs(cdir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create container directory {cdir}: {exc.strerror}") from exc
    for name in (DRIVER_FILE, *own):
        if os.path.lexists(os.path.join(cdir, name)):
            raise StorageError(f"container directory {cdir} is already prepared ({name} exists)")
    atomic_write(os.path.join(cdir, DRIVER_FILE), f"{driver}\n".encode(), mode=0o644)


def _require(cdir: str, driver: str) -> None:
    found = driver_name(cdir)
    if found is None:
        raise StorageError(f"container directory {cdir} was not prepared")
    if found != driver:
        raise StorageError(f"container directory {cdir} belongs to the {found!r} driver")


def _remove_cdir(cdir: str) -> None:
    if not os.path.lexists(cdir):
        return
    if os.path.islink(cdir):
        raise StorageError(f"container directory {cdir} is a symlink; not following it")
    remove_tree(cdir)
