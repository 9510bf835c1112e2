"""Unpack one uncompressed layer tar stream into the layer's own, fresh, private directory.

Each layer gets a directory of its own; lower layers are never present in it (another
module composes the layer directories later). Hostile archives are expected, so nothing is
ever created, changed or removed outside ``dest``:

* every parent directory is reached from a descriptor of ``dest``, one component at a time,
  with ``O_NOFOLLOW``; a parent that is a symlink is an :class:`UnsafeLayerError`;
* every final component is created with an ``*at`` call that does not follow symlinks, and
  an existing entry is removed (never opened or written through) before it is replaced;
* ``..`` components, whiteouts that name nothing, and hardlinks that leave the layer are
  rejected.

Whiteouts are written either as overlayfs understands them (a 0/0 character device and the
``trusted.overlay.opaque`` xattr) or kept as the OCI marker files. See ``docs/unpack.md``.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import typing
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Protocol, TypeVar

from ocistore import tarreader as tr
from ocistore.descriptors import open_file_limit
from ocistore.errors import LayerFormatError, OcistoreError, StorageError, UnsafeLayerError
from ocistore.fsutil import creation_defaults
from ocistore.whiteouts import OPAQUE_XATTR, UnpackOptions, WhiteoutFormat, probe_whiteout_format

__all__ = [
    "ByteSource",
    "UnpackOptions",
    "UnpackResult",
    "WhiteoutFormat",
    "probe_whiteout_format",
    "unpack_layer",
]

_T = TypeVar("_T")

#: Regular file data is copied in chunks of this size, so memory stays bounded.
CHUNK_SIZE = 1 << 20
#: Cached parent-directory descriptors; all are closed once there are more than this.
#: Fewer under a low descriptor limit: a sixteenth of it, so that several unpacks and
#: the rest of a pull fit (a soft limit of 200 used to fail the Debian layer with EMFILE).
_DIR_FD_CACHE_MAX = 256
_DIR_FD_CACHE_MIN = 8
#: Longest entry name (normalised, in bytes) we accept: Linux PATH_MAX.
_MAX_PATH_BYTES = 4096
#: Linux keeps 12 bits of major and 20 bits of minor device number.
_MAX_MAJOR = (1 << 12) - 1
_MAX_MINOR = (1 << 20) - 1
#: Largest uid/gid; (uid_t)-1 means "unchanged" to chown and is not a real id.
_MAX_ID = (1 << 32) - 2

_WH_PREFIX = ".wh."
_WH_META_PREFIX = ".wh..wh."
_WH_OPAQUE = ".wh..wh..opq"
_OPAQUE_XATTR = OPAQUE_XATTR
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_PAX_XATTR = "SCHILY.xattr."
_PAX_LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_CREATE_MODE = 0o700
_IMPLICIT_DIR_MODE = 0o755
_MARKER_MODE = 0o644

_NS = 1_000_000_000
_MAX_NS = (1 << 63) - 1
_MAX_SECONDS = Decimal(_MAX_NS) / _NS
_MAX_WHOLE_SECONDS = _MAX_NS // _NS


class ByteSource(Protocol):
    """What :func:`unpack_layer` reads: ``read(n)`` returns up to ``n`` bytes, ``b""`` at
    the end. Short reads are fine; no seek, tell or close is used. ``typing.BinaryIO``
    qualifies."""

    def read(self, n: int = -1, /) -> bytes: ...


class UnpackResult(typing.NamedTuple):
    #: tar members processed (PAX global headers and GNU long-name headers are not members).
    entries: int
    #: bytes of regular file content written (logical size, holes of sparse files included).
    size: int
    #: the layer had a root-level opaque marker (``.wh..wh..opq`` at the top).
    opaque_root: bool
    warnings: list[str]


def unpack_layer(stream: ByteSource, dest: str, options: UnpackOptions) -> UnpackResult:
    """Unpack the uncompressed layer tar read from ``stream`` into the empty directory ``dest``.

    Reads the tar up to its end-of-archive block (the reader may read up to 1 MiB beyond it;
    the caller drains the rest). Raises :class:`UnsafeLayerError` for hostile or invalid
    entries, :class:`LayerFormatError` for a broken or truncated tar, :class:`StorageError`
    when the filesystem fails us. Exceptions raised by ``stream.read`` itself propagate
    unchanged. On any exception ``dest`` is left half-written for the caller to remove.
    """
    unpacker = _Unpacker(dest, options)
    try:
        return unpacker.run(stream)
    finally:
        unpacker.close()


# --- internals ----------------------------------------------------------------------------


class _ParentNotDirectory(UnsafeLayerError):
    """A parent component is a symlink or another non-directory of this layer."""


class _Missing(UnsafeLayerError):
    """A path looked up without creating it does not exist (or is not a directory)."""


class _Meta(typing.NamedTuple):  # one per entry: a tuple is built faster than a dataclass
    uid: int
    gid: int
    mode: int
    mtime_ns: int | None


_IMPLICIT_META = _Meta(uid=0, gid=0, mode=_IMPLICIT_DIR_MODE, mtime_ns=None)


class _Source:
    """Wraps the caller's stream so that its own errors can be told apart from ours."""

    def __init__(self, stream: ByteSource) -> None:
        self._stream = stream
        self.failed = False

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except BaseException:
            self.failed = True
            raise

    def close(self) -> None:
        """The caller owns the stream; the reader must not close it."""


