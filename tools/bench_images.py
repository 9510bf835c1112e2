"""Test images and the local registry for ``tools/bench`` (stdlib only).

Images are built once into an OCI layout in the bench cache with ``umoci``
(new/unpack/repack/config, ``raw add-layer`` for the one layer written by GNU
tar) and pushed with ``skopeo copy`` into a ``docker-registry`` whose storage
also lives in the cache, so neither the build nor the push is repeated.

* ``debian``     -- ``debootstrap --variant=minbase bookworm``, one layer (apt
  caches, package lists and /dev nodes removed, as Docker's debian images).
* ``smallfiles`` -- ``debian`` plus one layer of tens of thousands of small
  real files: pinned pure-Python wheels from PyPI (``pip download``), each
  unzipped into its own directory under /usr/local/lib/bench.
* ``bigfile``    -- one layer: 1 GiB from ``os.urandom`` and 512 MiB of zeros.
* ``whiteouts``  -- ``debian`` plus four layers that delete files and whole
  directories, turn files into directories and back, and (GNU tar layer)
  opaque directories.

``--quick`` variants (tags ``smallfiles-quick``, ``bigfile-quick``) are the
same recipes with fewer wheels and 64 MiB + 32 MiB.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bump to rebuild every cached image (a recipe changed).
RECIPE_VERSION = 1

DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

MiB = 1 << 20
GiB = 1 << 30

# Pure-Python wheels (py3-none-any): real, small, mostly text files. Full set:
# about 66k files in 10 wheels; quick set: about 7k.
WHEELS_FULL = (
    "ansible==9.13.0",
    "ansible==8.7.0",
    "plotly==5.24.1",
    "Django==4.2.16",
    "botocore==1.34.162",
    "sympy==1.13.3",
    "jedi==0.19.1",
    "babel==2.16.0",
    "kubernetes==30.1.0",
    "pygments==2.18.0",
)
WHEELS_QUICK = ("Django==4.2.16", "sympy==1.13.3", "jedi==0.19.1")

BIGFILE_FULL = (1 * GiB, 512 * MiB)  # random bytes, zeros
BIGFILE_QUICK = (64 * MiB, 32 * MiB)

ALL_IMAGES = ("debian", "smallfiles", "bigfile", "whiteouts")

Log = Callable[[str], None]


class BenchError(RuntimeError):
    pass


def _default_log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(
    cmd: list[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command; raise BenchError with its stderr tail if it fails."""
    argv = [os.fspath(c) for c in cmd]
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            check=False,
        )
    except FileNotFoundError as e:
        raise BenchError(f"{argv[0]}: not installed ({e})") from e
    if proc.returncode != 0:
        tail = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{' '.join(argv)}: exit {proc.returncode}: " + " | ".join(tail))
    return proc


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --------------------------------------------------------------------------
# Image specs


@dataclass(frozen=True)
class ImageSpec:
    name: str  # as given to --images
    tag: str  # tag in the cache layout and repository name in the registry
    quick: bool
    base: str | None  # tag of the image this one starts from
    description: str


def image_spec(name: str, quick: bool) -> ImageSpec:
    if name == "debian":
        return ImageSpec(
            name, "debian", quick, None, f"Debian {DEBIAN_SUITE} minbase (debootstrap), 1 layer"
        )
    if name == "smallfiles":
        wheels = WHEELS_QUICK if quick else WHEELS_FULL
        return ImageSpec(
            name,
            "smallfiles-quick" if quick else "smallfiles",
            quick,
            "debian",
            f"debian + 1 layer of small real files ({len(wheels)} pure-Python wheels unzipped)",
        )
    if name == "bigfile":
        rnd, zeros = BIGFILE_QUICK if quick else BIGFILE_FULL
        return ImageSpec(
            name,
            "bigfile-quick" if quick else "bigfile",
            quick,
            None,
            f"{human_bytes(rnd)} os.urandom + {human_bytes(zeros)} zeros, 1 layer",
        )
    if name == "whiteouts":
        return ImageSpec(
            name,
            "whiteouts",
            quick,
            "debian",
            "debian + 4 layers: deleted files and dirs, file<->dir replacements, opaque dirs",
        )
    raise BenchError(f"unknown image {name!r} (known: {', '.join(ALL_IMAGES)})")


