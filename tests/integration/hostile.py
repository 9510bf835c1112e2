"""Hostile layer tars served as real images, for test_hostile_images.py.

* tar builders: ``F`` (file), ``D`` (directory), ``L`` (symlink), ``H`` (hardlink), ``C``/``B``
  (char/block device), ``P`` (FIFO) make members for :func:`build_tar`, which writes them
  with Python's ``tarfile`` exactly as given (``..``, absolute names, duplicates, PAX and
  global headers, non-UTF-8 names); :func:`ustar_header` writes a raw header block for what
  tarfile refuses to write (a ``..`` ustar prefix, a size the body does not have).
* :class:`HostileLayout`: one OCI layout, one tag per case. Each case's tars go in with
  ``umoci new`` + ``umoci raw add-layer``, and the result is checked: the layer blob must
  decompress to exactly our tar and the config's diffID must be its sha256, else the image
  is written by hand (blobs, config, manifest, ``index.json``). Broken gzip streams
  (truncated, trailing garbage) can only be written by hand: umoci gzips what it is given.
* :func:`push_all`: one ``skopeo copy --all --preserve-digests`` of an index holding every
  case, then each case's manifest is tagged in the registry by its own bytes.
* filesystem observation: :func:`tree` (what a directory holds) and :func:`snapshot` (full
  state with inodes, owners, times) for the canary.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from .images import MT_OCI_CONFIG, MT_OCI_INDEX, MT_OCI_MANIFEST, REF_NAME, run, sha256_digest
from .registryd import Registry

MTIME = 1_700_000_000
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
#: The tag of the index in the layout that holds every case (pushed with ``--all``).
ALL_TAG = "all-cases"

# --- tar members ---------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def _info(name: str, kind: bytes, mode: int, **kw: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = kw.pop("mtime", MTIME)
    ti.uid = kw.pop("uid", 0)
    ti.gid = kw.pop("gid", 0)
    ti.linkname = kw.pop("linkname", "")
    ti.devmajor = kw.pop("major", 0)
    ti.devminor = kw.pop("minor", 0)
    pax = kw.pop("pax", None)
    if pax:
        ti.pax_headers = dict(pax)
    if kw:
        raise TypeError(f"unknown member fields {sorted(kw)}")
    return ti


def F(name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Member:
    return _info(name, tarfile.REGTYPE, mode, **kw), data


def D(name: str, mode: int = 0o755, **kw: Any) -> Member:
    return _info(name, tarfile.DIRTYPE, mode, **kw), None


def L(name: str, target: str | os.PathLike[str], **kw: Any) -> Member:
    return _info(name, tarfile.SYMTYPE, 0o777, linkname=os.fspath(target), **kw), None


def H(name: str, target: str | os.PathLike[str], mode: int = 0o644, **kw: Any) -> Member:
    return _info(name, tarfile.LNKTYPE, mode, linkname=os.fspath(target), **kw), None


def C(name: str, major: int, minor: int, mode: int = 0o666) -> Member:
    return _info(name, tarfile.CHRTYPE, mode, major=major, minor=minor), None


def B(name: str, major: int, minor: int, mode: int = 0o660) -> Member:
    return _info(name, tarfile.BLKTYPE, mode, major=major, minor=minor), None


def P(name: str, mode: int = 0o644) -> Member:
    return _info(name, tarfile.FIFOTYPE, mode), None


def build_tar(
    members: Sequence[Member],
    *,
    fmt: int = tarfile.PAX_FORMAT,
    end: bool = True,
    global_pax: dict[str, str] | None = None,
) -> bytes:
    """The members as one tar, in order, names untouched (tarfile never normalises them)."""
    buf = io.BytesIO()
    tar = tarfile.open(  # noqa: SIM115 - left unclosed on purpose when end=False
        fileobj=buf,
        mode="w",
        format=fmt,
        pax_headers=global_pax or {},
        encoding="utf-8",
        errors="surrogateescape",
    )
    for info, data in members:
        if data is None:
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if end:
        tar.close()
    return buf.getvalue()


def ustar_header(
    name: bytes,
    *,
    typeflag: bytes = b"0",
    size: int = 0,
    prefix: bytes = b"",
    linkname: bytes = b"",
    mode: int = 0o644,
) -> bytes:
    """One raw ustar header block (for what tarfile will not write)."""
    h = bytearray(512)
    h[0:100] = name.ljust(100, b"\0")
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"%07o\0" % 0
    h[116:124] = b"%07o\0" % 0
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % MTIME
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:257] = linkname.ljust(100, b"\0")
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[345:500] = prefix.ljust(155, b"\0")
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


#: Two zero blocks: the end-of-archive marker.
END = b"\0" * 1024


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


@dataclass(frozen=True)
class BrokenBlob:
    """A layer whose blob is not simply gzip(tar): written by hand into the layout."""

    tar: bytes
    blob: bytes


Layer = bytes | BrokenBlob


# --- the OCI layout --------------------------------------------------------------------------


@dataclass
class BuiltCase:
    tag: str
    manifest_digest: str
    manifest: bytes
    diff_ids: list[str]
    layer_digests: list[str]
    by_hand: bool
    why_by_hand: str = ""


@dataclass
class HostileLayout:
    """An OCI layout under ``path`` holding one tagged image per case."""

    path: Path
    work: Path
    built: dict[str, BuiltCase] = field(default_factory=dict)

    @classmethod
    def create(cls, path: Path, work: Path) -> HostileLayout:
        run(["umoci", "--log", "error", "init", "--layout", path])
        work.mkdir(parents=True, exist_ok=True)
        return cls(path, work)

    # -- reading the layout --------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        algorithm, hex_ = digest.split(":", 1)
        return self.path / "blobs" / algorithm / hex_

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def _index(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.path / "index.json").read_text())
        return doc

    def _write_index(self, doc: dict[str, Any]) -> None:
        tmp = self.path / "index.json.tmp"
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        tmp.replace(self.path / "index.json")

    def _tagged(self, tag: str) -> dict[str, Any]:
        for entry in self._index()["manifests"]:
            if (entry.get("annotations") or {}).get(REF_NAME) == tag:
                return dict(entry)
        raise KeyError(tag)

    def _put_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            path.write_bytes(data)
        return digest

    # -- adding cases ----------------------------------------------------------------------
    def add(self, tag: str, layers: Sequence[Layer]) -> BuiltCase:
        """Add the image ``tag`` made of ``layers`` (base first): through umoci when every
        layer is a plain tar and umoci keeps it byte for byte, else by hand."""
        if any(isinstance(layer, BrokenBlob) for layer in layers):
            case = self._by_hand(tag, layers, "its blob is not gzip(tar): umoci cannot write it")
        else:
            tars = [layer for layer in layers if isinstance(layer, bytes)]
            why = self._try_umoci(tag, tars)
            case = self._by_hand(tag, layers, why) if why else self._describe(tag, by_hand=False)
        self.built[tag] = case
        return case

    def _try_umoci(self, tag: str, tars: Sequence[bytes]) -> str:
        """Build with umoci; returns why it could not be used ("" when it was)."""
        image = f"{self.path}:{tag}"
        run(["umoci", "--log", "error", "new", "--image", image])
        for i, data in enumerate(tars):
            tar_path = self.work / f"{tag}-{i}.tar"
            tar_path.write_bytes(data)
            proc = _run_quiet(
                [
                    "umoci",
                    "--log",
                    "error",
                    "raw",
                    "add-layer",
                    "--history.created",
                    "2024-01-01T00:00:00Z",
                    "--image",
                    image,
                    str(tar_path),
                ]
            )
            if proc is not None:
                self._untag(tag)
                return f"umoci raw add-layer refused layer {i}: {proc}"
        case = self._describe(tag, by_hand=False)
        if len(case.layer_digests) != len(tars):
            self._untag(tag)
            return f"umoci made {len(case.layer_digests)} layers of {len(tars)}"
        for i, (data, blob_digest, diff_id) in enumerate(
            zip(tars, case.layer_digests, case.diff_ids, strict=True)
        ):
            try:
                unpacked = gzip.decompress(self.read_blob(blob_digest))
            except (OSError, EOFError) as exc:
                self._untag(tag)
                return f"umoci wrote layer {i} as something that is not gzip: {exc}"
            if unpacked != data or diff_id != sha256_digest(data):
                self._untag(tag)
                return f"umoci rewrote layer {i}"
        return ""

    def _untag(self, tag: str) -> None:
        doc = self._index()
        doc["manifests"] = [
            e for e in doc["manifests"] if (e.get("annotations") or {}).get(REF_NAME) != tag
        ]
        self._write_index(doc)

    def _describe(self, tag: str, *, by_hand: bool, why: str = "") -> BuiltCase:
        entry = self._tagged(tag)
        raw = self.read_blob(entry["digest"])
        manifest = json.loads(raw)
        config = json.loads(self.read_blob(manifest["config"]["digest"]))
        return BuiltCase(
            tag=tag,
            manifest_digest=entry["digest"],
            manifest=raw,
            diff_ids=list(config["rootfs"]["diff_ids"]),
            layer_digests=[d["digest"] for d in manifest["layers"]],
            by_hand=by_hand,
            why_by_hand=why,
        )

    def add_by_hand(
        self, tag: str, layers: Sequence[Layer], *, diff_ids: Sequence[str] | None = None
    ) -> BuiltCase:
        """Write the image by hand; ``diff_ids`` replaces the true diffIDs in its config
        (a config that lies about its layers)."""
        case = self._by_hand(tag, layers, "asked for", diff_ids)
        self.built[tag] = case
        return case

    def add_index(self, tag: str, entries: Sequence[tuple[str, dict[str, str]]]) -> str:
        """Tag an image index of already added images: (their tag, platform) pairs."""
        manifests = []
        for image_tag, platform in entries:
            case = self.built[image_tag]
            manifests.append(
                {
                    "mediaType": MT_OCI_MANIFEST,
                    "digest": case.manifest_digest,
                    "size": len(case.manifest),
                    "platform": platform,
                }
            )
        index = json.dumps(
            {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests},
            separators=(",", ":"),
        ).encode()
        digest = self._put_blob(index)
        doc = self._index()
        doc["manifests"].append(
            {
                "mediaType": MT_OCI_INDEX,
                "digest": digest,
                "size": len(index),
                "annotations": {REF_NAME: tag},
            }
        )
        self._write_index(doc)
        return digest

    def _by_hand(
        self,
        tag: str,
        layers: Sequence[Layer],
        why: str,
        config_diff_ids: Sequence[str] | None = None,
    ) -> BuiltCase:
        descriptors = []
        diff_ids = []
        for layer in layers:
            if isinstance(layer, BrokenBlob):
                data, blob = layer.tar, layer.blob
            else:
                data, blob = layer, gzip_bytes(layer)
            descriptors.append(
                {"mediaType": MT_LAYER_GZIP, "digest": self._put_blob(blob), "size": len(blob)}
            )
            diff_ids.append(sha256_digest(data))
        config = json.dumps(
            {
                "created": "2024-01-01T00:00:00Z",
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {
                    "type": "layers",
                    "diff_ids": list(config_diff_ids) if config_diff_ids is not None else diff_ids,
                },
            },
            separators=(",", ":"),
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MT_OCI_MANIFEST,
                "config": {
                    "mediaType": MT_OCI_CONFIG,
                    "digest": self._put_blob(config),
                    "size": len(config),
                },
                "layers": descriptors,
            },
            separators=(",", ":"),
        ).encode()
        digest = self._put_blob(manifest)
        doc = self._index()
        doc["manifests"].append(
            {
                "mediaType": MT_OCI_MANIFEST,
                "digest": digest,
                "size": len(manifest),
                "annotations": {REF_NAME: tag},
            }
        )
        self._write_index(doc)
        return self._describe(tag, by_hand=True, why=why)

    def index_all(self) -> str:
        """Tag ``ALL_TAG``: an index of every case's manifest (what skopeo pushes)."""
        entries = [
            {"mediaType": MT_OCI_MANIFEST, "digest": c.manifest_digest, "size": len(c.manifest)}
            for c in self.built.values()
        ]
        index = json.dumps(
            {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries},
            separators=(",", ":"),
        ).encode()
        digest = self._put_blob(index)
        doc = self._index()
        doc["manifests"].append(
            {
                "mediaType": MT_OCI_INDEX,
                "digest": digest,
                "size": len(index),
                "annotations": {REF_NAME: ALL_TAG},
            }
        )
        self._write_index(doc)
        return digest


