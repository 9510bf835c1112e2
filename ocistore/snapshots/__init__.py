"""Container snapshots: an image's read-only layer directories plus one writable layer.

Pure filesystem mechanics: no database, no CLI. The caller (see ``docs/snapshots.md``)
owns the container directory ``CDIR`` (``ROOT/containers/<id>/``), passes the image's
layers base first, and records which driver a container uses.

Two drivers behind one interface (:class:`SnapshotDriver`), chosen by name:

* ``overlay``: kernel overlayfs; ``prepare`` is constant-time in image size (nothing is
  copied), the writable layer is ``CDIR/upper``. Needs root and OVERLAY-form layers.
* ``copy``: the rootless fallback; the composed image is materialised (reflinked where the
  filesystem can) into ``CDIR/rootfs`` and a compact manifest of what it held is kept, so
  changes are found by comparing ``stat`` data, never by hashing.

Every walk goes through directory descriptors opened with ``O_NOFOLLOW``: a container
(running, hostile) can replace anything in its writable layer with a symlink, and nothing
here ever follows one out of the tree it is reading or deleting.

Modules: ``driver`` (the interface, the ``CDIR/driver`` record), ``overlay``, ``copy``,
``changes`` (the change list, the changes tar), ``mounts`` (mountinfo, mount/umount,
``remove_tree``, the descriptor walks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ocistore.errors import StorageError, UsageError
from ocistore.snapshots.driver import Availability, Layer, SnapshotDriver, driver_name
from ocistore.snapshots.mounts import mount_points, mounts_under, remove_tree, run_mount
from ocistore.snapshots.overlay import OverlayDriver

if TYPE_CHECKING:
    from ocistore.snapshots.changes import Change
    from ocistore.snapshots.changes import _sorted_changes as _sorted_changes
    from ocistore.snapshots.copy import CopyDriver
    from ocistore.snapshots.copy import _Manifest as _Manifest
    from ocistore.snapshots.copy import _Rec as _Rec

    DRIVERS: dict[str, type[OverlayDriver] | type[CopyDriver]]

# The ``_x as _x`` imports above are internals the unit tests reach through this package.
# They, the copy driver and the change list load on first use (see __getattr__): an overlay
# container's create, mount, umount or rm needs none of them.
__all__ = [
    "DRIVERS",
    "Availability",
    "Change",
    "CopyDriver",
    "Layer",
    "OverlayDriver",
    "SnapshotDriver",
    "driver_name",
    "get_driver",
    "mount_points",
    "mounts_under",
    "remove_tree",
    "run_mount",
]

_LAZY = {
    "Change": "changes",
    "_sorted_changes": "changes",
    "CopyDriver": "copy",
    "_Manifest": "copy",
    "_Rec": "copy",
}

#: The driver names get_driver() knows.
_DRIVER_NAMES = ("overlay", "copy")


def __getattr__(name: str) -> Any:
    value: Any
    if name == "DRIVERS":  # name -> driver class
        from ocistore.snapshots.copy import CopyDriver

        value = {OverlayDriver.name: OverlayDriver, CopyDriver.name: CopyDriver}
    elif name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def _driver_class(name: str) -> type[OverlayDriver] | type[CopyDriver] | None:
    if name == OverlayDriver.name:
        return OverlayDriver
    if name == "copy":
        from ocistore.snapshots.copy import CopyDriver

        return CopyDriver
    return None


def get_driver(name: str | None = None, layers: Sequence[Layer] | None = None) -> SnapshotDriver:
    """The driver called ``name`` ("overlay" or "copy"); with ``layers``, it must be able to
    serve them (else :class:`StorageError` with the reason). ``name=None`` chooses: overlay
    when it is available for ``layers``, else copy."""
    if name is None:
        overlay = OverlayDriver()
        if overlay.available(layers or []):
            return overlay
        from ocistore.snapshots.copy import CopyDriver

        return CopyDriver()
    cls = _driver_class(name)
    if cls is None:
        known = ", ".join(sorted(_DRIVER_NAMES))
        raise UsageError(f"unknown snapshot driver {name!r} (known: {known})")
    driver: SnapshotDriver = cls()
    if layers is not None:
        verdict = driver.available(layers)
        if not verdict:
            raise StorageError(f"snapshot driver {name!r} cannot be used: {verdict.reason}")
    return driver