@dataclass
class BuiltImage:
    spec: ImageSpec
    manifest_digest: str
    layers: list[dict[str, Any]]  # {"digest", "size", "mediaType"}, base first
    entries: int  # entries in the composed rootfs
    rootfs_bytes: int  # apparent size of the regular files in the composed rootfs
    repo: str = ""  # registry repository, "bench/<tag>"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def compressed_bytes(self) -> int:
        return sum(int(layer["size"]) for layer in self.layers)

    def summary(self) -> str:
        n = len(self.layers)
        return (
            f"{n} layer{'s' if n != 1 else ''}, {human_bytes(self.compressed_bytes)} compressed, "
            f"{human_bytes(self.rootfs_bytes)} in {self.entries:,} entries"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "tag": self.spec.tag,
            "quick": self.spec.quick,
            "description": self.spec.description,
            "manifest_digest": self.manifest_digest,
            "layers": self.layers,
            "compressed_bytes": self.compressed_bytes,
            "rootfs_bytes": self.rootfs_bytes,
            "entries": self.entries,
            "repo": self.repo,
            **self.extra,
        }


# --------------------------------------------------------------------------
# Building


def _walk(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield os.path.join(dirpath, name)


def tree_stats(root: Path) -> tuple[int, int]:
    """(entries, bytes of regular files) below root."""
    entries = size = 0
    for path in _walk(root):
        entries += 1
        st = os.lstat(path)
        if (st.st_mode & 0o170000) == 0o100000:
            size += st.st_size
    return entries, size


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def _rm_rf(path: Path) -> None:
    if path.is_symlink() or path.exists():
        run(["rm", "-rf", "--one-file-system", path])


class Builder:
    def __init__(self, cache: Path, mirror: str, log: Log = _default_log) -> None:
        self.cache = cache
        self.layout = cache / "oci"
        self.stamps = cache / "images"
        self.downloads = cache / "downloads"
        self.work = cache / "build"
        self.mirror = mirror
        self.log = log

    # -- umoci ----------------------------------------------------------------
    def umoci(self, *args: str | os.PathLike[str]) -> None:
        run(["umoci", "--log", "error", *args])

    def image(self, tag: str) -> str:
        return f"{self.layout}:{tag}"

    def repack(self, tag: str, bundle: Path, created_by: str) -> None:
        self.umoci(
            "repack",
            "--refresh-bundle",
            "--history.created_by",
            created_by,
            "--image",
            self.image(tag),
            bundle,
        )

    def set_config(self, tag: str) -> None:
        self.umoci(
            "config",
            "--image",
            self.image(tag),
            "--config.cmd",
            "/bin/bash",
            "--config.env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--no-history",
        )

    def _index(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.layout / "index.json").read_text())
        return data

    def manifest_of(self, tag: str) -> tuple[str, dict[str, Any]]:
        for desc in self._index().get("manifests", []):
            if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                digest = desc["digest"]
                algo, hexd = digest.split(":", 1)
                blob = self.layout / "blobs" / algo / hexd
                return digest, json.loads(blob.read_bytes())
        raise BenchError(f"{self.layout}: no tag {tag}")

    # -- cache ------------------------------------------------------------------
    def stamp_path(self, tag: str) -> Path:
        return self.stamps / f"{tag}.json"

    def cached(self, spec: ImageSpec) -> BuiltImage | None:
        try:
            stamp = json.loads(self.stamp_path(spec.tag).read_text())
        except (OSError, ValueError):
            return None
        if stamp.get("recipe") != RECIPE_VERSION:
            return None
        try:
            digest, _ = self.manifest_of(spec.tag)
        except (BenchError, OSError, ValueError):
            return None
        if digest != stamp.get("manifest_digest"):
            return None
        if spec.base is not None:
            base = self.cached(image_spec(spec.base, spec.quick))
            if base is None or base.manifest_digest != stamp.get("base_digest"):
                return None
        for layer in stamp["layers"]:
            algo, hexd = layer["digest"].split(":", 1)
            if not (self.layout / "blobs" / algo / hexd).is_file():
                return None
        return BuiltImage(
            spec,
            stamp["manifest_digest"],
            stamp["layers"],
            stamp["entries"],
            stamp["rootfs_bytes"],
            extra=stamp.get("extra", {}),
        )

    def ensure(self, spec: ImageSpec) -> BuiltImage:
        """The image from the cache, built first if missing or stale."""
        got = self.cached(spec)
        if got is not None:
            return got
        if os.geteuid() != 0:
            raise BenchError(
                f"image {spec.tag} is not cached and building it needs root "
                "(debootstrap, ownership in layers): run tools/bench once as root"
            )
        base = self.ensure(image_spec(spec.base, spec.quick)) if spec.base else None
        for tool in ("umoci", "skopeo"):
            if shutil.which(tool) is None:
                raise BenchError(f"{tool} is not installed (apt-get install {tool})")
        self.layout.parent.mkdir(parents=True, exist_ok=True)
        if not (self.layout / "oci-layout").exists():
            self.umoci("init", "--layout", self.layout)
        work = self.work / spec.tag
        _rm_rf(work)
        work.mkdir(parents=True)
        t0 = time.monotonic()
        self.log(f"building image {spec.tag}: {spec.description} (once; cached in {self.cache})")
        extra: dict[str, Any] = {}
        try:
            bundle = work / "bundle"
            if spec.name == "debian":
                self._build_debian(spec.tag, work, bundle)
            elif spec.name == "smallfiles":
                extra = self._build_smallfiles(spec, work, bundle)
            elif spec.name == "bigfile":
                self._build_bigfile(spec, work, bundle)
            elif spec.name == "whiteouts":
                self._build_whiteouts(spec.tag, work, bundle)
            else:
                raise BenchError(f"no recipe for {spec.name}")
            self.set_config(spec.tag)
            # Stats of the composed tree, from umoci's own unpack of the final image.
            check = work / "check"
            self.umoci("unpack", "--image", self.image(spec.tag), check)
            entries, size = tree_stats(check / "rootfs")
        finally:
            _rm_rf(work)
        digest, manifest = self.manifest_of(spec.tag)
        layers = [
            {"digest": d["digest"], "size": d["size"], "mediaType": d["mediaType"]}
            for d in manifest["layers"]
        ]
        stamp = {
            "recipe": RECIPE_VERSION,
            "tag": spec.tag,
            "manifest_digest": digest,
            "base_digest": base.manifest_digest if base else None,
            "layers": layers,
            "entries": entries,
            "rootfs_bytes": size,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.monotonic() - t0, 1),
            "extra": extra,
        }
        self.stamps.mkdir(parents=True, exist_ok=True)
        tmp = self.stamp_path(spec.tag).with_suffix(".tmp")
        tmp.write_text(json.dumps(stamp, indent=2) + "\n")
        tmp.replace(self.stamp_path(spec.tag))
        self.umoci("gc", "--layout", self.layout)
        built = BuiltImage(spec, digest, layers, entries, size, extra=extra)
        self.log(f"built {spec.tag}: {built.summary()} in {time.monotonic() - t0:.0f} s")
        return built

    def _fresh_bundle(self, tag: str, base: str | None, bundle: Path) -> None:
        if base is None:
            self.umoci("new", "--image", self.image(tag))
            self.umoci("unpack", "--image", self.image(tag), bundle)
        else:
            # unpack the base; repack --image LAYOUT:tag then writes the new tag.
            self.umoci("unpack", "--image", self.image(base), bundle)

    # -- debian -------------------------------------------------------------------
    def _build_debian(self, tag: str, work: Path, bundle: Path) -> None:
        if shutil.which("debootstrap") is None:
            raise BenchError("debootstrap is not installed (apt-get install debootstrap)")
        target = work / "debootstrap"
        debs = self.downloads / "debootstrap-debs"
        debs.mkdir(parents=True, exist_ok=True)
        self.log(
            f"debootstrap --variant=minbase {DEBIAN_SUITE} from {self.mirror} (a minute or so)"
        )
        try:
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--cache-dir={debs.resolve()}",
                    DEBIAN_SUITE,
                    target,
                    self.mirror,
                ]
            )
        except BenchError as e:
            log = target / "debootstrap" / "debootstrap.log"
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
            raise BenchError(f"{e} | {' | '.join(tail)}") from e
        # What Docker's debian images leave out: package caches and lists, device nodes.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "dev", "proc", "sys", "tmp"):
            d = target / sub
            if d.is_dir():
                for child in d.iterdir():
                    if child.name in ("partial", "lock"):
                        continue
                    _rm_rf(child)
        for f in (target / "var/cache/apt").glob("*.bin"):
            f.unlink()
        self._fresh_bundle(tag, None, bundle)
        rootfs = bundle / "rootfs"
        for child in target.iterdir():
            os.rename(child, rootfs / child.name)
        st = os.lstat(target)
        os.chmod(rootfs, st.st_mode & 0o7777)
        self.repack(tag, bundle, f"debootstrap --variant=minbase {DEBIAN_SUITE}")

    # -- smallfiles ---------------------------------------------------------------
    def _wheels(self, pins: tuple[str, ...]) -> list[Path]:
        dest = self.downloads / "wheels"
        dest.mkdir(parents=True, exist_ok=True)

        def find(pin: str) -> Path | None:
            name, version = pin.split("==")
            norm = re.sub(r"[-_.]+", "_", name).lower()
            for whl in dest.glob("*.whl"):
                parts = whl.name.split("-")
                if re.sub(r"[-_.]+", "_", parts[0]).lower() == norm and parts[1] == version:
                    return whl
            return None

        missing = [p for p in pins if find(p) is None]
        if missing:
            self.log(f"pip download {' '.join(missing)}")
            pip = [sys.executable, "-m", "pip"]
            if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
                if shutil.which("pip3") is None:
                    raise BenchError("no pip: apt-get install python3-pip")
                pip = ["pip3"]
            for pin in missing:  # one at a time: pip refuses two versions of one name
                run(
                    [
                        *pip,
                        "download",
                        "--no-deps",
                        "--only-binary=:all:",
                        "--disable-pip-version-check",
                        "-q",
                        "-d",
                        dest,
                        pin,
                    ]
                )
        out = []
        for pin in pins:
            whl = find(pin)
            if whl is None:
                raise BenchError(f"pip download did not produce a wheel for {pin}")
            out.append(whl)
        return out

    def _build_smallfiles(self, spec: ImageSpec, work: Path, bundle: Path) -> dict[str, Any]:
        pins = WHEELS_QUICK if spec.quick else WHEELS_FULL
        wheels = self._wheels(pins)
        assert spec.base is not None
        self._fresh_bundle(spec.tag, spec.base, bundle)
        target = bundle / "rootfs/usr/local/lib/bench"
        files = 0
        for whl in wheels:
            dest = target / whl.name.removesuffix(".whl")
            with zipfile.ZipFile(whl) as z:
                z.extractall(dest)
                files += sum(1 for i in z.infolist() if not i.is_dir())
        for path in _walk(target):
            os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)
        os.chmod(target, 0o755)
        self.repack(spec.tag, bundle, "unzip " + " ".join(w.name for w in wheels))
        return {"wheels": [w.name for w in wheels], "files_added": files}

    # -- bigfile --------------------------------------------------------------------
    def _build_bigfile(self, spec: ImageSpec, work: Path, bundle: Path) -> None:
        rnd, zeros = BIGFILE_QUICK if spec.quick else BIGFILE_FULL
        self._fresh_bundle(spec.tag, None, bundle)
        data = bundle / "rootfs/data"
        data.mkdir(mode=0o755)
        chunk = 4 * MiB
        with open(data / "random.bin", "wb") as f:
            left = rnd
            while left:
                n = min(chunk, left)
                f.write(os.urandom(n))
                left -= n
        with open(data / "zeros.bin", "wb") as f:
            block = bytes(chunk)
            left = zeros
            while left:
                n = min(chunk, left)
                f.write(block[:n])
                left -= n
        self.repack(spec.tag, bundle, f"{human_bytes(rnd)} os.urandom + {human_bytes(zeros)} zeros")

    # -- whiteouts --------------------------------------------------------------------
    def _build_whiteouts(self, tag: str, work: Path, bundle: Path) -> None:
        self._fresh_bundle(tag, "debian", bundle)
        r = bundle / "rootfs"
        rng = hashlib.sha256(b"ocistore bench whiteouts")

        def blob(n: int) -> bytes:
            out = bytearray()
            while len(out) < n:
                rng.update(b"x")
                out += rng.hexdigest().encode() + b"\n"
            return bytes(out[:n])

        # Layer 2: delete a whole directory, single files; add 2,000 small files.
        _rm_rf(r / "usr/share/doc")
        for p in ("etc/motd", "usr/bin/pr", "usr/bin/tsort", "etc/debian_version"):
            (r / p).unlink(missing_ok=True)
        _write(r / "etc/debian_version", "12.bench\n")
        for d in range(20):
            for i in range(100):
                _write(r / f"opt/bench/d{d:02}/f{i:03}.txt", blob(200 + 37 * i))
        self.repack(tag, bundle, "rm -rf /usr/share/doc, some files; add /opt/bench (2,000 files)")

        # Layer 3: file -> directory, directory -> file, delete earlier-layer dirs/files.
        (r / "etc/hostname").unlink(missing_ok=True)
        _write(r / "etc/hostname/README", "was a file in layer 1\n")
        _rm_rf(r / "usr/share/common-licenses")
        _write(r / "usr/share/common-licenses", "was a directory in layer 1\n")
        for d in range(10):
            _rm_rf(r / f"opt/bench/d{d:02}")
        for d in range(10, 20):
            for i in range(0, 100, 2):
                (r / f"opt/bench/d{d:02}/f{i:03}.txt").unlink()
        self.repack(tag, bundle, "file<->dir replacements; rm half of /opt/bench")

        # Layer 4, by GNU tar (umoci never writes opaque markers): opaque /opt/bench
        # and /etc/apt/apt.conf.d, a plain whiteout of /var/log/dpkg.log.
        stage = work / "layer4"
        _write(stage / "opt/bench/.wh..wh..opq", b"")
        _write(stage / "opt/bench/after-opaque.txt", "the only entry left in /opt/bench\n")
        _write(stage / "etc/apt/apt.conf.d/.wh..wh..opq", b"")
        _write(stage / "etc/apt/apt.conf.d/99bench", 'APT::Install-Recommends "false";\n')
        _write(stage / "var/log/.wh.dpkg.log", b"")
        for path in [stage, *map(Path, _walk(stage))]:
            if path.is_dir():
                os.chmod(path, 0o755)
        layer = work / "layer4.tar"
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
            for member in sorted(_walk(stage)):
                info = t.gettarinfo(member, os.path.relpath(member, stage))
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if info.isreg():
                    with open(member, "rb") as f:
                        t.addfile(info, f)
                else:
                    t.addfile(info)
        self.umoci(
            "raw",
            "add-layer",
            "--history.created_by",
            "GNU-style tar: opaque dirs, whiteout",
            "--image",
            self.image(tag),
            layer,
        )

        # Layer 5: on a fresh unpack (layer 4 was not made from the bundle).
        _rm_rf(bundle)
        self.umoci("unpack", "--image", self.image(tag), bundle)
        _write(r / "usr/lib/bench.bin", blob(4 * MiB))
        _rm_rf(r / "var/cache/debconf")
        (r / "var/cache/debconf").mkdir()
        _write(r / "var/cache/debconf/config.dat", "recreated\n")
        self.repack(tag, bundle, "4 MiB file; /var/cache/debconf replaced")


