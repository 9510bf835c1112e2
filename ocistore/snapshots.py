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
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import struct
import subprocess
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Literal, Protocol

from ocistore import compose
from ocistore.compose import LayerView
from ocistore.errors import InUseError, MountError, StorageError, UsageError
from ocistore.fsutil import atomic_write, file_lock
from ocistore.unpack import WhiteoutFormat

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

# --- CDIR layout -----------------------------------------------------------------------------
#: text file naming the driver ("overlay\n" / "copy\n"); written first by prepare.
DRIVER_FILE = "driver"
#: overlay: writable layer, overlay work dir, mount point, short links to the layer dirs.
UPPER, WORK, MERGED, LINKS = "upper", "work", "merged", "l"
#: copy: the materialised root filesystem, the manifest taken right after, the file whose
#: ctime proves the clock moved past the manifest, and the "mounted" state marker.
ROOTFS, MANIFEST, STAMP, MOUNTED = "rootfs", "manifest", "stamp", "mounted"
#: advisory lock serialising mount/umount of one container.
LOCK = ".lock"

_WH_PREFIX = ".wh."
_WH_OPAQUE = ".wh..wh..opq"
_OPAQUE_XATTR = "trusted.overlay.opaque"
_METACOPY_XATTR = "trusted.overlay.metacopy"
_REDIRECT_XATTR = "trusted.overlay.redirect"
_NS = 1_000_000_000

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a regular file swapped for a FIFO behind our back must not hang us.
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_OPEN_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: overlayfs refuses more lower layers than this (OVL_MAX_STACK).
MAX_OVERLAY_LAYERS = 500
#: mount(2) copies at most one page of option data (util-linux 2.38 uses mount(2)).
_MOUNT_DATA_MAX = 4095


# --- public values ---------------------------------------------------------------------------


#: One image layer as the drivers read it (path, whiteout form, opaque root).
Layer = LayerView


ChangeKind = Literal["A", "C", "D"]


@dataclass(frozen=True)
class Change:
    """One line of ``docker diff``: A added, C changed, D deleted; ``path`` is absolute in
    the container ("/etc/passwd")."""

    kind: ChangeKind
    path: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


@dataclass(frozen=True)
class Availability:
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


def get_driver(name: str | None = None, layers: Sequence[Layer] | None = None) -> SnapshotDriver:
    """The driver called ``name`` ("overlay" or "copy"); with ``layers``, it must be able to
    serve them (else :class:`StorageError` with the reason). ``name=None`` chooses: overlay
    when it is available for ``layers``, else copy."""
    if name is None:
        overlay = OverlayDriver()
        if overlay.available(layers or []):
            return overlay
        return CopyDriver()
    try:
        driver: SnapshotDriver = DRIVERS[name]()
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise UsageError(f"unknown snapshot driver {name!r} (known: {known})") from None
    if layers is not None:
        verdict = driver.available(layers)
        if not verdict:
            raise StorageError(f"snapshot driver {name!r} cannot be used: {verdict.reason}")
    return driver


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


# --- mounts ----------------------------------------------------------------------------------

_OCTAL = re.compile(rb"\\([0-7]{3})")


def mount_points() -> list[str]:
    """Mount points of this mount namespace (``/proc/self/mountinfo``), in mount order."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            data = f.read()
    except OSError as exc:
        raise MountError(f"cannot read /proc/self/mountinfo: {exc.strerror}") from exc
    points = []
    for line in data.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4:
            raw = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
            points.append(os.fsdecode(raw))
    return points


def mounts_under(path: str, *, include_self: bool = True) -> list[str]:
    """Mount points at ``path`` (if ``include_self``) or anywhere below it."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    return [p for p in mount_points() if (include_self and p == real) or p.startswith(prefix)]