def _printable(path: str) -> str:
    """A path as text that can always be printed (non-UTF-8 bytes as \\x escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") or "."


def _split(name: str) -> list[str]:
    """Normalise an entry name into components below the layer root.

    Leading ``/`` and ``./`` go (absolute names are root-relative), ``.`` and empty
    components go, and any ``..`` component at all is rejected.
    """
    if "\x00" in name:
        raise UnsafeLayerError(f"layer entry name {_printable(name)!r} contains a NUL byte")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise UnsafeLayerError(f"layer entry {_printable(name)!r} has a '..' component")
    if len(name) > _MAX_PATH_BYTES // 4 and len(os.fsencode("/".join(parts))) > _MAX_PATH_BYTES:
        raise UnsafeLayerError(f"layer entry name is longer than {_MAX_PATH_BYTES} bytes")
    return parts


def _mtime_ns(member: tr.TarEntry) -> int:
    raw = member.pax_headers.get("mtime") if member.pax_headers else None
    if raw is None:
        whole = int(member.mtime)  # the header's octal field: whole seconds
        if -_MAX_WHOLE_SECONDS <= whole <= _MAX_WHOLE_SECONDS:
            return whole * _NS
        seconds = Decimal(whole)
    else:
        try:
            seconds = Decimal(raw)
        except InvalidOperation:
            seconds = Decimal(0)
        if not seconds.is_finite():
            seconds = Decimal(0)
    if seconds > _MAX_SECONDS:
        return _MAX_NS
    if seconds < -_MAX_SECONDS:
        return -_MAX_NS
    return int(seconds * _NS)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_data(tar: tr.TarReader, member: tr.TarEntry, fd: int, length: int) -> None:
    """Write the member's next ``length`` bytes as the stream holds them: a file that
    spans two chunks is two writes, not a copy joining them."""
    while length > 0:
        data = tar.read_view(min(length, CHUNK_SIZE))  # raises where the stream ends
        if not data:
            # The member's stored bytes ran out first: a sparse map that claims more data
            # than its blocks hold. Without this the loop would spin forever.
            raise LayerFormatError(
                f"layer tar is truncated in the data of {_printable(member.name)!r}"
            )
        _write_all(fd, data)
        length -= len(data)


def _meta(member: tr.TarEntry) -> _Meta:
    uid, gid = member.uid, member.gid
    if not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID):
        what, value = ("uid", uid) if not 0 <= uid <= _MAX_ID else ("gid", gid)
        raise UnsafeLayerError(
            f"layer entry {_printable(member.name)!r} has an invalid {what} {value}"
        )
    return _Meta(uid, gid, member.mode & 0o7777, _mtime_ns(member))


class _Unpacker:
    def __init__(self, dest: str, options: UnpackOptions) -> None:
        self.options = options
        self.overlay = options.whiteouts is WhiteoutFormat.OVERLAY
        self.dest = dest
        try:
            self.root_fd = os.open(dest, _OPEN_DIR)
        except OSError as exc:
            raise StorageError(f"cannot open layer directory {dest}: {exc}") from exc
        # A file whose owner and mode are what it is born with needs no fchown or fchmod:
        # two syscalls of six for the common file (root:root, 0644 or 0755).
        self.defaults = creation_defaults(self.root_fd, options.same_owner)
        # relative dir path ("a/b") -> open descriptor; never holds the root.
        self.cache: dict[str, int] = {}
        self.cache_max = max(_DIR_FD_CACHE_MIN, min(_DIR_FD_CACHE_MAX, open_file_limit() // 16))
        # directories whose owner/mode/mtime are applied at the end, children first.
        self.dirs: dict[str, _Meta] = {}
        # directories of self.dirs made with their final owner and mode: _finish only
        # sets their mtime (a directory with children needs u+rwx, so one whose final
        # mode lacks it is made 0700 and fixed at the end).
        self.born_dirs: set[str] = set()
        self.implicit_born = self._born_dir(_IMPLICIT_META)
        self.root_meta: _Meta | None = None
        # paths whose lower-layer content this layer hides: named by a ".wh.NAME" or
        # replaced by a later entry of this layer. A directory at such a path is opaque.
        self.hidden: set[str] = set()
        # OVERLAY: paths where we made a 0/0 whiteout device (not real entries of the layer).
        self.wh_devices: set[str] = set()
        # OVERLAY: directories made opaque by a marker of this layer.
        self.opaque_dirs: set[str] = set()
        self.warnings: dict[str, list[typing.Any]] = {}
        self.entries = 0
        self.size = 0
        self.opaque_root = False
        self.current = ""

    # --- driver -------------------------------------------------------------------------

    def run(self, stream: ByteSource) -> UnpackResult:
        source = _Source(stream)
        try:
            tar = tr.TarReader(source)
            while True:
                self._evict()
                member = self._parse(source, tar.next)
                if member is None:
                    break
                self.entries += 1
                self.current = member.name
                self._entry(tar, member)
            self.current = ""
            self._finish()
        except OcistoreError:
            raise
        except OSError as exc:
            if source.failed:
                raise
            raise self._os_error(exc) from exc
        return UnpackResult(
            entries=self.entries,
            size=self.size,
            opaque_root=self.opaque_root,
            warnings=self._warning_lines(),
        )

    def close(self) -> None:
        self._close_cache()
        os.close(self.root_fd)

    @staticmethod
    def _parse(source: _Source, call: Callable[[], _T]) -> _T:
        """Run a tar parsing call; whatever it raises on bad input is a LayerFormatError.

        The reader raises LayerFormatError itself; anything else it might raise on hostile
        headers (a ValueError, an IndexError, a RecursionError...)
        RecursionError and the like. Errors of the caller's stream pass through unchanged.
        """
        try:
            return call()
        except (OcistoreError, MemoryError):
            raise
        except Exception as exc:
            if source.failed:
                raise
            raise LayerFormatError(f"layer tar is broken: {exc!r}") from exc

    def _os_error(self, exc: OSError) -> OcistoreError:
        where = f" at {_printable(self.current)!r}" if self.current else ""
        if exc.errno == errno.ENAMETOOLONG:
            return UnsafeLayerError(f"layer entry name too long{where}")
        return StorageError(f"cannot unpack layer into {self.dest}{where}: {exc.strerror}")

    def _warn(self, message: str, path: str) -> None:
        seen = self.warnings.get(message)
        if seen is None:
            self.warnings[message] = [1, path]
        else:
            seen[0] += 1

    def _warning_lines(self) -> list[str]:
        lines = []
        for message, (count, path) in self.warnings.items():
            more = f" and {count - 1} more" if count > 1 else ""
            lines.append(f"{message}: {_printable(path)}{more}")
        return lines

    # --- directory descriptors ----------------------------------------------------------

    def _evict(self) -> None:
        if len(self.cache) > self.cache_max:
            self._close_cache()

    def _close_cache(self) -> None:
        fds = list(self.cache.values())
        self.cache.clear()
        for fd in fds:
            os.close(fd)

    def _dir_fd(self, parts: Sequence[str], create: bool = True) -> int:
        """Descriptor of the directory ``parts`` below the root, walked without following
        symlinks; missing directories are created when ``create``. The descriptor belongs
        to the cache (or is the root): callers must not close it."""
        n = len(parts)
        if n == 0:
            return self.root_fd
        key = "/".join(parts)
        fd = self.cache.get(key)
        if fd is not None:
            return fd
        # Deepest cached ancestor.
        start = n - 1
        fd = self.root_fd
        while start > 0:
            cached = self.cache.get("/".join(parts[:start]))
            if cached is not None:
                fd = cached
                break
            start -= 1
        owned = False  # fd is an uncached intermediate that we must close
        prefix = "/".join(parts[:start])
        for i in range(start, n):
            prefix = f"{prefix}/{parts[i]}" if prefix else parts[i]
            child = self._open_child(fd, parts[i], prefix, create)
            if owned:
                os.close(fd)
            fd = child
            owned = True
            if i == n - 1 or len(self.cache) < self.cache_max:
                self.cache[prefix] = fd
                owned = False
        return fd

    def _open_child(self, parent_fd: int, name: str, key: str, create: bool) -> int:
        try:
            return os.open(name, _OPEN_DIR, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise _Missing(f"{_printable(key)!r} does not exist") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise _ParentNotDirectory(
                    f"layer entry {_printable(self.current)!r}: path through symlink "
                    f"{_printable(key)!r}"
                ) from None
            if not create or key not in self.wh_devices:
                if not create:
                    raise _Missing(f"{_printable(key)!r} is not a directory") from None
                raise _ParentNotDirectory(
                    f"layer entry {_printable(self.current)!r}: parent {_printable(key)!r} "
                    "is not a directory"
                ) from None
            # An OVERLAY whiteout device stands where this layer now needs a directory.
            os.unlink(name, dir_fd=parent_fd)
            self.wh_devices.discard(key)
        born = self.implicit_born and key not in self.dirs
        os.mkdir(name, _IMPLICIT_DIR_MODE if born else _DIR_CREATE_MODE, dir_fd=parent_fd)
        self.dirs.setdefault(key, _IMPLICIT_META)
        if born:
            self.born_dirs.add(key)
        fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
        try:
            self._new_dir(parent_fd, name, key, fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _new_dir(self, parent_fd: int, name: str, key: str, fd: int) -> None:
        """A directory was just created at ``key``: make it opaque if this layer hides the
        lower-layer content at that path."""
        if key not in self.hidden:
            return
        if self.overlay:
            os.setxattr(fd, _OPAQUE_XATTR, b"y")
            return
        # OCI form: say it with a ".wh.NAME" marker beside the directory.
        try:
            marker = os.open(_WH_PREFIX + name, _CREATE_FILE, _MARKER_MODE, dir_fd=parent_fd)
        except FileExistsError:
            return
        try:
            os.fchmod(marker, _MARKER_MODE)
        finally:
            os.close(marker)

    def _forget_tree(self, key: str) -> None:
        """Drop every record of ``key`` and what lies below it (it is being removed)."""
        prefix = key + "/"
        for path in [p for p in self.cache if p == key or p.startswith(prefix)]:
            os.close(self.cache.pop(path))
        for path in [p for p in self.dirs if p == key or p.startswith(prefix)]:
            del self.dirs[path]
            self.born_dirs.discard(path)
        for path in [p for p in self.wh_devices if p == key or p.startswith(prefix)]:
            self.wh_devices.discard(path)

    def _remove(
        self, parent_fd: int, name: str, key: str, st: os.stat_result | None = None
    ) -> None:
        """Remove the existing entry ``key`` (a duplicate: the later entry wins)."""
        if st is None:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            self._forget_tree(key)
            if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - Linux has it
                raise StorageError("cannot remove a directory safely on this platform")
            shutil.rmtree(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)
            self.wh_devices.discard(key)
        self.hidden.add(key)

    def _create(self, parent_fd: int, name: str, key: str, make: Callable[[], _T]) -> _T:
        """Create a non-directory with ``make``; an existing entry is removed first."""
        try:
            return make()
        except FileExistsError:
            self._remove(parent_fd, name, key)
        return make()

    # --- entries ------------------------------------------------------------------------

    def _entry(self, tar: tr.TarReader, member: tr.TarEntry) -> None:
        parts = _split(member.name)
        kind = member.type
        if not parts:
            if kind != tr.DIRTYPE:
                raise UnsafeLayerError(
                    f"layer entry {_printable(member.name)!r} would replace the layer root "
                    "with a non-directory"
                )
            self.root_meta = _meta(member)
            self._set_xattrs(self.root_fd, member, ".")
            return
        key = "/".join(parts)
        if _WH_PREFIX in key:  # rare: only then look at each component
            for part in parts[:-1]:
                if part.startswith(_WH_PREFIX):
                    raise UnsafeLayerError(
                        f"layer entry {_printable(member.name)!r} lies below a whiteout name"
                    )
        if parts[-1].startswith(_WH_PREFIX):
            self._whiteout(member, parts, key)
        elif member.isreg():
            self._file(tar, member, parts, key)
        elif kind == tr.DIRTYPE:
            self._directory(member, parts, key)
        elif kind == tr.SYMTYPE:
            self._symlink(member, parts, key)
        elif kind == tr.LNKTYPE:
            self._hardlink(member, parts, key)
        elif kind in (tr.CHRTYPE, tr.BLKTYPE, tr.FIFOTYPE):
            self._special(member, parts, key)
        else:
            self._warn(f"skipped entry of unsupported tar type {kind!r}", key)

    def _file(self, tar: tr.TarReader, member: tr.TarEntry, parts: list[str], key: str) -> None:
        meta = _meta(member)
        xattrs = self._xattrs(member, key)
        name = parts[-1]
        pfd = self._dir_fd(parts[:-1])
        mode = meta.mode
        defaults = self.defaults
        born = defaults is not None and defaults.gives_file(mode, meta.uid, meta.gid)
        create_mode = mode if born else 0o600
        try:
            fd = os.open(name, _CREATE_FILE, create_mode, dir_fd=pfd)
        except FileExistsError:  # a duplicate entry: the later one wins
            self._remove(pfd, name, key)
            fd = os.open(name, _CREATE_FILE, create_mode, dir_fd=pfd)
        try:
            size = member.size
            if size > 0 and member.sparse is None:
                _write_data(tar, member, fd, size)  # in chunks; _copy: sparse maps
            elif size or member.sparse is not None:
                self._copy(tar, member, fd)
            if not born:
                if self.options.same_owner:
                    os.fchown(fd, meta.uid, meta.gid)  # before chmod: chown clears setuid
                os.fchmod(fd, mode)
            for attr, value in xattrs:  # after chown: chown drops security.capability
                self._setxattr(fd, attr, value, key)
            os.utime(fd, ns=(meta.mtime_ns or 0, meta.mtime_ns or 0))
        finally:
            os.close(fd)
        self.size += member.size

    def _copy(self, tar: tr.TarReader, member: tr.TarEntry, fd: int) -> None:
        """Copy the member's data from the tar stream into ``fd``, in bounded chunks."""
        if member.size < 0:
            raise LayerFormatError(f"layer entry {_printable(member.name)!r} has a negative size")
        sparse = member.sparse
        regions = [(0, member.size)] if sparse is None else sparse
        end = 0
        for offset, length in regions:
            if length == 0 and sparse is not None:
                continue  # GNU 'S' headers pad their 4 slots with (0, 0)
            if offset < end or length < 0 or offset + length > member.size:
                raise LayerFormatError(
                    f"layer entry {_printable(member.name)!r} has an invalid sparse map"
                )
            end = offset + length
            if sparse is not None:
                os.lseek(fd, offset, os.SEEK_SET)  # holes stay holes
            _write_data(tar, member, fd, length)
        if sparse is not None:
            os.ftruncate(fd, member.size)

    def _directory(self, member: tr.TarEntry, parts: list[str], key: str) -> None:
        meta = _meta(member)
        name = parts[-1]
        pfd = self._dir_fd(parts[:-1])
        born = self._born_dir(meta)
        create_mode = meta.mode if born else _DIR_CREATE_MODE
        created = True
        try:
            os.mkdir(name, create_mode, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                created = False  # both directories: merge, the later metadata wins
            else:
                self._remove(pfd, name, key, st)
                os.mkdir(name, create_mode, dir_fd=pfd)
        self.dirs[key] = meta
        if created and born:
            self.born_dirs.add(key)
        else:  # made earlier, with what an earlier entry (or none) said
            self.born_dirs.discard(key)
        fd = self._dir_fd(parts, create=False)
        if created:
            self._new_dir(pfd, name, key, fd)
        self._set_xattrs(fd, member, key)

    def _symlink(self, member: tr.TarEntry, parts: list[str], key: str) -> None:
        target = member.linkname
        if not target or "\x00" in target:
            raise UnsafeLayerError(f"symlink {_printable(key)!r} has an empty or invalid target")
        meta = _meta(member)
        self._no_xattrs(member, key)
        name = parts[-1]
        pfd = self._dir_fd(parts[:-1])
        # The target is stored verbatim and never resolved here.
        self._create(pfd, name, key, lambda: os.symlink(target, name, dir_fd=pfd))
        if self.options.same_owner:
            os.chown(name, meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
        mtime = meta.mtime_ns or 0
        os.utime(name, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, member: tr.TarEntry, parts: list[str], key: str) -> None:
        shown = _printable(key)
        try:
            tparts = _split(member.linkname)
        except UnsafeLayerError as exc:
            raise UnsafeLayerError(f"hardlink {shown!r}: {exc.message}") from None
        if not tparts:
            raise UnsafeLayerError(f"hardlink {shown!r} points at the layer root")
        if any(p.startswith(_WH_PREFIX) for p in tparts):
            raise UnsafeLayerError(f"hardlink {shown!r} points at a whiteout")
        tkey = "/".join(tparts)
        if tkey == key or tkey.startswith(key + "/"):
            raise UnsafeLayerError(f"hardlink {shown!r} points at itself or below itself")
        missing = UnsafeLayerError(
            f"hardlink {shown!r}: target {_printable(tkey)!r} is not an entry of this layer"
        )
        if tkey in self.wh_devices:
            raise missing
        tname = tparts[-1]
        try:
            tpfd = self._dir_fd(tparts[:-1], create=False)
            st = os.stat(tname, dir_fd=tpfd, follow_symlinks=False)
        except _Missing:
            raise missing from None
        except FileNotFoundError:
            raise missing from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeLayerError(f"hardlink {shown!r} points at a directory")
        name = parts[-1]
        pfd = self._dir_fd(parts[:-1])
        try:
            # follow_symlinks=False: a link to a symlink links the symlink itself.
            self._create(
                pfd,
                name,
                key,
                lambda: os.link(
                    tname, name, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False
                ),
            )
        except FileNotFoundError:
            raise missing from None
        # No owner, mode, time or xattr goes through a hardlink entry: it would change the
        # target's inode, which the target's own entry already set.

    def _special(self, member: tr.TarEntry, parts: list[str], key: str) -> None:
        kind = member.type
        if kind == tr.CHRTYPE and member.devmajor == 0 and member.devminor == 0:
            raise UnsafeLayerError(
                f"layer entry {_printable(key)!r} is a 0/0 character device (reads as a whiteout)"
            )
        if kind != tr.FIFOTYPE:
            if not self.options.devices:
                self._warn("skipped device node (devices disabled)", key)
                return
            if not (0 <= member.devmajor <= _MAX_MAJOR and 0 <= member.devminor <= _MAX_MINOR):
                raise UnsafeLayerError(f"device {_printable(key)!r} has an invalid number")
        meta = _meta(member)
        self._no_xattrs(member, key)
        name = parts[-1]
        pfd = self._dir_fd(parts[:-1])
        if kind == tr.FIFOTYPE:
            self._create(pfd, name, key, lambda: os.mkfifo(name, 0o600, dir_fd=pfd))
        else:
            fmt = stat.S_IFCHR if kind == tr.CHRTYPE else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            self._create(pfd, name, key, lambda: os.mknod(name, fmt | 0o600, device, dir_fd=pfd))
        if self.options.same_owner:
            os.chown(name, meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
        try:
            os.chmod(name, meta.mode, dir_fd=pfd, follow_symlinks=False)
        except NotImplementedError:  # pragma: no cover - old libc
            # The node was created by us an instant ago in our private directory.
            os.chmod(name, meta.mode, dir_fd=pfd)
        mtime = meta.mtime_ns or 0
        os.utime(name, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)

    # --- whiteouts ----------------------------------------------------------------------

    def _whiteout(self, member: tr.TarEntry, parts: list[str], key: str) -> None:
        base = parts[-1]
        shown = _printable(key)
        if not (member.isreg() or member.type == tr.LNKTYPE):
            raise UnsafeLayerError(f"whiteout {shown!r} is not a regular file")
        dparts = parts[:-1]
        victim = base[len(_WH_PREFIX) :]
        if base != _WH_OPAQUE and (base.startswith(_WH_META_PREFIX) or victim in ("", ".", "..")):
            raise UnsafeLayerError(f"invalid whiteout {shown!r}")
        try:
            self._dir_fd(dparts)
        except _ParentNotDirectory:
            # umoci writes the whiteouts of a replaced directory's old children below the
            # file or symlink that replaced it. That entry already hides the whole lower
            # path, so the markers have nothing left to hide: skip them, following nothing.
            return
        if base == _WH_OPAQUE:
            self._opaque(member, dparts, key)
            return
        vkey = "/".join([*dparts, victim])
        self.hidden.add(vkey)
        if not self.overlay:
            self._marker(member, dparts, base, key)
            return
        if "/".join(dparts) in self.opaque_dirs:
            return  # see _opaque: the directory already hides every lower entry
        pfd = self._dir_fd(dparts)
        try:
            os.mknod(victim, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
        except FileExistsError:
            # A real entry of this layer stays; a directory must now hide lower content.
            st = os.stat(victim, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.setxattr(self._dir_fd([*dparts, victim], create=False), _OPAQUE_XATTR, b"y")
            return
        self.wh_devices.add(vkey)
        mtime = _mtime_ns(member)
        os.utime(victim, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)

    def _opaque(self, member: tr.TarEntry, dparts: list[str], key: str) -> None:
        if not dparts:
            self.opaque_root = True
        if not self.overlay:
            self._marker(member, dparts, _WH_OPAQUE, key)
            return
        dfd = self._dir_fd(dparts)
        os.setxattr(dfd, _OPAQUE_XATTR, b"y")
        # Whiteout devices beside an opaque marker hide nothing more, and overlayfs lists
        # them as unstat-able entries in a directory only this layer provides: drop them.
        dkey = "/".join(dparts)
        self.opaque_dirs.add(dkey)
        for path in [p for p in self.wh_devices if p.rpartition("/")[0] == dkey]:
            os.unlink(path.rpartition("/")[2], dir_fd=dfd)
            self.wh_devices.discard(path)

    def _marker(self, member: tr.TarEntry, dparts: list[str], base: str, key: str) -> None:
        """OCI form: keep the marker as an empty regular file of its own name."""
        pfd = self._dir_fd(dparts)
        fd = self._create(
            pfd, base, key, lambda: os.open(base, _CREATE_FILE, _MARKER_MODE, dir_fd=pfd)
        )
        try:
            os.fchmod(fd, _MARKER_MODE)
            mtime = _mtime_ns(member)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)

    # --- xattrs -------------------------------------------------------------------------

    def _xattrs(self, member: tr.TarEntry, key: str) -> list[tuple[str, bytes]]:
        """The xattrs we keep: ``user.*`` and ``security.capability``; others are dropped
        with a warning, overlay ones always."""
        headers = member.pax_headers
        if not headers:
            return []
        kept = []
        for keyword, value in headers.items():
            if keyword.startswith(_PAX_XATTR):
                attr = keyword[len(_PAX_XATTR) :]
                if attr.startswith(_OVERLAY_XATTR_PREFIXES):
                    self._warn(f"dropped overlay xattr {attr!r}", key)
                elif attr == "security.capability" or attr.startswith("user."):
                    kept.append((attr, value.encode("utf-8", "surrogateescape")))
                else:
                    self._warn(f"dropped xattr {attr!r} (only user.* and security.capability)", key)
            elif keyword.startswith(_PAX_LIBARCHIVE_XATTR):
                self._warn("dropped LIBARCHIVE.xattr header (unsupported encoding)", key)
        return kept

    def _set_xattrs(self, fd: int, member: tr.TarEntry, key: str) -> None:
        for attr, value in self._xattrs(member, key):
            self._setxattr(fd, attr, value, key)

    def _setxattr(self, fd: int, attr: str, value: bytes, key: str) -> None:
        try:
            os.setxattr(fd, attr, value)
        except OSError as exc:
            self._warn(f"could not set xattr {attr!r} ({exc.strerror})", key)

    def _no_xattrs(self, member: tr.TarEntry, key: str) -> None:
        if self._xattrs(member, key):
            self._warn("dropped xattrs of a symlink or special file", key)

    # --- the end ------------------------------------------------------------------------

    def _finish(self) -> None:
        """Directories' owner, mode and mtime last, each after everything below it, so
        read-only directories and directory mtimes survive their children's creation; the
        root entry last.

        self.dirs holds every directory after its parent (a directory is recorded when it
        is made, and its parent exists, recorded, by then; a removed subtree leaves the
        dict with it), so its reverse order visits children first, and mostly a subtree's
        directories one after another, which keeps their parents' descriptors cached."""
        for key in reversed(self.dirs):
            meta = self.dirs[key]
            mtime = meta.mtime_ns
            born = key in self.born_dirs
            if born and mtime is None:
                continue  # an implicit parent made as it should end: nothing to set
            self._evict()
            self.current = key
            if born and mtime is not None:
                parent, _, name = key.rpartition("/")
                pfd = self._dir_fd(parent.split("/") if parent else [], create=False)
                # Through the parent: one syscall, where opening the directory is three.
                os.utime(name, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)
            else:
                self._apply_dir_meta(self._dir_fd(key.split("/"), create=False), meta)
        if self.root_meta is not None:
            self.current = "."
            self._apply_dir_meta(self.root_fd, self.root_meta)
        self.current = ""

    def _born_dir(self, meta: _Meta) -> bool:
        """Whether mkdir can give a directory its final owner and mode at once."""
        defaults = self.defaults
        return defaults is not None and defaults.gives_dir(meta.mode, meta.uid, meta.gid)

    def _apply_dir_meta(self, fd: int, meta: _Meta) -> None:
        if self.options.same_owner:
            os.fchown(fd, meta.uid, meta.gid)
        os.fchmod(fd, meta.mode)
        if meta.mtime_ns is not None:
            os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
