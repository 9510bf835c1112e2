"""Compose an image's layer directories into one tree, as overlayfs would show them.

Each layer is unpacked into its own directory (see ``docs/unpack.md``); this module stacks
those directories and answers what the image's root filesystem contains, without ever
building it on disk first. Three drivers share this one view:

* :class:`ComposedTree` walks, lists, looks up (symlinks resolved inside the image, like a
  chroot) and opens files straight from the layer directories;
* :func:`materialize` copies the composed tree into a directory (reflinks when possible);
* :func:`ocistore.export.export_tar` streams it as one PAX tar;

and :func:`lowerdir_option` gives the kernel's overlayfs the same stack. The kernel is the
oracle: every rule here is what overlayfs does with the layer directories as lowerdirs, plus
the one thing it cannot do (an opaque marker on a layer's root cuts the stack). See
``docs/compose.md``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator, Sequence
from typing import BinaryIO, NamedTuple

from ocistore.errors import PathNotFoundError, StorageError
from ocistore.fsutil import creation_defaults
from ocistore.whiteouts import WhiteoutFormat

__all__ = [
    "ComposedTree",
    "LayerView",
    "Node",
    "effective_layers",
    "kept_xattr",
    "lowerdir_option",
    "materialize",
]

#: ``ioctl(dest, FICLONE, src)``: share the source's extents (btrfs, XFS, bcachefs...).
FICLONE = 0x40049409
#: Largest number of symlinks followed in one lookup (Linux's MAXSYMLINKS).
MAX_SYMLINK_HOPS = 40
#: File data is streamed in chunks of this size when the kernel cannot copy it for us.
CHUNK_SIZE = 1 << 20

_WH = b".wh."
_WH_OPAQUE = b".wh..wh..opq"
_OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT_DEV = os.makedev(0, 0)

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_SOURCE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_CREATE_MODE = 0o700
# errnos that mean "this way of copying is not available here": try the next way.
_NO_REFLINK = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF}
)
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})
_NO_XATTR = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EACCES})


class LayerView(NamedTuple):
    """One unpacked layer directory as the composer reads it."""

    #: the layer directory
    path: str
    #: how whiteouts are stored in it (one form per directory)
    whiteouts: WhiteoutFormat
    #: the layer had ``.wh..wh..opq`` at its top: it hides every lower layer
    opaque_root: bool = False


def effective_layers(layers: Sequence[LayerView]) -> list[LayerView]:
    """The layers that count, base first: everything from the topmost ``opaque_root`` layer
    up (overlayfs ignores an opaque root, so the stack itself is cut below it)."""
    start = 0
    for index, layer in enumerate(layers):
        if layer.opaque_root:
            start = index
    return list(layers[start:])


def lowerdir_option(layers: Sequence[LayerView]) -> list[str]:
    """Layer paths for overlayfs ``lowerdir=``, TOP FIRST, cut at the topmost opaque root.

    Join them with ``:`` only if no path holds ``:``, ``,`` or ``\\``; for long stacks see
    ``docs/compose.md`` (one page of mount options is the limit)."""
    return [layer.path for layer in reversed(effective_layers(layers))]


class Node(NamedTuple):
    """One entry of the composed tree."""

    #: "/"-joined path relative to the image root ("" is the root); surrogate-escaped str
    path: str
    #: index into the effective layers (base first) of the layer providing the entry
    layer: int
    #: absolute path of the entry inside that layer directory
    source: str
    #: lstat of ``source``
    stat: os.stat_result


# --- the merge --------------------------------------------------------------------------

# A directory of the composed tree is a list of real directories, one per layer that
# contributes to it, TOP FIRST: (layer index, absolute path as bytes).
_Dirs = list[tuple[int, bytes]]


class _Child:
    """An entry of a composed directory: the topmost real entry and, for a directory, the
    real directories below it that merge into it."""

    __slots__ = ("dirs", "entry", "is_dir", "layer", "merging", "name", "parent", "st")

    def __init__(
        self,
        name: bytes,
        layer: int,
        parent: bytes,
        is_dir: bool,
        entry: os.DirEntry[bytes] | None = None,
        st: os.stat_result | None = None,
    ) -> None:
        self.name = name
        self.layer = layer
        self.parent = parent  # the real directory holding it, in layer ``layer``
        self.is_dir = is_dir
        self.entry = entry
        self.st = st
        self.dirs: _Dirs = [(layer, parent + b"/" + name)] if is_dir else []
        # True while lower directories at this path still merge into it.
        self.merging = is_dir

    @property
    def source(self) -> bytes:
        return self.parent + b"/" + self.name

    def stat(self) -> os.stat_result:
        st = self.st
        if st is None:
            entry = self.entry
            st = entry.stat(follow_symlinks=False) if entry is not None else os.lstat(self.source)
            self.st = st
        return st


_HIDDEN = _Child(b"", -1, b"", False)  # a name whited out above: lower layers cannot show it


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == _WHITEOUT_DEV


class ComposedTree:
    """The union of an image's layer directories (base first), read without copying."""

    def __init__(self, layers: Sequence[LayerView]) -> None:
        self.layers: list[LayerView] = effective_layers(layers)
        if not self.layers:
            raise ValueError("cannot compose an image without layers")
        self._paths = [os.fsencode(os.path.abspath(layer.path)) for layer in self.layers]
        self._oci = [layer.whiteouts is WhiteoutFormat.OCI for layer in self.layers]
        top = len(self.layers) - 1
        self._root_dirs: _Dirs = [(k, self._paths[k]) for k in range(top, -1, -1)]

    # --- public API ---------------------------------------------------------------------

    def walk(self) -> Iterator[Node]:
        """Every entry, root first, parents before children, names sorted bytewise. Only
        the directories on the way down are listed in memory at any time."""
        yield self._node(b"", self._root())
        stack: list[tuple[bytes, Iterator[_Child]]] = [
            (b"", iter(self._list(self._root_dirs, root=True)))
        ]
        while stack:
            prefix, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                continue
            rel = prefix + b"/" + child.name if prefix else child.name
            yield self._node(rel, child)
            if child.is_dir:
                stack.append((rel, iter(self._list(child.dirs))))

    def listdir(self, path: str) -> list[Node]:
        """The children of the directory ``path`` (symlinks followed), sorted bytewise."""
        rel, child = self._resolve(path, follow=True)
        if not child.is_dir:
            raise PathNotFoundError(f"{_shown(path)}: not a directory in the image")
        prefix = rel + b"/" if rel else b""
        return [self._node(prefix + c.name, c) for c in self._list(child.dirs, root=not rel)]

    def lookup(self, path: str, *, follow_symlinks: bool = True) -> Node:
        """The entry at ``path``, resolved inside the image: absolute symlink targets and
        ``..`` are relative to the image root and stop there, like a chroot. Intermediate
        symlinks are always followed, the last one only with ``follow_symlinks``."""
        rel, child = self._resolve(path, follow=follow_symlinks)
        return self._node(rel, child)

    def open(self, path: str) -> BinaryIO:
        """Open the regular file at ``path`` (symlinks followed inside the image) read-only."""
        node = self.lookup(path)
        if not stat.S_ISREG(node.stat.st_mode):
            what = "a directory" if stat.S_ISDIR(node.stat.st_mode) else "not a regular file"
            raise PathNotFoundError(f"{_shown(path)}: {what} in the image")
        try:
            fd = os.open(node.source, _OPEN_SOURCE)
        except OSError as exc:
            raise StorageError(f"cannot open {node.source}: {exc.strerror}") from exc
        return os.fdopen(fd, "rb")

    # --- internals ----------------------------------------------------------------------

    def _root(self) -> _Child:
        top = len(self.layers) - 1
        path = self._paths[top]
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise StorageError(f"cannot read layer directory {os.fsdecode(path)}: {exc}") from exc
        child = _Child(b"", top, b"", True, st=st)
        child.dirs = list(self._root_dirs)
        # The source of the root is the layer directory itself, not "<dir>/".
        child.parent, child.name = os.path.split(path)
        return child

    def _node(self, rel: bytes, child: _Child) -> Node:
        return Node(os.fsdecode(rel), child.layer, os.fsdecode(child.source), child.stat())

    def _opaque(self, layer: int, path: bytes) -> bool:
        """Does the real directory ``path`` of ``layer`` hide the layers below it?"""
        if self._oci[layer]:
            return os.path.lexists(path + b"/" + _WH_OPAQUE)
        try:
            return os.getxattr(path, _OPAQUE_XATTR, follow_symlinks=False) == b"y"
        except OSError:
            return False

    def _list(self, dirs: _Dirs, root: bool = False) -> list[_Child]:
        """Merge the real directories ``dirs`` (top first) into the composed listing.

        A name's topmost entry wins. Below a directory, the next layers' directories of the
        same name merge in until a layer has a whiteout, a non-directory, or a marker there;
        a directory of the list that is opaque stops the list itself. A whiteout or marker
        only ever hides lower layers. The root's own opaque marker is ignored here (the
        stack was already cut by :func:`effective_layers`).
        """
        found: dict[bytes, _Child] = {}
        last = len(dirs) - 1
        for i, (layer, path) in enumerate(dirs):
            oci = self._oci[layer]
            opaque = False
            markers: list[bytes] = []
            try:
                scan = os.scandir(path)
            except OSError as exc:
                raise StorageError(f"cannot list {os.fsdecode(path)}: {exc.strerror}") from exc
            with scan:
                for entry in scan:
                    name = entry.name
                    if oci and name.startswith(_WH):
                        if name == _WH_OPAQUE:
                            opaque = True
                        else:
                            markers.append(name[4:])
                        continue
                    is_dir = entry.is_dir(follow_symlinks=False)
                    whiteout = (
                        not is_dir
                        and not entry.is_file(follow_symlinks=False)
                        and not entry.is_symlink()
                        and _is_whiteout(entry.stat(follow_symlinks=False))
                    )
                    cur = found.get(name)
                    if cur is None:
                        if whiteout:
                            found[name] = _HIDDEN
                        else:
                            found[name] = _Child(name, layer, path, is_dir, entry)
                    elif cur.merging:
                        if is_dir:
                            cur.dirs.append((layer, path + b"/" + name))
                        else:
                            cur.merging = False
            for victim in markers:
                cur = found.get(victim)
                if cur is None:
                    found[victim] = _HIDDEN
                else:
                    cur.merging = False
            if i == last or root:
                continue
            if not oci:
                opaque = self._opaque(layer, path)
            if opaque:
                break
        children = [c for c in found.values() if c is not _HIDDEN]
        children.sort(key=_name_key)
        return children

    def _child(self, dirs: _Dirs, name: bytes, root: bool) -> _Child | None:
        """The composed entry ``name`` in the composed directory ``dirs`` (top first), or
        None. Same rules as :meth:`_list`, by lstat instead of listing."""
        found: _Child | None = None
        last = len(dirs) - 1
        for i, (layer, path) in enumerate(dirs):
            oci = self._oci[layer]
            source = path + b"/" + name
            st: os.stat_result | None = None
            if not (oci and name.startswith(_WH)):
                try:
                    st = os.lstat(source)
                except (FileNotFoundError, NotADirectoryError):
                    st = None
                except OSError as exc:
                    raise StorageError(
                        f"cannot read {os.fsdecode(source)}: {exc.strerror}"
                    ) from exc
            marked = oci and os.path.lexists(path + b"/" + _WH + name)
            if st is not None:
                whiteout = _is_whiteout(st)
                is_dir = stat.S_ISDIR(st.st_mode)
                if found is None:
                    if whiteout:
                        return None
                    found = _Child(name, layer, path, is_dir, st=st)
                    if not is_dir:
                        return found
                elif is_dir and not whiteout:
                    found.dirs.append((layer, source))
                else:
                    return found
            if marked:
                return found
            if i != last and not root and self._opaque(layer, path):
                return found
        return found

    def _resolve(self, path: str, follow: bool) -> tuple[bytes, _Child]:
        """Walk ``path`` from the image root, following symlinks inside the image."""
        root = self._root()
        # The directories walked into, from the root: (relative path, composed entry).
        stack: list[tuple[bytes, _Child]] = [(b"", root)]
        todo = [c for c in reversed(os.fsencode(path).split(b"/")) if c and c != b"."]
        hops = 0
        while todo:
            part = todo.pop()
            if part == b".":
                continue
            if part == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            rel, cur = stack[-1]
            if not cur.is_dir:
                raise PathNotFoundError(f"{_shown(path)}: {_shown_b(rel)} is not a directory")
            child = self._child(cur.dirs, part, root=len(stack) == 1)
            crel = rel + b"/" + part if rel else part
            if child is None:
                raise PathNotFoundError(f"{_shown(path)}: no such file or directory in the image")
            if stat.S_ISLNK(child.stat().st_mode) and (todo or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise PathNotFoundError(f"{_shown(path)}: too many levels of symbolic links")
                try:
                    target = os.readlink(child.source)
                except OSError as exc:
                    raise StorageError(
                        f"cannot read symlink {os.fsdecode(child.source)}: {exc.strerror}"
                    ) from exc
                if target.startswith(b"/"):
                    del stack[1:]
                todo.extend(c for c in reversed(target.split(b"/")) if c and c != b".")
                continue
            if todo and not child.is_dir:
                raise PathNotFoundError(f"{_shown(path)}: {_shown_b(crel)} is not a directory")
            stack.append((crel, child))
        return stack[-1]


def _name_key(child: _Child) -> bytes:
    return child.name


def _shown(path: str) -> str:
    """A path as printable text (non-UTF-8 bytes as \\x escapes)."""
    return repr(os.fsencode(path).decode("utf-8", "backslashreplace"))


def _shown_b(path: bytes) -> str:
    return repr(path.decode("utf-8", "backslashreplace") or "/")


# --- materialize --------------------------------------------------------------------------


def materialize(
    tree: ComposedTree, dest: str, *, reflink: bool = True, same_owner: bool | None = None
) -> None:
    """Build the composed tree in ``dest``, a new or empty directory.

    Nothing outside ``dest`` is touched: every entry is made relative to a descriptor of
    its parent, which was opened with ``O_NOFOLLOW``; nothing in ``dest`` is ever followed.
    Regular files are reflinked when ``reflink`` and the filesystem can, else copied by the
    kernel; hardlinks of one layer stay hardlinks; owners are kept when ``same_owner``
    (default: when root); devices are made only by root (skipped otherwise).
    Directories get their mode and mtime once everything below them is written.
    """
    if same_owner is None:
        same_owner = os.geteuid() == 0
    root_fd = _open_dest(dest)
    try:
        _Materializer(tree, root_fd, dest, reflink, same_owner).run()
    finally:
        os.close(root_fd)


def _open_dest(dest: str) -> int:
    try:
        os.mkdir(dest, _DIR_CREATE_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StorageError(f"cannot create {dest}: {exc.strerror}") from exc
    try:
        fd = os.open(dest, _OPEN_DIR)
    except OSError as exc:
        raise StorageError(f"cannot open {dest} as a directory: {exc.strerror}") from exc
    try:
        with os.scandir(fd) as scan:
            if next(scan, None) is not None:
                raise StorageError(f"{dest} is not empty")
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Materializer:
    def __init__(
        self, tree: ComposedTree, root_fd: int, dest: str, reflink: bool, same_owner: bool
    ) -> None:
        self.tree = tree
        self.root_fd = root_fd
        self.dest = dest
        self.reflink = reflink
        self.copy_range = True
        self.same_owner = same_owner
        # Entries whose final mode and owner are what creating them gives need no fchown
        # or fchmod (see fsutil.CreationDefaults); directories must also stay writable.
        self.defaults = creation_defaults(root_fd, same_owner)
        self.devices = os.geteuid() == 0
        # (layer, st_dev, st_ino) of a multiply-linked source -> its first copy (from root).
        self.links: dict[tuple[int, int, int], bytes] = {}
        self.current = b""

    def run(self) -> None:
        tree = self.tree
        root = tree._root()
        try:
            self._copy_xattrs(root.source, self.root_fd)
            # (relative path, descriptor, entry, children still to make, made with its
            # final owner and mode)
            stack: list[tuple[bytes, int, _Child, Iterator[_Child], bool]] = [
                (b"", self.root_fd, root, iter(tree._list(root.dirs, root=True)), False)
            ]
            try:
                while stack:
                    rel, dfd, parent, children, born = stack[-1]
                    child = next(children, None)
                    if child is None:
                        stack.pop()
                        self.current = rel
                        self._dir_meta(dfd, parent.stat(), born)
                        if dfd != self.root_fd:
                            os.close(dfd)
                        continue
                    crel = rel + b"/" + child.name if rel else child.name
                    self.current = crel
                    if child.is_dir:
                        fd, born = self._mkdir(dfd, child)
                        try:
                            listing = iter(tree._list(child.dirs))
                        except BaseException:
                            os.close(fd)
                            raise
                        stack.append((crel, fd, child, listing, born))
                    else:
                        self._non_dir(dfd, child, crel)
            finally:
                for _, fd, _, _, _ in stack:
                    if fd != self.root_fd:
                        os.close(fd)
        except OSError as exc:
            where = os.fsdecode(self.current) or "."
            raise StorageError(
                f"cannot materialize {where!r} into {self.dest}: {exc.strerror or exc}"
            ) from exc

    def _mkdir(self, dfd: int, child: _Child) -> tuple[int, bool]:
        """Make the directory; returns its descriptor and whether it already has its final
        owner and mode (else it is 0700 until _dir_meta)."""
        name = child.name
        st = child.stat()
        mode = stat.S_IMODE(st.st_mode)
        defaults = self.defaults
        born = defaults is not None and defaults.gives_dir(mode, st.st_uid, st.st_gid)
        os.mkdir(name, mode if born else _DIR_CREATE_MODE, dir_fd=dfd)
        fd = os.open(name, _OPEN_DIR, dir_fd=dfd)
        try:
            self._copy_xattrs(child.source, fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, born

    def _dir_meta(self, fd: int, st: os.stat_result, born: bool) -> None:
        if not born:
            if self.same_owner:
                os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
        os.utime(fd, ns=(st.st_mtime_ns, st.st_mtime_ns))

    def _non_dir(self, dfd: int, child: _Child, rel: bytes) -> None:
        st = child.stat()
        name = child.name
        key = None
        if st.st_nlink > 1:
            key = (child.layer, st.st_dev, st.st_ino)
            first = self.links.get(key)
            if first is not None and self._link(first, dfd, name):
                return
        mode = st.st_mode
        mtime = st.st_mtime_ns
        if stat.S_ISREG(mode):
            self._file(dfd, child, st)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(child.source), name, dir_fd=dfd)
            if self.same_owner:
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
            os.utime(name, ns=(mtime, mtime), dir_fd=dfd, follow_symlinks=False)
        else:
            if stat.S_ISFIFO(mode):
                os.mkfifo(name, 0o600, dir_fd=dfd)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                if not self.devices:
                    return
                os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dfd)
            else:
                return  # sockets and the like: a tar cannot carry them either
            if self.same_owner:
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
            # The node was made by us an instant ago, in a directory only we write to.
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dfd)
            os.utime(name, ns=(mtime, mtime), dir_fd=dfd, follow_symlinks=False)
        if key is not None and key not in self.links:
            self.links[key] = rel

    def _link(self, first: bytes, dfd: int, name: bytes) -> bool:
        """Hardlink the first copy (path from dest's root, all real directories we made)."""
        try:
            os.link(first, name, src_dir_fd=self.root_fd, dst_dir_fd=dfd, follow_symlinks=False)
        except PermissionError:
            return False  # the first copy sits in a directory we already locked: copy again
        return True

    def _file(self, dfd: int, child: _Child, st: os.stat_result) -> None:
        mode = stat.S_IMODE(st.st_mode)
        defaults = self.defaults
        born = defaults is not None and defaults.gives_file(mode, st.st_uid, st.st_gid)
        src = os.open(child.source, _OPEN_SOURCE)
        try:
            out = os.open(child.name, _CREATE_FILE, mode if born else 0o600, dir_fd=dfd)
            try:
                if st.st_size:
                    self._copy_data(src, out, st)
                if not born:
                    if self.same_owner:
                        os.fchown(out, st.st_uid, st.st_gid)  # before chmod: chown clears setuid
                    os.fchmod(out, mode)
                self._copy_xattrs(src, out)  # after chown, which drops security.capability
                os.utime(out, ns=(st.st_mtime_ns, st.st_mtime_ns))
            finally:
                os.close(out)
        finally:
            os.close(src)

    def _copy_data(self, src: int, out: int, st: os.stat_result) -> None:
        if self.reflink:
            try:
                fcntl.ioctl(out, FICLONE, src)
                return
            except OSError as exc:
                if exc.errno not in _NO_REFLINK:
                    raise
                self.reflink = False
        size = st.st_size
        if st.st_blocks * 512 < size:
            self._copy_sparse(src, out, size)
            return
        if self.copy_range:
            copied = 0
            try:
                # Layer files do not change: stop at the size lstat gave (one call for most).
                while copied < size:
                    n = os.copy_file_range(src, out, size - copied)
                    if n == 0:
                        where = os.fsdecode(self.current)
                        raise StorageError(f"{where!r} shrank in its layer while being copied")
                    copied += n
                return
            except OSError as exc:
                if copied or exc.errno not in _NO_COPY_RANGE:
                    raise
                self.copy_range = False
        _copy_stream(src, out, 0, None)

    def _copy_sparse(self, src: int, out: int, size: int) -> None:
        """Copy only the data regions: holes stay holes, as ``cp -a`` keeps them."""
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole is left
                raise
            end = os.lseek(src, start, os.SEEK_HOLE)
            _copy_stream(src, out, start, end - start)
            offset = end
        os.ftruncate(out, size)

    def _copy_xattrs(self, src: int | bytes, out: int) -> None:
        """Copy ``user.*`` (not ``user.overlay.*``) and ``security.capability``."""
        try:
            names = (
                os.listxattr(src)
                if isinstance(src, int)
                else os.listxattr(src, follow_symlinks=False)
            )
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise
        for attr in names:
            if not kept_xattr(attr):
                continue
            if isinstance(src, int):
                value = os.getxattr(src, attr)
            else:
                value = os.getxattr(src, attr, follow_symlinks=False)
            try:
                os.setxattr(out, attr, value)
            except OSError as exc:
                # security.capability needs CAP_SETFCAP; user.* may be unsupported.
                if exc.errno not in _NO_XATTR:
                    raise


def kept_xattr(attr: str) -> bool:
    """The xattrs an image carries: ``user.*`` (not overlayfs's own) and file capabilities."""
    if attr.startswith("user."):
        return not attr.startswith("user.overlay.")
    return attr == "security.capability"


def _copy_stream(src: int, out: int, offset: int, length: int | None) -> None:
    """Copy ``length`` bytes (None: to the end) from ``offset`` in ``src`` to the same offset
    in ``out``, by pread/pwrite in bounded chunks."""
    while length is None or length > 0:
        want = CHUNK_SIZE if length is None else min(length, CHUNK_SIZE)
        data = os.pread(src, want, offset)
        if not data:
            return
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(out, view, pos)
            view = view[n:]
            pos += n
        offset += len(data)
        if length is not None:
            length -= len(data)