def run_mount(
    argv: Sequence[str], what: str, *, cwd: str | None = None, pass_fds: Sequence[int] = ()
) -> None:
    """Run ``mount``/``umount`` (util-linux); a failure is a MountError saying ``what`` and
    the first line of the tool's stderr."""
    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            check=False,
        )
    except OSError as exc:
        raise MountError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = lines[0].strip() if lines else f"{argv[0]} exited with status {proc.returncode}"
        raise MountError(f"{what}: {detail}")


# --- safe removal ----------------------------------------------------------------------------


def remove_tree(path: str) -> None:
    """Delete ``path`` and everything below it, read-only directories included.

    Never follows a symlink (a symlink is unlinked, not its target), and refuses with
    :class:`InUseError` to delete anything while a mount point lies at or below ``path`` —
    deleting through a bind mount would delete the mounted data (a volume). Directories on
    another device are refused too. A missing ``path`` is fine.
    """
    if not os.path.lexists(path):
        return
    busy = mounts_under(path)
    if busy:
        raise InUseError(f"cannot remove {path}: {busy[0]} is still mounted")
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent or "/", _OPEN_DIR & ~os.O_NOFOLLOW)
    except OSError as exc:
        raise StorageError(f"cannot remove {path}: {exc.strerror}") from exc
    try:
        _remove_at(pfd, name, path)
    except OSError as exc:
        raise StorageError(f"cannot remove {path}: {exc}") from exc
    finally:
        os.close(pfd)


def _remove_at(pfd: int, name: str, shown: str) -> None:
    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=pfd)
        return
    device = st.st_dev
    root = _open_dir_writable(pfd, name)
    # (fd, names still to look at); post-order, iterative (trees can be deep).
    stack: list[tuple[int, list[str]]] = [(root, _names(root))]
    try:
        while stack:
            fd, names = stack[-1]
            if not names:
                stack.pop()
                os.close(fd)
                if stack:
                    os.rmdir(_pending_name(stack), dir_fd=stack[-1][0])
                continue
            child = names[-1]
            try:
                cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                names.pop()
                continue
            if not stat.S_ISDIR(cst.st_mode):
                os.unlink(child, dir_fd=fd)
                names.pop()
                continue
            if cst.st_dev != device:
                raise InUseError(f"cannot remove {shown}: a mount point lies below it")
            cfd = _open_dir_writable(fd, child)
            # the child's name stays on the parent's list until the child is empty.
            stack.append((cfd, _names(cfd)))
    finally:
        for fd, _ in stack:
            os.close(fd)
    os.rmdir(name, dir_fd=pfd)


def _pending_name(stack: list[tuple[int, list[str]]]) -> str:
    return stack[-1][1].pop()


def _names(fd: int) -> list[str]:
    return os.listdir(fd)


def _open_dir_writable(pfd: int, name: str) -> int:
    """Open a directory (no follow) so that its entries can be listed and removed: as
    non-root, a directory we own but may not read or write is made 0700 first."""
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=pfd)
    except PermissionError:
        pathfd = os.open(name, _OPEN_PATH_DIR, dir_fd=pfd)
        try:
            os.chmod(f"/proc/self/fd/{pathfd}", 0o700)
            fd = os.open(".", _OPEN_DIR, dir_fd=pathfd)
        finally:
            os.close(pathfd)
    if os.geteuid() != 0 and os.fstat(fd).st_mode & 0o700 != 0o700:
        os.fchmod(fd, 0o700)
    return fd


# --- small filesystem helpers ----------------------------------------------------------------


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _path_key(path: str) -> list[bytes]:
    return os.fsencode(path).split(b"/")


def _sorted_changes(changes: Iterable[Change]) -> list[Change]:
    """docker diff order: by path, component by component (parents before children)."""
    return sorted(changes, key=lambda c: _path_key(c.path))


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _xattr(target: int | str, name: str) -> bytes | None:
    """An xattr of an open descriptor, or of a path without following a final symlink."""
    try:
        if isinstance(target, int):
            return os.getxattr(target, name)
        return os.getxattr(target, name, follow_symlinks=False)
    except OSError:
        return None


