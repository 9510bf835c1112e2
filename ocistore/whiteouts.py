"""How a store writes whiteouts into its layer directories, and how that is decided.

Kept apart from the unpacker so that commands which only read the store (``images``,
``create``, ``ls``) do not import the unpacker and the tar reader at start-up; the probe,
which runs once per store, imports what it needs itself.
"""

from __future__ import annotations

import enum
import os
import stat
from typing import NamedTuple

from ocistore.errors import StorageError

__all__ = ["OPAQUE_XATTR", "UnpackOptions", "WhiteoutFormat", "probe_whiteout_format"]

OPAQUE_XATTR = "trusted.overlay.opaque"


class WhiteoutFormat(enum.Enum):
    """How whiteouts are written into a layer directory."""

    #: Kernel overlayfs-native: whiteout = 0/0 char device, opaque dir = trusted.overlay.opaque=y.
    OVERLAY = "overlay"
    #: Keep the OCI markers as empty regular files: ``.wh.NAME`` and ``.wh..wh..opq``.
    OCI = "oci"


class UnpackOptions(NamedTuple):
    whiteouts: WhiteoutFormat
    #: chown entries to the tar's numeric uid/gid (True when root).
    same_owner: bool
    #: create char/block devices (True when root); otherwise skip them with a warning.
    devices: bool


def probe_whiteout_format(directory: str) -> WhiteoutFormat:
    """OVERLAY if this process can mknod a 0/0 char device AND set trusted.overlay.opaque in
    ``directory`` (tried in a temporary subdirectory that is removed again), else OCI."""
    import shutil
    import tempfile

    try:
        probe = tempfile.mkdtemp(prefix=".whiteout-probe-", dir=directory)
    except OSError as exc:
        raise StorageError(f"cannot probe whiteout support in {directory}: {exc}") from exc
    try:
        node = os.path.join(probe, "whiteout")
        os.mknod(node, stat.S_IFCHR, os.makedev(0, 0))
        st = os.lstat(node)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(0, 0):
            return WhiteoutFormat.OCI
        os.setxattr(probe, OPAQUE_XATTR, b"y")
        if os.getxattr(probe, OPAQUE_XATTR) != b"y":
            return WhiteoutFormat.OCI
    except OSError:
        return WhiteoutFormat.OCI
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return WhiteoutFormat.OVERLAY
