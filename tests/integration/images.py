"""Test images for the integration tests, built by tools that are not ocistore.

ocistore is the system under test, so its reader must never be checked only
against its own writer.  Every image here is made by independent tools:

* ``dpkg-deb -x`` unpacks small, real Debian packages (fetched by
  ``tools/fetch-test-debs``) into a umoci bundle;
* ``umoci`` (init/new/unpack/repack/config/raw add-layer/gc) turns bundle
  snapshots into layers, writes configs and manifests;
* GNU ``tar`` writes one layer by hand (umoci never emits opaque whiteouts);
* the multi-arch image index and the attestation manifest are plain JSON
  written here into the layout's blob store.

The layouts are cached under ``.cache/test-images/<key>/``; the key hashes this
file, the .deb files and the tool versions, so editing the builder rebuilds.
See README.md in this directory for what each layer contains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = "tools/fetch-test-debs"

# Keep in sync with PACKAGES in tools/fetch-test-debs.
LAYER1_DEBS = ("busybox-static", "netbase", "ncurses-base", "cowsay")
LAYER2_DEBS = ("hello",)
ALL_DEBS = LAYER1_DEBS + LAYER2_DEBS

# Everything the builder creates or touches itself gets a fixed mtime (one per
# layer), so rebuilding with the same inputs gives the same layer tars.
EPOCH = 1704067200  # 2024-01-01T00:00:00Z

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_IN_TOTO = "application/vnd.in-toto+json"
REF_NAME = "org.opencontainers.image.ref.name"

MULTI_TAG = "multi"
# skopeo-converted copies of "multi", stored in skopeo's dir: format.
VARIANTS = {
    "multi-v2s2": ["--format", "v2s2"],
    "multi-zstd": ["--dest-compress", "--dest-compress-format", "zstd"],
}
MULTIARCH_TAG = "multiarch"
# (os, architecture, variant, layout tag)
MULTIARCH_PLATFORMS = (
    ("linux", "amd64", None, "linux-amd64"),
    ("linux", "arm64", "v8", "linux-arm64-v8"),
    ("linux", "arm", "v7", "linux-arm-v7"),
)

# What each layer of the "multi" image contains (also in README.md).
MULTI_LAYERS = (
    "L1 (umoci repack): dpkg-deb -x of busybox-static, netbase, ncurses-base, cowsay",
    "L2 (umoci repack): + hello; whiteouts for /etc/rpc and the whole "
    "/usr/share/doc/netbase; /lib/terminfo emptied and refilled; links, xattr, "
    "setuid/setgid/sticky, read-only dir, fifo, odd names in /ocistore-test",
    "L3 (umoci repack): file /etc/protocols becomes a directory, directory "
    "/usr/share/cowsay/cows becomes a file",
    "L4 (GNU tar --format=gnu, umoci raw add-layer): opaque whiteout of "
    "/usr/share/doc/busybox-static, whiteout of /ocistore-test/hardlink-b, GNU long name",
)

LONG_NAME = "long-name-" + "x" * 206 + ".txt"  # 220 characters, needs a PAX header
GNU_LONG_NAME = "gnu-longlink-" + "y" * 140 + ".txt"  # > 100 characters: ././@LongLink
NON_UTF8_NAME = b"latin1-caf\xe9.txt"  # not valid UTF-8
XATTR_NAME = "user.test"
XATTR_VALUE = b"ocistore xattr value"


class ImageBuildError(RuntimeError):
    pass


class MissingDebsError(ImageBuildError):
    pass


class CommandError(ImageBuildError):
    def __init__(self, cmd: Sequence[str], proc: subprocess.CompletedProcess[bytes]) -> None:
        self.cmd = list(cmd)
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        out = proc.stdout.decode(errors="replace")[-2000:]
        err = proc.stderr.decode(errors="replace")[-4000:]
        super().__init__(
            f"command failed with exit status {proc.returncode}: {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{out}\n--- stderr ---\n{err}"
        )


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(argv, capture_output=True, env=env, cwd=cwd, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise CommandError(argv, proc)
    return proc


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------
# The .deb inputs


def debs_dir() -> Path:
    env = os.environ.get("OCISTORE_TEST_DEBS")
    return Path(env) if env else REPO_ROOT / ".cache" / "debs"


def find_debs(directory: Path | None = None) -> dict[str, Path]:
    """Map each package in ALL_DEBS to its .deb in ``directory``."""
    directory = directory or debs_dir()
    found: dict[str, Path] = {}
    missing: list[str] = []
    for pkg in ALL_DEBS:
        matches = sorted(directory.glob(f"{pkg}_*.deb")) if directory.is_dir() else []
        if matches:
            found[pkg] = matches[-1]
        else:
            missing.append(pkg)
    if missing:
        raise MissingDebsError(
            f"test .deb packages missing from {directory}: {', '.join(missing)}. "
            f"Run `{FETCH_SCRIPT}` first (it downloads them with apt-get download "
            f"into ${{OCISTORE_TEST_DEBS:-.cache/debs}})."
        )
    return found


# --------------------------------------------------------------------------
# A tiny OCI image-layout accessor (independent of ocistore's code)


class Layout:
    def __init__(self, path: Path) -> None:
        self.path = path

    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        return self.path / "blobs" / algo / hexpart

    def read_blob(self, digest: str) -> bytes:
        data = self.blob_path(digest).read_bytes()
        if sha256_digest(data) != digest:
            raise ImageBuildError(f"blob {digest} in {self.path} does not match its digest")
        return data

    def read_json(self, digest: str) -> dict[str, Any]:
        obj = json.loads(self.read_blob(digest))
        assert isinstance(obj, dict)
        return obj

    def write_blob(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            path.write_bytes(data)
        return digest, len(data)

    def write_json_blob(self, obj: Any) -> tuple[str, int, bytes]:
        data = json.dumps(obj, separators=(",", ":")).encode()
        digest, size = self.write_blob(data)
        return digest, size, data

    def index(self) -> dict[str, Any]:
        obj = json.loads((self.path / "index.json").read_text())
        assert isinstance(obj, dict)
        return obj

    def write_index(self, index: dict[str, Any]) -> None:
        tmp = self.path / "index.json.tmp"
        tmp.write_text(json.dumps(index, separators=(",", ":")))
        tmp.replace(self.path / "index.json")

    def resolve(self, tag: str) -> dict[str, Any]:
        for desc in self.index()["manifests"]:
            if desc.get("annotations", {}).get(REF_NAME) == tag:
                assert isinstance(desc, dict)
                return desc
        raise ImageBuildError(f"no tag {tag!r} in {self.path}/index.json")

    def set_tag(self, tag: str, desc: dict[str, Any]) -> None:
        desc = dict(desc)
        desc["annotations"] = {**desc.get("annotations", {}), REF_NAME: tag}
        index = self.index()
        kept = [d for d in index["manifests"] if d.get("annotations", {}).get(REF_NAME) != tag]
        index["manifests"] = [*kept, desc]
        self.write_index(index)


# --------------------------------------------------------------------------
# Descriptions of built images


@dataclass(frozen=True)
class LayerInfo:
    digest: str
    media_type: str
    size: int
    diff_id: str
    description: str = ""


@dataclass(frozen=True)
class LayoutImage:
    """One image manifest in an OCI layout built by the fixtures."""

    layout: Path
    tag: str
    manifest_digest: str
    manifest_size: int
    config_digest: str
    layers: tuple[LayerInfo, ...]
    platform: dict[str, str] | None = None

    @property
    def oci_ref(self) -> str:
        """Reference for skopeo/umoci: ``oci:<layout>:<tag>``."""
        return f"oci:{self.layout}:{self.tag}"

    @property
    def umoci_image(self) -> str:
        """Argument for ``umoci unpack --image``."""
        return f"{self.layout}:{self.tag}"

    @property
    def layer_digests(self) -> tuple[str, ...]:
        return tuple(layer.digest for layer in self.layers)

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return tuple(layer.diff_id for layer in self.layers)


@dataclass(frozen=True)
class LayoutIndex:
    """An OCI image index in a layout: per-platform images plus an attestation."""

    layout: Path
    tag: str
    index_digest: str
    index_size: int
    images: tuple[LayoutImage, ...]
    attestation_digest: str

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    def image_for(self, platform: str) -> LayoutImage:
        """``platform`` like ``linux/arm64/v8``."""
        for image in self.images:
            if image.platform and _platform_string(image.platform) == platform:
                return image
        raise KeyError(platform)


@dataclass(frozen=True)
class BuiltImages:
    multi: LayoutImage
    multiarch: LayoutIndex
    multi_v2s2_dir: Path  # skopeo dir: copy, Docker schema 2 manifest
    multi_zstd_dir: Path  # skopeo dir: copy, OCI manifest with zstd layers
    cache_key: str
    from_cache: bool
    build_seconds: float
    debs: dict[str, Path] = field(default_factory=dict)


def _platform_string(platform: dict[str, str]) -> str:
    parts = [platform["os"], platform["architecture"]]
    if platform.get("variant"):
        parts.append(platform["variant"])
    return "/".join(parts)


def describe_layout_image(
    layout_path: Path, tag: str, descriptions: Sequence[str] = ()
) -> LayoutImage:
    layout = Layout(layout_path)
    desc = layout.resolve(tag)
    return _describe_manifest(layout, tag, desc, descriptions)


def _describe_manifest(
    layout: Layout, tag: str, desc: dict[str, Any], descriptions: Sequence[str] = ()
) -> LayoutImage:
    manifest = layout.read_json(desc["digest"])
    config = layout.read_json(manifest["config"]["digest"])
    diff_ids = config["rootfs"]["diff_ids"]
    layers = tuple(
        LayerInfo(
            digest=ld["digest"],
            media_type=ld["mediaType"],
            size=ld["size"],
            diff_id=diff_ids[i],
            description=descriptions[i] if i < len(descriptions) else "",
        )
        for i, ld in enumerate(manifest["layers"])
    )
    platform = None
    if "architecture" in config:
        platform = {"os": config["os"], "architecture": config["architecture"]}
        if config.get("variant"):
            platform["variant"] = config["variant"]
    return LayoutImage(
        layout=layout.path,
        tag=tag,
        manifest_digest=desc["digest"],
        manifest_size=desc["size"],
        config_digest=manifest["config"]["digest"],
        layers=layers,
        platform=platform,
    )


def describe_layout_index(layout_path: Path, tag: str) -> LayoutIndex:
    layout = Layout(layout_path)
    desc = layout.resolve(tag)
    index = layout.read_json(desc["digest"])
    images = []
    attestation = ""
    for child in index["manifests"]:
        ann = child.get("annotations", {})
        if ann.get("vnd.docker.reference.type") == "attestation-manifest":
            attestation = child["digest"]
            continue
        ptag = "linux-" + "-".join(
            p for p in (child["platform"]["architecture"], child["platform"].get("variant")) if p
        )
        images.append(_describe_manifest(layout, ptag, child))
    return LayoutIndex(
        layout=layout.path,
        tag=tag,
        index_digest=desc["digest"],
        index_size=desc["size"],
        images=tuple(images),
        attestation_digest=attestation,
    )


# --------------------------------------------------------------------------
# Building


class _Umoci:
    def __init__(self) -> None:
        self.rootless = os.geteuid() != 0

    def __call__(self, *args: str | os.PathLike[str]) -> None:
        run(["umoci", "--log", "error", *args])

    def unpack(self, image: str, bundle: Path) -> None:
        extra = ["--rootless"] if self.rootless else []
        self("unpack", *extra, "--image", image, bundle)

    def repack(self, image: str, bundle: Path, created: int, created_by: str) -> None:
        self(
            "repack",
            "--refresh-bundle",
            "--history.created",
            rfc3339(created),
            "--history.created_by",
            created_by,
            "--image",
            image,
            bundle,
        )


def _walk_all(root: Path) -> Iterator[bytes]:
    """Every path below ``root`` (as bytes, names need not be UTF-8), root included."""
    broot = os.fsencode(root)
    yield broot
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            yield os.path.join(dirpath, name)


def _pin_mtimes(root: Path, since: float, mtime: int) -> None:
    """Give everything modified after ``since`` (i.e. by this build) a fixed mtime."""
    for path in _walk_all(root):
        st = os.lstat(path)
        if st.st_mtime >= since:
            os.utime(path, (mtime, mtime), follow_symlinks=False)


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def _layer2_changes(rootfs: Path, debs: dict[str, Path]) -> None:
    for pkg in LAYER2_DEBS:
        run(["dpkg-deb", "-x", debs[pkg], rootfs])

    # Removals: one file, one whole directory (umoci writes one .wh. entry each).
    (rootfs / "etc/rpc").unlink()
    shutil.rmtree(rootfs / "usr/share/doc/netbase")
    # Replace a directory's content wholesale: umoci 0.4.7 writes one .wh.<name>
    # per removed child, never .wh..wh..opq.
    terminfo = rootfs / "lib/terminfo"
    for child in terminfo.iterdir():
        shutil.rmtree(child)
    _write(terminfo / "o/ocistore-term", "replaced wholesale in layer 2\n")

    # Links.
    (rootfs / "bin/sh").symlink_to("/bin/busybox")  # absolute
    (rootfs / "usr/bin/hi").symlink_to("hello")  # relative, same directory
    (rootfs / "usr/bin/hello-copyright").symlink_to("../share/doc/hello/copyright")
    os.link(rootfs / "usr/bin/hello", rootfs / "usr/bin/hello-hardlink")

    t = rootfs / "ocistore-test"
    t.mkdir()
    _write(t / "hardlink-a", "one inode, three names\n")
    os.link(t / "hardlink-a", t / "hardlink-b")
    (t / "sub").mkdir()
    os.link(t / "hardlink-a", t / "sub/hardlink-c")
    (t / "dangling-symlink").symlink_to("/nonexistent/target")
    (t / "dir-symlink").symlink_to("sub")

    _write(t / "xattr-file", "has a user.test xattr\n")
    os.setxattr(t / "xattr-file", XATTR_NAME, XATTR_VALUE)

    _write(t / "setuid-file", "#!/bin/sh\necho setuid\n", 0o755)
    os.chmod(t / "setuid-file", 0o4755)
    (t / "setgid-dir").mkdir()
    os.chmod(t / "setgid-dir", 0o2775)
    (t / "sticky-dir").mkdir()
    os.chmod(t / "sticky-dir", 0o1777)

    ro = t / "readonly-dir"
    _write(ro / "inner-file", "inside a read-only directory\n", 0o444)
    (ro / "inner-dir").mkdir()
    os.chmod(ro / "inner-dir", 0o555)
    os.chmod(ro, 0o555)

    os.mkfifo(t / "fifo", 0o644)
    (t / "empty-file").touch()
    (t / "empty-dir").mkdir()
    _write(Path(os.fsdecode(os.fsencode(t) + b"/" + NON_UTF8_NAME)), "name is latin-1\n")
    _write(t / LONG_NAME, "220-character file name\n")
    _write(t / "unicode-\u00fc \u2603 name.txt", "valid UTF-8, spaces\n")
    if os.geteuid() == 0:
        _write(t / "owned-by-1000", "uid 1000 gid 1000\n", 0o600)
        os.chown(t / "owned-by-1000", 1000, 1000)


def _layer3_changes(rootfs: Path) -> None:
    # A file becomes a directory.
    (rootfs / "etc/protocols").unlink()
    _write(rootfs / "etc/protocols/README", "was a regular file in layer 1\n")
    # A directory becomes a file.
    shutil.rmtree(rootfs / "usr/share/cowsay/cows")
    _write(rootfs / "usr/share/cowsay/cows", "was a directory in layer 1\n")


def _opaque_layer_tar(work: Path, mtime: int) -> Path:
    """Layer 4, written by GNU tar (GNU format) since umoci never emits opaque markers."""
    stage = work / "layer4"
    doc = stage / "usr/share/doc/busybox-static"
    _write(doc / ".wh..wh..opq", b"", 0o644)
    _write(doc / "README.opaque", "the only entry left after the opaque whiteout\n")
    t = stage / "ocistore-test"
    _write(t / ".wh.hardlink-b", b"", 0o644)
    _write(t / GNU_LONG_NAME, "long name written as a GNU ././@LongLink entry\n")
    for path in _walk_all(stage):
        if os.path.isdir(path):
            os.chmod(path, 0o755)
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    members = [
        "usr/",
        "usr/share/",
        "usr/share/doc/",
        "usr/share/doc/busybox-static/",
        "usr/share/doc/busybox-static/.wh..wh..opq",
        "usr/share/doc/busybox-static/README.opaque",
        "ocistore-test/",
        "ocistore-test/.wh.hardlink-b",
        f"ocistore-test/{GNU_LONG_NAME}",
    ]
    out = work / "layer4.tar"
    run(
        [
            "tar",
            "--create",
            "--format=gnu",
            "--file",
            out,
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--no-recursion",
            "-C",
            stage,
            *members,
        ]
    )
    return out


def _build_multi(layout_dir: Path, work: Path, debs: dict[str, Path], umoci: _Umoci) -> None:
    image = f"{layout_dir}:{MULTI_TAG}"
    umoci("new", "--image", image)
    bundle = work / "multi-bundle"
    umoci.unpack(image, bundle)
    rootfs = bundle / "rootfs"

    since = time.time() - 1
    for pkg in LAYER1_DEBS:
        run(["dpkg-deb", "-x", debs[pkg], rootfs])
    _pin_mtimes(rootfs, since, EPOCH + 1)
    umoci.repack(image, bundle, EPOCH + 1, "dpkg-deb -x " + " ".join(LAYER1_DEBS))

    since = time.time() - 1
    _layer2_changes(rootfs, debs)
    _pin_mtimes(rootfs, since, EPOCH + 2)
    umoci.repack(image, bundle, EPOCH + 2, "dpkg-deb -x hello; links, xattrs, whiteouts")

    since = time.time() - 1
    _layer3_changes(rootfs)
    _pin_mtimes(rootfs, since, EPOCH + 3)
    umoci.repack(image, bundle, EPOCH + 3, "file<->directory replacements")

    tar = _opaque_layer_tar(work, EPOCH + 4)
    umoci(
        "raw",
        "add-layer",
        "--history.created",
        rfc3339(EPOCH + 4),
        "--history.created_by",
        "GNU tar: opaque whiteout layer",
        "--image",
        image,
        tar,
    )
    umoci(
        "config",
        "--image",
        image,
        "--created",
        rfc3339(EPOCH + 5),
        "--author",
        "ocistore integration tests",
        "--config.cmd",
        "/bin/busybox",
        "--config.cmd",
        "sh",
        "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/games",
        "--config.env",
        "OCISTORE_TEST_IMAGE=multi",
        "--config.workingdir",
        "/ocistore-test",
        "--config.user",
        "0:0",
        "--config.exposedports",
        "8080/tcp",
        "--config.label",
        "org.opencontainers.image.title=ocistore-test-multi",
        "--manifest.annotation",
        "org.opencontainers.image.description=ocistore integration test image",
        "--history.created",
        rfc3339(EPOCH + 5),
        "--history.created_by",
        "umoci config",
    )


def _set_variant(layout: Layout, tag: str, variant: str) -> None:
    """umoci config has no --variant: rewrite config, manifest and index entry by hand."""
    desc = layout.resolve(tag)
    manifest = layout.read_json(desc["digest"])
    config = layout.read_json(manifest["config"]["digest"])
    config["variant"] = variant
    cdigest, csize, _ = layout.write_json_blob(config)
    manifest["config"] = {**manifest["config"], "digest": cdigest, "size": csize}
    mdigest, msize, _ = layout.write_json_blob(manifest)
    layout.set_tag(tag, {"mediaType": MT_OCI_MANIFEST, "digest": mdigest, "size": msize})


def _build_multiarch(layout_dir: Path, work: Path, umoci: _Umoci) -> None:
    layout = Layout(layout_dir)
    entries: list[dict[str, Any]] = []
    for os_name, arch, variant, tag in MULTIARCH_PLATFORMS:
        image = f"{layout_dir}:{tag}"
        platform = "/".join(p for p in (os_name, arch, variant) if p)
        umoci("new", "--image", image)
        bundle = work / f"bundle-{tag}"
        umoci.unpack(image, bundle)
        rootfs = bundle / "rootfs"
        since = time.time() - 1
        _write(rootfs / "etc/ocistore-platform", platform + "\n")
        _write(rootfs / f"platform-{arch}{variant or ''}", f"only in the {platform} image\n")
        _pin_mtimes(rootfs, since, EPOCH + 10)
        umoci.repack(image, bundle, EPOCH + 10, f"files for {platform}")
        umoci(
            "config",
            "--image",
            image,
            "--os",
            os_name,
            "--architecture",
            arch,
            "--created",
            rfc3339(EPOCH + 11),
            "--config.cmd",
            "/etc/ocistore-platform",
            "--config.env",
            f"OCISTORE_TEST_PLATFORM={platform}",
            "--history.created",
            rfc3339(EPOCH + 11),
            "--history.created_by",
            "umoci config",
        )
        if variant:
            _set_variant(layout, tag, variant)
        desc = layout.resolve(tag)
        plat = {"architecture": arch, "os": os_name}
        if variant:
            plat["variant"] = variant
        entries.append(
            {
                "mediaType": MT_OCI_MANIFEST,
                "digest": desc["digest"],
                "size": desc["size"],
                "platform": plat,
            }
        )

    # A BuildKit-style attestation manifest for the amd64 image.
    amd64 = entries[0]["digest"]
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [
            {
                "name": "pkg:docker/ocistore-test/multiarch@latest?platform=linux%2Famd64",
                "digest": {"sha256": amd64.split(":", 1)[1]},
            }
        ],
        "predicate": {
            "spdxVersion": "SPDX-2.3",
            "SPDXID": "SPDXRef-DOCUMENT",
            "name": "ocistore-test-multiarch",
            "packages": [],
        },
    }
    sdigest, ssize, _ = layout.write_json_blob(statement)
    att_config = {
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sdigest]},
    }
    cdigest, csize, _ = layout.write_json_blob(att_config)
    att_manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": [
            {
                "mediaType": MT_IN_TOTO,
                "digest": sdigest,
                "size": ssize,
                "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"},
            }
        ],
    }
    adigest, asize, _ = layout.write_json_blob(att_manifest)
    entries.append(
        {
            "mediaType": MT_OCI_MANIFEST,
            "digest": adigest,
            "size": asize,
            "annotations": {
                "vnd.docker.reference.digest": amd64,
                "vnd.docker.reference.type": "attestation-manifest",
            },
            "platform": {"architecture": "unknown", "os": "unknown"},
        }
    )
    index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries}
    idigest, isize, _ = layout.write_json_blob(index)
    layout.set_tag(MULTIARCH_TAG, {"mediaType": MT_OCI_INDEX, "digest": idigest, "size": isize})


def _tool_versions() -> bytes:
    out = b""
    for cmd in (
        ["umoci", "--version"],
        ["tar", "--version"],
        ["dpkg-deb", "--version"],
        ["skopeo", "--version"],
    ):
        out += run(cmd).stdout.splitlines()[0] + b"\n"
    return out


def cache_key(debs: dict[str, Path]) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    for pkg in sorted(debs):
        h.update(pkg.encode() + b"\0" + hashlib.sha256(debs[pkg].read_bytes()).digest())
    h.update(_tool_versions())
    h.update(b"rootless" if os.geteuid() != 0 else b"root")
    return h.hexdigest()[:16]


def _build_into(out: Path, debs: dict[str, Path]) -> None:
    umoci = _Umoci()
    with tempfile.TemporaryDirectory(prefix="ocistore-imgbuild-") as tmp:
        work = Path(tmp)
        for name in ("multi", "multiarch"):
            layout_dir = out / name
            umoci("init", "--layout", layout_dir)
            (work / name).mkdir()
            if name == "multi":
                _build_multi(layout_dir, work / name, debs, umoci)
            else:
                _build_multiarch(layout_dir, work / name, umoci)
            umoci("gc", "--layout", layout_dir)
        # Docker schema 2 and zstd variants of "multi", converted by skopeo into
        # dir: copies (no registry involved, so no blob reuse can skip the work).
        for variant, args in VARIANTS.items():
            run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "--quiet",
                    *args,
                    f"oci:{out / 'multi'}:{MULTI_TAG}",
                    f"dir:{out / variant}",
                ],
                env={**os.environ, "TMPDIR": str(work)},
            )
        # Bundles hold read-only directories: make them removable again.
        for path in _walk_all(work):
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o755)


def cache_root() -> Path:
    env = os.environ.get("OCISTORE_TEST_IMAGE_CACHE")
    return Path(env) if env else REPO_ROOT / ".cache" / "test-images"


def build_images(dest: Path, debs: dict[str, Path] | None = None) -> BuiltImages:
    """Build (or take from the cache) the test layouts and copy them into ``dest``.

    ``dest/multi`` and ``dest/multiarch`` are private copies, so tests may
    modify them.  Set OCISTORE_TEST_NO_IMAGE_CACHE=1 to always rebuild.
    """
    start = time.monotonic()
    debs = debs or find_debs()
    key = cache_key(debs)
    use_cache = os.environ.get("OCISTORE_TEST_NO_IMAGE_CACHE", "") in ("", "0")
    root = cache_root()
    cached = root / key
    from_cache = use_cache and (cached / "complete").is_file()
    source = cached
    staging: Path | None = None
    try:
        if not from_cache:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix="building-", dir=root))
            _build_into(staging, debs)
            (staging / "complete").write_text(key + "\n")
            source = staging
            # Publish unless a concurrent session already did (never delete a
            # complete entry someone may be copying from).
            if use_cache and not (cached / "complete").is_file():
                shutil.rmtree(cached, ignore_errors=True)
                with contextlib.suppress(OSError):
                    staging.rename(cached)
                    staging = None
            if use_cache and (cached / "complete").is_file():
                source = cached
                _prune_cache(root, keep=key)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("multi", "multiarch", *VARIANTS):
            shutil.copytree(source / name, dest / name, symlinks=True)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return BuiltImages(
        multi=describe_layout_image(dest / "multi", MULTI_TAG, MULTI_LAYERS),
        multiarch=describe_layout_index(dest / "multiarch", MULTIARCH_TAG),
        multi_v2s2_dir=dest / "multi-v2s2",
        multi_zstd_dir=dest / "multi-zstd",
        cache_key=key,
        from_cache=from_cache,
        build_seconds=time.monotonic() - start,
        debs=debs,
    )


def _prune_cache(root: Path, keep: str) -> None:
    for entry in root.iterdir():
        name = entry.name
        stale_build = name.startswith("building-") and time.time() - entry.stat().st_mtime > 3600
        old_key = len(name) == 16 and name != keep and all(c in "0123456789abcdef" for c in name)
        if stale_build or old_key:
            shutil.rmtree(entry, ignore_errors=True)


# --------------------------------------------------------------------------
# Images as a registry serves them


@dataclass(frozen=True)
class PushedManifest:
    """One image manifest as served by a registry (a child of an index, or the image)."""

    digest: str
    media_type: str
    size: int
    raw: bytes = field(repr=False)
    config_digest: str
    layer_digests: tuple[str, ...]
    layer_media_types: tuple[str, ...]
    diff_ids: tuple[str, ...]
    platform: dict[str, str] | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def platform_string(self) -> str | None:
        return _platform_string(self.platform) if self.platform else None


@dataclass(frozen=True)
class PushedImage:
    """An image pushed with skopeo, described from what the registry serves."""

    host: str  # "127.0.0.1:PORT"
    repo: str
    tag: str
    manifest_digest: str  # sha256 of the manifest bytes as served
    media_type: str
    raw_manifest: bytes = field(repr=False)
    # For a single image: the image itself.  For an index: empty, see ``children``.
    config_digest: str | None
    layer_digests: tuple[str, ...]
    layer_media_types: tuple[str, ...]
    diff_ids: tuple[str, ...]
    children: tuple[PushedManifest, ...]  # index entries, in index order
    source_layout: Path  # the OCI layout skopeo copied from
    source_tag: str  # tag in that layout (``umoci unpack --image layout:tag``)
    source: LayoutImage | LayoutIndex | None = None

    @property
    def is_index(self) -> bool:
        return bool(self.children) or self.media_type in (
            MT_OCI_INDEX,
            "application/vnd.docker.distribution.manifest.list.v2+json",
        )

    @property
    def reference(self) -> str:
        return f"{self.host}/{self.repo}:{self.tag}"

    @property
    def digest_reference(self) -> str:
        return f"{self.host}/{self.repo}@{self.manifest_digest}"

    @property
    def source_oci_ref(self) -> str:
        return f"oci:{self.source_layout}:{self.source_tag}"

    def child(self, platform: str) -> PushedManifest:
        """The index entry for ``platform`` like ``linux/arm/v7`` or ``unknown/unknown``."""
        for c in self.children:
            if c.platform_string == platform:
                return c
        raise KeyError(platform)


@dataclass(frozen=True)
class StandardImages:
    """The images every registry fixture is filled with."""

    multi: PushedImage  # OCI manifest, gzip layers, pushed unchanged
    multi_v2s2: PushedImage  # Docker schema 2 (skopeo --format v2s2)
    multi_zstd: PushedImage  # OCI manifest, zstd layers
    multiarch: PushedImage  # OCI index: amd64, arm64/v8, arm/v7, attestation

    def all(self) -> tuple[PushedImage, ...]:
        return (self.multi, self.multi_v2s2, self.multi_zstd, self.multiarch)
