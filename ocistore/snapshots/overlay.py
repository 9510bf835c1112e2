"""The ``overlay`` snapshot driver: kernel overlayfs over the image's layer directories.

``prepare`` is constant-time in image size (nothing is copied); the writable layer is
``CDIR/upper``. Needs root and OVERLAY-form layers. See ``docs/snapshots.md``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

from ocistore import compose
from ocistore.errors import MountError, StorageError
from ocistore.fsutil import file_lock
from ocistore.snapshots.driver import Availability, Layer, _begin, _remove_cdir, _require
from ocistore.snapshots.mounts import (
    Entry,
    _join,
    _open_child_dir,
    _open_root,
    _scandir,
    _walk,
    _xattr,
    mount_points,
    remove_tree,
    run_mount,
)
from ocistore.whiteouts import WhiteoutFormat

# The change list and the changes tar (snapshots/changes.py) are imported by the methods
# that make them, diff and commit: create, mount, umount and rm do not load them.
if TYPE_CHECKING:
    from ocistore.snapshots.changes import Change, ChangeKind

# --- CDIR layout -----------------------------------------------------------------------------
#: writable layer, overlay work dir, mount point, short links to the layer dirs.
UPPER, WORK, MERGED, LINKS = "upper", "work", "merged", "l"
#: advisory lock serialising mount/umount of one container.
LOCK = ".lock"

_OPAQUE_XATTR = "trusted.overlay.opaque"
_REDIRECT_XATTR = "trusted.overlay.redirect"

#: overlayfs refuses more lower layers than this (OVL_MAX_STACK).
MAX_OVERLAY_LAYERS = 500
#: mount(2) copies at most one page of option data (util-linux 2.38 uses mount(2)).
_MOUNT_DATA_MAX = 4095


def _effective(layers: Sequence[Layer]) -> list[Layer]:
    """Base first, cut below the topmost layer with an opaque root: overlayfs ignores the
    opaque xattr on a lowerdir's root."""
    return compose.effective_layers(layers)


# _LowerDir and _OverlayFrame are plain classes rather than dataclasses: a dataclass costs
# most of a millisecond to build when the module loads, and only diff uses these.


class _LowerDir:
    """A directory of the image view (the stacked OVERLAY-form layers, no upper): its path
    and the layer roots (top first) that contribute entries to it."""

    __slots__ = ("rel", "roots")

    def __init__(self, rel: str, roots: tuple[str, ...]) -> None:
        self.rel = rel
        self.roots = roots