def _run_quiet(cmd: Sequence[str | os.PathLike[str]]) -> str | None:
    """Run; None on success, else the tail of stderr."""
    import subprocess

    proc = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, check=False)
    if proc.returncode == 0:
        return None
    return proc.stderr.decode(errors="replace").strip()[-300:] or f"exit {proc.returncode}"


def push_all(registry: Registry, layout: HostileLayout, repo: str) -> None:
    """Push every case in one skopeo run (the ``ALL_TAG`` index, ``--all``, digests kept),
    then tag each case's manifest with its own, unchanged bytes."""
    layout.index_all()
    registry.skopeo(
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        *registry.dest_args(),
        f"oci:{layout.path}:{ALL_TAG}",
        f"docker://{registry.host}/{repo}:{ALL_TAG}",
    )
    with requests.Session() as session:
        for case in layout.built.values():
            r = session.put(
                f"{registry.url}/v2/{repo}/manifests/{case.tag}",
                data=case.manifest,
                headers={"Content-Type": MT_OCI_MANIFEST},
                **registry.requests_kwargs(),
            )
            if r.status_code != 201:
                raise AssertionError(f"tagging {case.tag}: HTTP {r.status_code} {r.text[:300]}")
            served = r.headers.get("Docker-Content-Digest")
            if served != case.manifest_digest:
                raise AssertionError(f"{case.tag}: registry says {served}")