# --------------------------------------------------------------------------
# Registry


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ACCESS_RE = re.compile(rb'"(GET|HEAD) (\S+) HTTP/[0-9.]+" (\d{3}) (\d+|-)')


class Registry:
    """A docker-registry on 127.0.0.1 with storage in the cache and its access log on."""

    def __init__(self, cache: Path, log: Log = _default_log) -> None:
        self.storage = cache / "registry"
        self.run_dir = cache / "registry-run"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.access_log = self.run_dir / "access.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("docker-registry") or shutil.which("registry")
        if binary is None:
            raise BenchError("docker-registry is not installed (apt-get install docker-registry)")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.run_dir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n"
            "  level: error\n"
            "  accesslog:\n"
            "    disabled: false\n"
            "storage:\n"
            "  filesystem:\n"
            f"    rootdirectory: {json.dumps(str(self.storage.resolve()))}\n"
            "  delete:\n"
            "    enabled: true\n"
            "http:\n"
            f"  addr: {self.host}\n"
        )
        # The access log goes to stdout, everything else (level error) to stderr.
        out = open(self.access_log, "wb")  # noqa: SIM115 - owned by the process's lifetime
        err = open(self.run_dir / "registry.log", "wb")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [binary, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # Ctrl-C is ours to handle; we stop it
            )
        finally:
            out.close()
            err.close()
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                msg = (self.run_dir / "registry.log").read_text(errors="replace")[-500:]
                raise BenchError(f"docker-registry exited at start: {msg}")
            with contextlib.suppress(OSError):
                status, _, _ = self.request("GET", "/v2/")
                if status == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError("docker-registry did not answer within 20 s")
            time.sleep(0.05)
        self.log(f"docker-registry on {self.host}, storage {self.storage}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        finally:
            conn.close()

    def manifest_digest(self, repo: str, tag: str) -> str | None:
        status, headers, _ = self.request(
            "HEAD",
            f"/v2/{repo}/manifests/{tag}",
            {"Accept": f"{MT_OCI_MANIFEST}, {MT_DOCKER_MANIFEST}"},
        )
        return headers.get("docker-content-digest") if status == 200 else None

    def ensure_pushed(self, layout: Path, image: BuiltImage) -> None:
        image.repo = f"bench/{image.spec.tag}"
        if self.manifest_digest(image.repo, "latest") == image.manifest_digest:
            return
        self.log(f"skopeo copy {image.spec.tag} -> {self.host}/{image.repo}:latest")
        run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout}:{image.spec.tag}",
                f"docker://{self.host}/{image.repo}:latest",
            ]
        )
        got = self.manifest_digest(image.repo, "latest")
        if got != image.manifest_digest:
            raise BenchError(
                f"pushed {image.spec.tag} but the registry serves {got}, "
                f"not {image.manifest_digest}"
            )

    def ref(self, image: BuiltImage) -> str:
        return f"{self.host}/{image.repo}:latest"

    def blob_url(self, image: BuiltImage, digest: str) -> str:
        return f"http://{self.host}/v2/{image.repo}/blobs/{digest}"

    # -- access log ------------------------------------------------------------
    def log_offset(self) -> int:
        try:
            return self.access_log.stat().st_size
        except OSError:
            return 0

    def settle_log(self, quiet: float = 0.05, limit: float = 1.0) -> int:
        """Wait until the access log stops growing (lines are written after a response)."""
        deadline = time.monotonic() + limit
        size = self.log_offset()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.log_offset()
            if now == size:
                break
            size = now
        return size

    def blob_traffic(self, start: int, end: int) -> dict[str, int]:
        """Blob GETs, their bytes, and all requests between two log offsets."""
        with open(self.access_log, "rb") as f:
            f.seek(start)
            data = f.read(max(0, end - start))
        gets = nbytes = requests = 0
        for line in data.splitlines():
            m = ACCESS_RE.search(line)
            if not m:
                continue
            requests += 1
            method, path, status, size = m.groups()
            if method == b"GET" and b"/blobs/" in path and status.startswith(b"2"):
                gets += 1
                nbytes += int(size) if size != b"-" else 0
        return {"blob_gets": gets, "blob_bytes": nbytes, "requests": requests}