def _scandir(fd: int) -> list[tuple[str, os.stat_result]]:
    """Entries of the directory ``fd`` with their lstat, sorted by name (as bytes). Entries
    that vanish while we look are left out."""
    items = []
    with os.scandir(fd) as it:
        for entry in it:
            try:
                items.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    items.sort(key=lambda item: os.fsencode(item[0]))
    return items


def _open_child_dir(fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _OPEN_DIR, dir_fd=fd)
    except OSError as exc:
        raise StorageError(
            f"cannot open {shown!r}: {exc.strerror} (changed while reading?)"
        ) from exc


def _open_root(path: str, what: str) -> int:
    try:
        return os.open(path, _OPEN_DIR)
    except OSError as exc:
        raise StorageError(f"cannot open {what} {path}: {exc.strerror}") from exc


class _StatLike(Protocol):
    @property
    def st_mode(self) -> int: ...

    @property
    def st_uid(self) -> int: ...

    @property
    def st_gid(self) -> int: ...


def _dir_meta_differs(a: _StatLike, b: _StatLike) -> bool:
    """Docker's rule for directories: type, mode, owner (never size or mtime)."""
    return (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid)


def _effective(layers: Sequence[Layer]) -> list[Layer]:
    """Base first, cut below the topmost layer with an opaque root: overlayfs ignores the
    opaque xattr on a lowerdir's root."""
    return compose.effective_layers(layers)


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


# --- the tar writer --------------------------------------------------------------------------