# --- observing the filesystem ----------------------------------------------------------------

Tree = dict[str, tuple[Any, ...]]


def _xattrs(path: bytes) -> dict[str, bytes]:
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
        if name != "security.selinux"
    }


def describe(path: str | bytes | os.PathLike[str]) -> tuple[Any, ...]:
    """``("d", perm)``, ``("f", perm, content)``, ``("l", target)``, ``("c"|"b", major,
    minor, perm)``, ``("p", perm)``; directories and files get their xattrs appended
    when they have any."""
    p = os.fsencode(path)
    st = os.lstat(p)
    perm = stat.S_IMODE(st.st_mode)
    out: tuple[Any, ...]
    if stat.S_ISDIR(st.st_mode):
        out = ("d", perm)
    elif stat.S_ISREG(st.st_mode):
        with open(p, "rb") as f:
            out = ("f", perm, f.read())
    elif stat.S_ISLNK(st.st_mode):
        return ("l", os.fsdecode(os.readlink(p)))
    elif stat.S_ISCHR(st.st_mode):
        out = ("c", os.major(st.st_rdev), os.minor(st.st_rdev), perm)
    elif stat.S_ISBLK(st.st_mode):
        out = ("b", os.major(st.st_rdev), os.minor(st.st_rdev), perm)
    elif stat.S_ISFIFO(st.st_mode):
        out = ("p", perm)
    else:  # pragma: no cover
        raise AssertionError(f"unexpected file type at {p!r}")
    xattrs = _xattrs(p)
    return (*out, xattrs) if xattrs else out