class _LowerView:
    """Lookups in the image as overlayfs composes OVERLAY-form layers: the topmost entry
    wins, a 0/0 char device hides lower entries, a non-directory hides lower directories,
    ``trusted.overlay.opaque=y`` stops the merge below it.

    Every root in a :class:`_LowerDir` holds a real directory at ``rel`` (checked with lstat
    one level at a time), so joining paths below it never crosses a symlink.
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.top_first = tuple(os.path.abspath(layer.path) for layer in reversed(layers))

    def root(self) -> _LowerDir | None:
        return _LowerDir("", self.top_first) if self.top_first else None

    def lookup(
        self, parent: _LowerDir | None, name: str
    ) -> tuple[os.stat_result | None, _LowerDir | None]:
        from ocistore.snapshots.changes import _is_whiteout

        if parent is None:
            return None, None
        rel = _join(parent.rel, name)
        top: os.stat_result | None = None
        roots: list[str] = []
        for root in parent.roots:
            path = os.path.join(root, rel)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if _is_whiteout(st):
                break
            if top is None:
                top = st
            if not stat.S_ISDIR(st.st_mode):
                break
            roots.append(root)
            if _xattr(path, _OPAQUE_XATTR) == b"y":
                break
        if top is None:
            return None, None
        if stat.S_ISDIR(top.st_mode):
            return top, _LowerDir(rel, tuple(roots))
        return top, None

    def children(self, directory: _LowerDir) -> list[str]:
        from ocistore.snapshots.changes import _is_whiteout

        seen: set[str] = set()
        visible: list[str] = []
        for root in directory.roots:
            try:
                with os.scandir(os.path.join(root, directory.rel)) as it:
                    for entry in it:
                        if entry.name in seen:
                            continue
                        seen.add(entry.name)
                        if not _is_whiteout(entry.stat(follow_symlinks=False)):
                            visible.append(entry.name)
            except FileNotFoundError:
                continue
        return visible


class _OverlayFrame:
    """A directory of the upper layer on the stack of :meth:`OverlayDriver.changes`."""

    __slots__ = ("changed", "entries", "fd", "hide", "image", "index", "lower", "rel", "st")

    def __init__(
        self,
        fd: int,
        rel: str,
        lower: _LowerDir | None,
        hide: bool,  # the image's content of this directory is hidden (it or an ancestor is opaque)
        entries: list[tuple[str, os.stat_result]],
        image: os.stat_result | None = None,
        st: os.stat_result | None = None,
    ) -> None:
        self.fd = fd
        self.rel = rel
        self.lower = lower
        self.hide = hide
        self.entries = entries
        self.image = image
        self.st = st
        self.index = 0
        self.changed = False


def _overlay_options_supported() -> list[str]:
    """``index=off,redirect_dir=off,metacopy=off`` where this kernel knows the option (each
    has a module parameter of the same name since it was added: 4.13, 4.10, 4.19)."""
    return [
        f"{name}=off"
        for name in ("index", "redirect_dir", "metacopy")
        if os.path.exists(f"/sys/module/overlay/parameters/{name}")
    ]


def _overlay_in_kernel() -> bool:
    try:
        with open("/proc/filesystems", "rb") as f:  # bytes: no codec module to load
            return any(line.split()[-1:] == [b"overlay"] for line in f)
    except OSError:
        return False


class OverlayDriver:
    """Kernel overlayfs: ``lowerdir`` = the effective layer dirs (top first, through the
    short links ``CDIR/l/<i>``), ``upperdir=CDIR/upper``, ``workdir=CDIR/work``, mounted at
    ``CDIR/merged``. See ``docs/snapshots.md``."""

    name = "overlay"

    # --- availability and layout ---------------------------------------------------------

    def available(self, layers: Sequence[Layer]) -> Availability:
        if os.geteuid() != 0:
            return Availability(False, f"overlay needs root (running as uid {os.geteuid()})")
        if not _overlay_in_kernel():
            return Availability(False, "the kernel has no overlay filesystem (/proc/filesystems)")
        effective = _effective(layers)
        if len(effective) > MAX_OVERLAY_LAYERS:
            return Availability(
                False, f"{len(effective)} layers; overlayfs stacks at most {MAX_OVERLAY_LAYERS}"
            )
        for layer in effective:
            if layer.whiteouts is not WhiteoutFormat.OVERLAY:
                return Availability(
                    False,
                    f"layer {layer.path} keeps whiteouts in OCI form (unpacked without root)",
                )
        return Availability(True)

    def rootfs(self, cdir: str) -> str:
        return os.path.join(cdir, MERGED)

    def prepare(self, layers: Sequence[Layer], cdir: str) -> str:
        """Lay out ``cdir`` (nothing is mounted or copied: constant time in image size)."""
        effective = _effective(layers)
        for layer in effective:
            if layer.whiteouts is not WhiteoutFormat.OVERLAY:
                raise StorageError(f"overlay driver: layer {layer.path} keeps OCI whiteouts")
        _begin(cdir, self.name, (UPPER, WORK, MERGED, LINKS))
        try:
            upper = os.path.join(cdir, UPPER)
            os.mkdir(upper, 0o755)
            os.mkdir(os.path.join(cdir, WORK), 0o700)
            os.mkdir(self.rootfs(cdir), 0o755)
            if effective:
                # The merged root takes its owner, mode and times from the upper root.
                top = os.stat(effective[-1].path)
                if os.geteuid() == 0:
                    os.chown(upper, top.st_uid, top.st_gid)
                os.chmod(upper, stat.S_IMODE(top.st_mode))
                os.utime(upper, ns=(top.st_atime_ns, top.st_mtime_ns))
            self._link_layers(cdir, effective)
        except OSError as exc:
            raise StorageError(f"cannot prepare overlay snapshot in {cdir}: {exc}") from exc
        return self.rootfs(cdir)

    @staticmethod
    def _link_layers(cdir: str, effective: Sequence[Layer]) -> int:
        """(Re)create ``CDIR/l/<i>`` -> layer dir, i = 0 for the base; returns how many. An
        image without layers gets one empty directory ``l/0`` (overlay needs a lowerdir)."""
        links = os.path.join(cdir, LINKS)
        remove_tree(links)
        os.mkdir(links, 0o755)
        for i, layer in enumerate(effective):
            os.symlink(os.path.abspath(layer.path), os.path.join(links, str(i)))
        if not effective:
            os.mkdir(os.path.join(links, "0"), 0o755)
            return 1
        return len(effective)

    @staticmethod
    def mount_options(count: int) -> str:
        """The option string for ``count`` lower layers, relative to CDIR (the mount runs
        with ``cwd=CDIR``): ``lowerdir=l/N-1:...:l/0,upperdir=upper,workdir=work,...``."""
        lower = ":".join(f"{LINKS}/{i}" for i in reversed(range(count)))
        return ",".join(
            [
                f"lowerdir={lower}",
                f"upperdir={UPPER}",
                f"workdir={WORK}",
                *_overlay_options_supported(),
            ]
        )

    # --- mounting ------------------------------------------------------------------------

    def is_mounted(self, cdir: str) -> bool:
        return os.path.realpath(self.rootfs(cdir)) in set(mount_points())

    def mount(self, cdir: str, layers: Sequence[Layer]) -> str:
        merged = self.rootfs(cdir)
        _require(cdir, self.name)
        with file_lock(os.path.join(cdir, LOCK)):
            if self.is_mounted(cdir):
                return merged
            verdict = self.available(layers)
            if not verdict:
                raise MountError(f"cannot mount overlay at {merged}: {verdict.reason}")
            try:
                count = self._link_layers(cdir, _effective(layers))
            except OSError as exc:
                raise StorageError(f"cannot link layers into {cdir}: {exc}") from exc
            options = self.mount_options(count)
            if len(options) > _MOUNT_DATA_MAX:
                raise MountError(
                    f"cannot mount overlay at {merged}: options for {count} layers exceed "
                    f"{_MOUNT_DATA_MAX} bytes"
                )
            real_cdir = os.path.realpath(cdir)
            run_mount(
                [
                    "mount",
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    options,
                    os.path.join(real_cdir, MERGED),
                ],
                f"cannot mount overlay at {merged}",
                cwd=real_cdir,
            )
        return merged

    def umount(self, cdir: str) -> None:
        merged = self.rootfs(cdir)
        if not os.path.isdir(cdir):
            return
        with file_lock(os.path.join(cdir, LOCK)):
            real = os.path.realpath(merged)
            # Loop: a racing caller may have stacked a second mount on the same point.
            for _ in range(16):
                if real not in set(mount_points()):
                    return
                run_mount(["umount", real], f"cannot unmount {merged}")
            raise MountError(f"cannot unmount {merged}: still mounted")

    def remove(self, cdir: str) -> None:
        if os.path.isdir(cdir) and not os.path.islink(cdir) and self.is_mounted(cdir):
            self.umount(cdir)
        _remove_cdir(cdir)

    # --- the writable layer --------------------------------------------------------------

    def _upper_fd(self, cdir: str) -> int:
        _require(cdir, self.name)
        return _open_root(os.path.join(cdir, UPPER), "overlay upper directory")

    def changes(self, cdir: str, layers: Sequence[Layer]) -> list[Change]:
        """What ``docker diff`` says, from the upper directory alone (plus lookups in the
        image view): a copied-up or new non-directory is C if the image has the path, else
        A; a whiteout is D; a directory is A if new, C if its type/mode/owner differ or
        anything below it changed; the image entries an opaque directory hides are D."""
        from ocistore.snapshots.changes import (
            Change,
            _dir_meta_differs,
            _is_whiteout,
            _sorted_changes,
        )

        view = _LowerView(_effective(layers))
        root_fd = self._upper_fd(cdir)
        out: list[Change] = []
        stack = [
            _OverlayFrame(root_fd, "", view.root(), _xattr(root_fd, _OPAQUE_XATTR) == b"y", [])
        ]
        try:
            stack[0].entries = _scandir(root_fd)
            while stack:
                frame = stack[-1]
                if frame.index < len(frame.entries):
                    name, st = frame.entries[frame.index]
                    frame.index += 1
                    rel = _join(frame.rel, name)
                    image, lower = view.lookup(frame.lower, name)
                    if _is_whiteout(st):
                        if image is not None:
                            out.append(Change("D", "/" + rel))
                            frame.changed = True
                    elif stat.S_ISDIR(st.st_mode):
                        fd = _open_child_dir(frame.fd, name, rel)
                        hide = frame.hide or _xattr(fd, _OPAQUE_XATTR) == b"y"
                        stack.append(_OverlayFrame(fd, rel, lower, hide, [], image, st))
                        stack[-1].entries = _scandir(fd)
                    else:
                        out.append(Change("A" if image is None else "C", "/" + rel))
                        frame.changed = True
                    continue
                if frame.hide and frame.lower is not None:
                    present = {name for name, _ in frame.entries}
                    for name in view.children(frame.lower):
                        if name not in present:
                            out.append(Change("D", "/" + _join(frame.rel, name)))
                            frame.changed = True
                stack.pop()
                if not stack:
                    break
                os.close(frame.fd)
                assert frame.st is not None
                kind: ChangeKind | None = None
                if frame.image is None:
                    kind = "A"
                elif (
                    not stat.S_ISDIR(frame.image.st_mode)
                    or _dir_meta_differs(frame.image, frame.st)
                    or frame.changed
                ):
                    kind = "C"
                if kind is not None:
                    out.append(Change(kind, "/" + frame.rel))
                    stack[-1].changed = True
        except OSError as exc:
            raise StorageError(f"cannot read the changes of {cdir}: {exc}") from exc
        finally:
            for frame in stack:
                os.close(frame.fd)
            if not stack:
                os.close(root_fd)
        return _sorted_changes(out)

    def writable_size(self, cdir: str) -> int:
        """Disk usage of the upper directory's contents: st_blocks * 512, each inode once."""
        root_fd = self._upper_fd(cdir)
        seen: set[int] = set()
        total = 0
        try:
            for _, _, _, st in _walk(root_fd):
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_blocks * 512
        except OSError as exc:
            raise StorageError(f"cannot measure {cdir}: {exc}") from exc
        finally:
            os.close(root_fd)
        return total

    def export_changes(self, cdir: str, layers: Sequence[Layer], out: IO[bytes]) -> None:
        """The upper directory as an OCI layer tar: every upper entry (a directory copied up
        only for a child change included), whiteout devices as ``.wh.NAME``, opaque
        directories as ``DIR/`` + ``DIR/.wh..wh..opq`` + their contents. In each directory:
        the directory entry, its opaque marker, its whiteouts, then its entries by name."""
        from ocistore.snapshots.changes import _WH_OPAQUE, _WH_PREFIX, _is_whiteout, _TarWriter

        root_fd = self._upper_fd(cdir)
        writer = _TarWriter(out)

        def enter(fd: int, rel: str) -> list[Entry]:
            if rel:  # the root directory itself is never exported
                writer.directory(rel, fd)
            entries = _scandir(fd)
            if _xattr(fd, _REDIRECT_XATTR) is not None:
                raise StorageError(
                    f"{rel or '/'!r} is a renamed overlay directory (redirect_dir); "
                    "mount with redirect_dir=off"
                )
            if _xattr(fd, _OPAQUE_XATTR) == b"y":
                writer.marker(rel, _WH_OPAQUE)
            for name, st in entries:
                if _is_whiteout(st):
                    writer.marker(rel, _WH_PREFIX + name)
            return [(n, s) for n, s in entries if not _is_whiteout(s)]

        try:
            for fd, name, rel, st in _walk(root_fd, enter=enter):
                if not stat.S_ISDIR(st.st_mode):  # directories: written by enter()
                    writer.nondirectory(fd, name, rel, st, check_metacopy=True)
            writer.close()
        except OSError as exc:
            raise StorageError(f"cannot export the changes of {cdir}: {exc}") from exc
        finally:
            os.close(root_fd)