def _pax_time(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    seconds, frac = divmod(abs(ns), _NS)
    if not frac:
        return f"{sign}{seconds}"
    return f"{sign}{seconds}.{frac:09d}".rstrip("0")


class _TarWriter:
    """Writes an OCI layer tar (uncompressed, PAX) to a stream, entry by entry.

    Names are relative without ``./``; owner names are empty; metadata is the entry's own
    (mode, numeric owner, mtime to the nanosecond, ``user.*`` and ``security.capability``
    xattrs). A non-directory seen again through another name (same inode) becomes a
    hardlink to the first name written. Whiteout markers are empty 0644 files owned by
    0:0 with mtime 0, so the same changes give the same bytes.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self.tar = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=out,
            mode="w|",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        )
        self.links: dict[tuple[int, int], str] = {}

    def close(self) -> None:
        self.tar.close()

    def _info(self, rel: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        info = tarfile.TarInfo(rel)
        info.type = kind
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid = st.st_uid
        info.gid = st.st_gid
        info.uname = info.gname = ""
        seconds, frac = divmod(st.st_mtime_ns, _NS)
        info.mtime = seconds
        if frac or not 0 <= seconds < 8**11:
            info.pax_headers = {"mtime": _pax_time(st.st_mtime_ns)}
        return info

    @staticmethod
    def _xattrs(info: tarfile.TarInfo, fd: int) -> None:
        try:
            names = os.listxattr(fd)
        except OSError:
            return
        pax = dict(info.pax_headers)
        for name in sorted(names):
            if name == "security.capability" or (
                name.startswith("user.") and not name.startswith("user.overlay.")
            ):
                value = _xattr(fd, name)
                if value is not None:
                    pax["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = pax

    @staticmethod
    def _check_name(rel: str) -> None:
        """A real entry named ``.wh.*`` would read as a whiteout once applied (the OCI spec
        says such names cannot exist in a layer): refuse rather than silently delete."""
        if rel.rpartition("/")[2].startswith(_WH_PREFIX):
            raise StorageError(
                f"cannot export /{rel}: names starting with {_WH_PREFIX!r} cannot be stored in "
                "an OCI layer (they mean deletions); rename or remove it"
            )

    def marker(self, rel_dir: str, base: str) -> None:
        info = tarfile.TarInfo(_join(rel_dir, base))
        info.type = tarfile.REGTYPE
        info.mode = 0o644
        info.mtime = 0
        info.uname = info.gname = ""
        self.tar.addfile(info)

    def directory(self, rel: str, fd: int) -> None:
        self._check_name(rel)
        info = self._info(rel, os.fstat(fd), tarfile.DIRTYPE)
        self._xattrs(info, fd)
        self.tar.addfile(info)

    def empty_directory(self, rel: str) -> None:
        """A directory we cannot look at (a mount point): 0755, 0:0, mtime 0."""
        self._check_name(rel)
        info = tarfile.TarInfo(rel)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.uname = info.gname = ""
        self.tar.addfile(info)

    def nondirectory(
        self, parent_fd: int, name: str, rel: str, st: os.stat_result, *, check_metacopy: bool
    ) -> None:
        mode = st.st_mode
        if stat.S_ISSOCK(mode) or _is_whiteout(st):
            # tar cannot hold sockets (docker skips them too); a 0/0 char device made in a
            # copy rootfs would read as a whiteout, and unpack rejects it.
            return
        self._check_name(rel)
        key = (st.st_dev, st.st_ino)
        first = self.links.get(key) if st.st_nlink > 1 else None
        if first is not None:
            info = tarfile.TarInfo(rel)
            info.type = tarfile.LNKTYPE
            info.linkname = first
            info.mode = stat.S_IMODE(mode)
            info.uid, info.gid = st.st_uid, st.st_gid
            info.uname = info.gname = ""
            info.mtime = st.st_mtime_ns // _NS
            self.tar.addfile(info)
            return
        if stat.S_ISREG(mode):
            self._regular(parent_fd, name, rel, check_metacopy)
        elif stat.S_ISLNK(mode):
            info = self._info(rel, st, tarfile.SYMTYPE)
            info.linkname = os.readlink(name, dir_fd=parent_fd)
            self.tar.addfile(info)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info = self._info(rel, st, tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE)
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self.tar.addfile(info)
        elif stat.S_ISFIFO(mode):
            self.tar.addfile(self._info(rel, st, tarfile.FIFOTYPE))
        else:  # pragma: no cover - no other file types on Linux
            return
        if st.st_nlink > 1:
            self.links[key] = rel

    def _regular(self, parent_fd: int, name: str, rel: str, check_metacopy: bool) -> None:
        try:
            fd = os.open(name, _OPEN_FILE, dir_fd=parent_fd)
        except OSError as exc:
            raise StorageError(
                f"cannot read {rel!r}: {exc.strerror} (changed while reading?)"
            ) from exc
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                raise StorageError(f"{rel!r} changed while it was being exported")
            if check_metacopy and _xattr(fd, _METACOPY_XATTR) is not None:
                raise StorageError(
                    f"{rel!r} is an overlay metacopy (its data lives in a lower layer); "
                    "mount with metacopy=off"
                )
            info = self._info(rel, fst, tarfile.REGTYPE)
            info.size = fst.st_size
            self._xattrs(info, fd)
            try:
                self.tar.addfile(info, f)
            except OSError as exc:
                raise StorageError(
                    f"cannot export {rel!r}: {exc} (changed while reading?)"
                ) from exc


# --- overlay ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LowerDir:
    """A directory of the image view (the stacked OVERLAY-form layers, no upper): its path
    and the layer roots (top first) that contribute entries to it."""

    rel: str
    roots: tuple[str, ...]


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


@dataclass
class _OverlayFrame:
    fd: int
    rel: str
    lower: _LowerDir | None
    hide: bool  # the image's content of this directory is hidden (it or an ancestor is opaque)
    entries: list[tuple[str, os.stat_result]]
    image: os.stat_result | None = None
    st: os.stat_result | None = None
    index: int = 0
    changed: bool = False


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
        with open("/proc/filesystems", encoding="ascii", errors="replace") as f:
            return any(line.split()[-1:] == ["overlay"] for line in f)
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
        stack: list[tuple[int, Iterator[tuple[str, os.stat_result]]]] = []
        try:
            stack.append((root_fd, iter(())))
            stack[0] = (root_fd, iter(_scandir(root_fd)))
            while stack:
                fd, it = stack[-1]
                item = next(it, None)
                if item is None:
                    stack.pop()
                    os.close(fd)
                    continue
                name, st = item
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    cfd = _open_child_dir(fd, name, name)
                    stack.append((cfd, iter(())))
                    stack[-1] = (cfd, iter(_scandir(cfd)))
        except OSError as exc:
            raise StorageError(f"cannot measure {cdir}: {exc}") from exc
        finally:
            for fd, _ in stack:
                os.close(fd)
        return total

    def export_changes(self, cdir: str, layers: Sequence[Layer], out: IO[bytes]) -> None:
        """The upper directory as an OCI layer tar: every upper entry (a directory copied up
        only for a child change included), whiteout devices as ``.wh.NAME``, opaque
        directories as ``DIR/`` + ``DIR/.wh..wh..opq`` + their contents. In each directory:
        the directory entry, its opaque marker, its whiteouts, then its entries by name."""
        root_fd = self._upper_fd(cdir)
        writer = _TarWriter(out)
        stack: list[tuple[int, str, Iterator[tuple[str, os.stat_result]]]] = []

        def enter(fd: int, rel: str) -> Iterator[tuple[str, os.stat_result]]:
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
            return iter([(n, s) for n, s in entries if not _is_whiteout(s)])

        try:
            stack.append((root_fd, "", iter(())))
            stack[0] = (root_fd, "", enter(root_fd, ""))
            while stack:
                fd, rel, it = stack[-1]
                item = next(it, None)
                if item is None:
                    stack.pop()
                    os.close(fd)
                    continue
                name, st = item
                crel = _join(rel, name)
                if stat.S_ISDIR(st.st_mode):
                    cfd = _open_child_dir(fd, name, crel)
                    stack.append((cfd, crel, iter(())))
                    writer.directory(crel, cfd)
                    stack[-1] = (cfd, crel, enter(cfd, crel))
                else:
                    writer.nondirectory(fd, name, crel, st, check_metacopy=True)
            writer.close()
        except OSError as exc:
            raise StorageError(f"cannot export the changes of {cdir}: {exc}") from exc
        finally:
            for fd, _, _ in stack:
                os.close(fd)


# --- copy ------------------------------------------------------------------------------------

_MANIFEST_MAGIC = b"ocistore copy-manifest 1\n"
# mode uid gid rdev size mtime_ns ctime_ns ino, then the path's length and bytes.
_RECORD = struct.Struct("<IIIQqqqQI")


@dataclass(frozen=True)
class _Rec:
    st_mode: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Rec:
        return cls(
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
        )


class _Manifest:
    """What ``CDIR/rootfs`` held right after it was materialised: path -> stat data (no
    content hashes). Stored as a zlib stream of fixed records plus path bytes."""

    def __init__(self, records: dict[str, _Rec]) -> None:
        self.records = records
        self.children: dict[str, list[str]] = {}
        for path in records:
            if path:
                parent, _, name = path.rpartition("/")
                self.children.setdefault(parent, []).append(name)

    @staticmethod
    def take(root: str) -> Iterator[tuple[str, os.stat_result]]:
        """Walk ``root`` (no symlink followed), parents first, names sorted."""
        root_fd = _open_root(root, "rootfs")
        stack: list[tuple[int, str, Iterator[tuple[str, os.stat_result]]]] = []
        try:
            stack.append((root_fd, "", iter(())))
            yield "", os.fstat(root_fd)
            stack[0] = (root_fd, "", iter(_scandir(root_fd)))
            while stack:
                fd, rel, it = stack[-1]
                item = next(it, None)
                if item is None:
                    stack.pop()
                    os.close(fd)
                    continue
                name, st = item
                crel = _join(rel, name)
                yield crel, st
                if stat.S_ISDIR(st.st_mode):
                    cfd = _open_child_dir(fd, name, crel)
                    stack.append((cfd, crel, iter(())))
                    stack[-1] = (cfd, crel, iter(_scandir(cfd)))
        finally:
            for fd, _, _ in stack:
                os.close(fd)

    @staticmethod
    def write(path: str, entries: Iterable[tuple[str, os.stat_result]]) -> int:
        """Write the manifest; returns the largest ctime recorded (ns)."""
        comp = zlib.compressobj(6)
        chunks = [_MANIFEST_MAGIC]
        newest = 0
        for rel, st in entries:
            raw = os.fsencode(rel)
            chunks.append(
                comp.compress(
                    _RECORD.pack(
                        st.st_mode,
                        st.st_uid,
                        st.st_gid,
                        st.st_rdev,
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ctime_ns,
                        st.st_ino,
                        len(raw),
                    )
                    + raw
                )
            )
            newest = max(newest, st.st_ctime_ns)
        chunks.append(comp.flush())
        atomic_write(path, b"".join(chunks), mode=0o600)
        return newest

    @classmethod
    def load(cls, path: str) -> _Manifest:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise StorageError(f"cannot read copy manifest {path}: {exc.strerror}") from exc
        if not data.startswith(_MANIFEST_MAGIC):
            raise StorageError(f"{path} is not a copy manifest")
        try:
            body = zlib.decompress(data[len(_MANIFEST_MAGIC) :])
        except zlib.error as exc:
            raise StorageError(f"copy manifest {path} is damaged: {exc}") from exc
        records: dict[str, _Rec] = {}
        pos, size = 0, _RECORD.size
        try:
            while pos < len(body):
                *fields, length = _RECORD.unpack_from(body, pos)
                pos += size
                rel = os.fsdecode(body[pos : pos + length])
                pos += length
                records[rel] = _Rec(*fields)
        except struct.error as exc:
            raise StorageError(f"copy manifest {path} is damaged: {exc}") from exc
        return cls(records)


def _nondir_changed(rec: _Rec, st: os.stat_result) -> bool:
    """Docker's rule (type, mode, owner, device, size, mtime) plus the inode and its ctime:
    the same inode untouched since the manifest was taken, or a change. ctime catches an
    in-place rewrite that restored size and mtime; a replaced file has another inode."""
    return rec != _Rec.of(st)


@dataclass
class _DirDiff:
    kind: ChangeKind | None
    deleted: list[str]


@dataclass
class _CopyDiff:
    changes: list[Change] = field(default_factory=list)
    #: directories to visit when exporting (changed, added, or holding changes).
    dirs: dict[str, _DirDiff] = field(default_factory=dict)
    #: added or changed non-directories.
    files: set[str] = field(default_factory=set)
    #: mount points (volumes) that the image does not have: exported as empty directories.
    mounts: set[str] = field(default_factory=set)
    size: int = 0


@dataclass
class _CopyFrame:
    fd: int
    rel: str
    kind: ChangeKind | None
    entries: list[tuple[str, os.stat_result]]
    deleted: list[str]
    index: int = 0
    changed: bool = False


class CopyDriver:
    """Rootless fallback: the composed image copied (reflinked where possible) into
    ``CDIR/rootfs``, with ``CDIR/manifest`` recording what it held. See
    ``docs/snapshots.md``."""

    name = "copy"

    def available(self, layers: Sequence[Layer]) -> Availability:
        return Availability(True)

    def rootfs(self, cdir: str) -> str:
        return os.path.join(cdir, ROOTFS)

    def prepare(self, layers: Sequence[Layer], cdir: str) -> str:
        _begin(cdir, self.name, (ROOTFS, MANIFEST, STAMP, MOUNTED))
        rootfs = self.rootfs(cdir)
        manifest = os.path.join(cdir, MANIFEST)
        try:
            compose.materialize(compose.ComposedTree(list(layers)), rootfs, reflink=True)
            newest = _Manifest.write(manifest, _Manifest.take(rootfs))
            _wait_past(os.path.join(cdir, STAMP), newest)
        except BaseException:
            for path in (rootfs, manifest, os.path.join(cdir, STAMP)):
                with contextlib.suppress(StorageError):
                    remove_tree(path)
            raise
        return rootfs

    def mount(self, cdir: str, layers: Sequence[Layer]) -> str:
        """Nothing to mount: the rootfs is always there. Only the state is recorded
        (``CDIR/mounted``), so that the lifecycle reads the same as overlay's."""
        _require(cdir, self.name)
        rootfs = self.rootfs(cdir)
        if not os.path.isdir(rootfs):
            raise StorageError(f"copy snapshot {cdir} has no rootfs")
        marker = os.path.join(cdir, MOUNTED)
        if not os.path.exists(marker):
            atomic_write(marker, b"", mode=0o644)
        return rootfs

    def umount(self, cdir: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(os.path.join(cdir, MOUNTED))

    def is_mounted(self, cdir: str) -> bool:
        return os.path.isfile(os.path.join(cdir, MOUNTED))

    def remove(self, cdir: str) -> None:
        _remove_cdir(cdir)

    def _diff(self, cdir: str) -> _CopyDiff:
        _require(cdir, self.name)
        manifest = _Manifest.load(os.path.join(cdir, MANIFEST))
        records = manifest.records
        rootfs = self.rootfs(cdir)
        real = os.path.realpath(rootfs)
        skip = {os.path.relpath(p, real) for p in mounts_under(real, include_self=False)}
        diff = _CopyDiff()
        inodes: set[int] = set()
        root_fd = _open_root(rootfs, "rootfs")
        stack: list[_CopyFrame] = []

        def frame(fd: int, rel: str, kind: ChangeKind | None, in_image: bool) -> _CopyFrame:
            entries = _scandir(fd)
            deleted: list[str] = []
            if in_image:
                present = {name for name, _ in entries}
                deleted = sorted(
                    (n for n in manifest.children.get(rel, ()) if n not in present),
                    key=os.fsencode,
                )
                for name in deleted:
                    diff.changes.append(Change("D", "/" + _join(rel, name)))
            return _CopyFrame(fd, rel, kind, entries, deleted, changed=bool(deleted))

        try:
            try:
                stack.append(frame(root_fd, "", None, "" in records))
            except BaseException:
                os.close(root_fd)
                raise
            while stack:
                fr = stack[-1]
                if fr.index < len(fr.entries):
                    name, st = fr.entries[fr.index]
                    fr.index += 1
                    rel = _join(fr.rel, name)
                    rec = records.get(rel)
                    if rel in skip:  # a mount point (volume): never looked into
                        if rec is None:
                            diff.changes.append(Change("A", "/" + rel))
                            diff.mounts.add(rel)
                            fr.changed = True
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        kind: ChangeKind | None = None
                        if rec is None:
                            kind = "A"
                        elif not stat.S_ISDIR(rec.st_mode) or _dir_meta_differs(rec, st):
                            kind = "C"
                        in_image = rec is not None and stat.S_ISDIR(rec.st_mode)
                        cfd = _open_child_dir(fr.fd, name, rel)
                        try:
                            stack.append(frame(cfd, rel, kind, in_image))
                        except BaseException:
                            os.close(cfd)
                            raise
                        continue
                    if rec is None or _nondir_changed(rec, st):
                        diff.changes.append(Change("A" if rec is None else "C", "/" + rel))
                        diff.files.add(rel)
                        fr.changed = True
                        if st.st_ino not in inodes:
                            inodes.add(st.st_ino)
                            diff.size += st.st_size
                    continue
                stack.pop()
                os.close(fr.fd)
                if fr.kind is None and fr.changed and fr.rel:
                    fr.kind = "C"
                if fr.kind is not None or fr.changed:
                    diff.dirs[fr.rel] = _DirDiff(fr.kind, fr.deleted)
                if fr.kind is not None and fr.rel:
                    diff.changes.append(Change(fr.kind, "/" + fr.rel))
                if stack and (fr.kind is not None or fr.changed):
                    stack[-1].changed = True
        except OSError as exc:
            raise StorageError(f"cannot read the changes of {cdir}: {exc}") from exc
        finally:
            for fr in stack:
                os.close(fr.fd)
        diff.changes = _sorted_changes(diff.changes)
        return diff

    def changes(self, cdir: str, layers: Sequence[Layer]) -> list[Change]:
        """``docker diff`` by comparing ``rootfs`` with the manifest (see ``_diff``)."""
        return self._diff(cdir).changes

    def writable_size(self, cdir: str) -> int:
        """Bytes of the added and changed non-directories (each inode once)."""
        return self._diff(cdir).size

    def export_changes(self, cdir: str, layers: Sequence[Layer], out: IO[bytes]) -> None:
        """Added/changed entries with their metadata, the directories holding them, and a
        ``.wh.NAME`` for each deleted path (explicit whiteouts, as the OCI spec prefers; a
        directory deleted and recreated gets a whiteout per vanished child)."""
        diff = self._diff(cdir)
        writer = _TarWriter(out)
        if "" not in diff.dirs:
            writer.close()
            return
        root_fd = _open_root(self.rootfs(cdir), "rootfs")
        stack: list[tuple[int, str, Iterator[tuple[str, os.stat_result]]]] = []

        def enter(fd: int, rel: str) -> Iterator[tuple[str, os.stat_result]]:
            for name in diff.dirs[rel].deleted:
                writer.marker(rel, _WH_PREFIX + name)
            return iter(_scandir(fd))

        try:
            stack.append((root_fd, "", iter(())))
            stack[0] = (root_fd, "", enter(root_fd, ""))
            while stack:
                fd, rel, it = stack[-1]
                item = next(it, None)
                if item is None:
                    stack.pop()
                    os.close(fd)
                    continue
                name, st = item
                crel = _join(rel, name)
                if crel in diff.dirs:
                    cfd = _open_child_dir(fd, name, crel)
                    stack.append((cfd, crel, iter(())))
                    if diff.dirs[crel].kind is not None:
                        writer.directory(crel, cfd)
                    stack[-1] = (cfd, crel, enter(cfd, crel))
                elif crel in diff.files:
                    writer.nondirectory(fd, name, crel, st, check_metacopy=False)
                elif crel in diff.mounts:
                    writer.empty_directory(crel)
            writer.close()
        except OSError as exc:
            raise StorageError(f"cannot export the changes of {cdir}: {exc}") from exc
        finally:
            for fd, _, _ in stack:
                os.close(fd)


def _wait_past(stamp: str, newest_ns: int, timeout: float = 2.0) -> None:
    """Return once the filesystem clock has moved past ``newest_ns``, so that any later
    write gives a ctime the manifest cannot hold (kernel timestamps are coarse: a write in
    the same tick as the manifest would otherwise keep the recorded ctime)."""
    deadline = time.monotonic() + timeout
    with open(stamp, "wb"):
        pass
    while True:
        os.utime(stamp)
        if os.stat(stamp).st_ctime_ns > newest_ns or time.monotonic() > deadline:
            return
        time.sleep(0.001)


DRIVERS: dict[str, type[OverlayDriver] | type[CopyDriver]] = {
    OverlayDriver.name: OverlayDriver,
    CopyDriver.name: CopyDriver,
}