def tree(root: str | os.PathLike[str], ghosts: list[str] | None = None) -> Tree:
    """Every entry below ``root`` (not root itself), by relative path (str, surrogate
    escapes for non-UTF-8 bytes).

    With ``ghosts``, names that ``readdir`` lists but ``lstat`` cannot find (what overlayfs
    shows for a whiteout in a directory it does not merge) are collected there instead of
    failing."""
    base = os.fsencode(root)
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(full, base))
            try:
                out[rel] = describe(full)
            except FileNotFoundError:
                if ghosts is None:
                    raise
                ghosts.append(rel)
    return out


def snapshot(root: str | os.PathLike[str]) -> Tree:
    """Full state of a tree, root included: contents, modes, owners, sizes, inode numbers,
    link counts, mtimes and ctimes."""
    base = os.fsencode(root)
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [b".", *dirnames, *filenames]:
            full = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(full)
            out[os.fsdecode(os.path.relpath(full, base))] = (
                describe(full),
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_ino,
                st.st_nlink,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
    return out


def make_canary(path: Path) -> None:
    """Files, a directory (with a file), a symlink to the file and one to the directory."""
    (path / "dir").mkdir(parents=True)
    (path / "file").write_bytes(b"canary")
    (path / "dir" / "inner").write_bytes(b"inner")
    (path / "link").symlink_to(path / "file")
    (path / "dirlink").symlink_to(path / "dir")
    os.chmod(path / "file", 0o640)
    os.utime(path / "dir", ns=(1, 1))
    os.utime(path / "file", ns=(2, 2))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
