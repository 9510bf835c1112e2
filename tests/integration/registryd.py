"""Real ``docker-registry`` (CNCF distribution 2.8) processes for the integration tests.

Each registry runs on a free port on 127.0.0.1 with its own storage directory,
a config YAML written here and its log captured to ``registry.log`` beside it.
Kinds: ``plain`` (HTTP, no auth), ``basic`` (htpasswd), ``token`` (Bearer
tokens from tokenserver.TokenServer) and ``tls`` (HTTPS, own CA).

Images are put in with ``skopeo copy`` (see ``Registry.push``), never with
ocistore's code.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .images import (
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    BuiltImages,
    CommandError,
    ImageBuildError,
    LayoutImage,
    LayoutIndex,
    PushedImage,
    PushedManifest,
    StandardImages,
    run,
    sha256_digest,
)
from .tokenserver import TokenServer

KINDS = ("plain", "basic", "token", "tls")
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
STARTUP_TIMEOUT = 20.0


class RegistryStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------
# Credentials and certificates


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for an htpasswd line (distribution 2.8 only accepts bcrypt).

    Tried in order: the stdlib ``crypt`` module (glibc/libxcrypt on Debian
    bookworm does ``$2b$``; the module exists up to Python 3.12), the
    ``bcrypt`` package if installed, ``htpasswd -B`` from apache2-utils.
    Cost 4, the minimum: the registry checks the hash on every request.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # type: ignore[import-not-found,unused-ignore]

            h = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
            if h and h.startswith("$2"):
                return str(h)
        except (ImportError, ValueError, OSError):
            pass
    try:
        import bcrypt  # type: ignore[import-not-found,unused-ignore]

        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode())
    except ImportError:
        pass
    if shutil.which("htpasswd"):
        out = run(["htpasswd", "-nbBC", "4", "x", password]).stdout.decode().strip()
        return out.split(":", 1)[1]
    raise RegistryStartError(
        "no bcrypt implementation: need Python's crypt module (Python <= 3.12), "
        "the bcrypt package, or htpasswd (apt-get install apache2-utils)"
    )


@dataclass(frozen=True)
class TLSFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls_files(
    directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> TLSFiles:
    """A throw-away CA and a server certificate for ``hosts`` (IP and DNS SANs)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ocistore test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(files.key_file, 0o600)
    return files


# --------------------------------------------------------------------------
# Config


def to_yaml(obj: Any, indent: int = 0) -> str:
    """Minimal YAML emitter: mappings, lists, scalars (strings JSON-quoted)."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{k}:")
                lines.append(to_yaml(v, indent + 1))
            else:
                lines.append(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}-")
                lines.append(to_yaml(item, indent + 1))
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    else:
        lines.append(pad + _scalar(obj))
    return "\n".join(lines)


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if v is None:
        return "null"
    if isinstance(v, dict | list):
        return "{}" if isinstance(v, dict) else "[]"
    return json.dumps(str(v))


# --------------------------------------------------------------------------
# skopeo


@dataclass(frozen=True)
class Skopeo:
    """skopeo isolated from the host's auth files and registries.conf."""

    workdir: Path

    @classmethod
    def create(cls, workdir: Path) -> Skopeo:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "auth.json").write_text('{"auths": {}}\n')
        (workdir / "registries.conf").write_text("# empty: no mirrors, no search registries\n")
        (workdir / "registries.d").mkdir(exist_ok=True)
        (workdir / "tmp").mkdir(exist_ok=True)
        return cls(workdir)

    @property
    def env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "CONTAINERS_"))
        }
        env["REGISTRY_AUTH_FILE"] = str(self.workdir / "auth.json")
        env["CONTAINERS_REGISTRIES_CONF"] = str(self.workdir / "registries.conf")
        env["TMPDIR"] = str(self.workdir / "tmp")
        return env

    def __call__(self, *args: str | os.PathLike[str]) -> bytes:
        cmd: list[str | os.PathLike[str]] = [
            "skopeo",
            "--insecure-policy",
            "--registries.d",
            self.workdir / "registries.d",
            *args,
        ]
        return run(cmd, env=self.env).stdout


# --------------------------------------------------------------------------
# Registry


@dataclass
class Registry:
    kind: str
    host: str  # "127.0.0.1:PORT"
    url: str  # "http://127.0.0.1:PORT" or "https://..."
    workdir: Path
    storage_dir: Path
    config_path: Path
    log_path: Path
    skopeo: Skopeo = field(repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    username: str | None = None  # basic: registry user; token: the push user
    password: str | None = None
    ca_file: Path | None = None  # tls only
    certs_d: Path | None = None  # tls only: certs_d/<host>/ca.crt, like /etc/docker/certs.d
    token_server: TokenServer | None = None  # token only
    standard_images: StandardImages | None = field(default=None, repr=False)

    @property
    def images(self) -> StandardImages:
        """The standard images pushed by the ``registry_*`` fixtures."""
        if self.standard_images is None:
            raise RuntimeError(
                f"{self.kind} registry {self.host} holds no standard images "
                "(only the registry_plain/basic/token/tls fixtures fill theirs)"
            )
        return self.standard_images

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def scheme(self) -> str:
        return self.url.split(":", 1)[0]

    @property
    def cert_dir(self) -> Path | None:
        """Per-host directory holding ca.crt (what skopeo's --cert-dir wants)."""
        return self.certs_d / self.host if self.certs_d else None

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.username is None or self.password is None:
            return None
        return (self.username, self.password)

    # -- plain HTTP access for tests (not ocistore) -----------------------

    def requests_kwargs(self, *, auth: bool = True) -> dict[str, Any]:
        """Keyword arguments for ``requests`` calls to this registry.

        TLS: ``verify=ca_file``; basic: ``auth=(user, password)``.  Token
        registries need a Bearer token first (see ``bearer_token``).
        """
        kw: dict[str, Any] = {"timeout": 10}
        if self.ca_file:
            kw["verify"] = str(self.ca_file)
        if auth and self.kind == "basic" and self.credentials:
            kw["auth"] = self.credentials
        return kw

    def bearer_token(self, scope: str, *, credentials: bool = False) -> str:
        """Fetch a token from the token server (anonymous unless ``credentials``)."""
        assert self.token_server is not None
        auth = self.credentials if credentials else None
        r = requests.get(
            self.token_server.realm,
            params={"service": self.token_server.service, "scope": scope},
            auth=auth,
            timeout=10,
        )
        r.raise_for_status()
        return str(r.json()["token"])

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- skopeo ----------------------------------------------------------

    def _tls_args(self, prefix: str) -> list[str]:
        if self.kind == "tls":
            return [f"--{prefix}tls-verify=true", f"--{prefix}cert-dir", str(self.cert_dir)]
        return [f"--{prefix}tls-verify=false"]

    def _cred_args(self, prefix: str, *, push: bool) -> list[str]:
        # token: anonymous pulls must work, so only pushes send credentials.
        if self.credentials and (self.kind == "basic" or push):
            return [f"--{prefix}creds", f"{self.username}:{self.password}"]
        return [f"--{prefix}no-creds"]

    def dest_args(self) -> list[str]:
        return self._tls_args("dest-") + self._cred_args("dest-", push=True)

    def src_args(self) -> list[str]:
        """For ``skopeo inspect`` (no prefix) of this registry."""
        return self._tls_args("") + self._cred_args("", push=False)

    def push(
        self,
        oci_layout_dir: Path,
        tag: str,
        repo: str,
        dest_tag: str | None = None,
        *,
        format: str | None = None,
        compress: str | None = None,
        all_platforms: bool = False,
        source: LayoutImage | LayoutIndex | None = None,
    ) -> PushedImage:
        """``skopeo copy oci:<layout>:<tag> docker://<host>/<repo>:<dest_tag>``.

        ``format="v2s2"`` converts to Docker schema 2, ``compress="zstd"``
        recompresses the layers.  Conversions are first done into a ``dir:``
        copy and that is pushed with ``--preserve-digests``: skopeo 1.9 would
        otherwise reuse the gzip blobs it knows the registry already has (from
        its blob-info cache) instead of converting them.
        """
        dest_tag = dest_tag or tag
        src = f"oci:{oci_layout_dir}:{tag}"
        if format or compress:
            conv = self.workdir / "converted" / f"{repo.replace('/', '_')}-{dest_tag}"
            shutil.rmtree(conv, ignore_errors=True)
            conv.parent.mkdir(parents=True, exist_ok=True)
            convert_to_dir(self.skopeo, src, conv, format=format, compress=compress)
            src = f"dir:{conv}"
        return self.push_ref(
            src,
            repo,
            dest_tag,
            all_platforms=all_platforms,
            source_layout=oci_layout_dir,
            source_tag=tag,
            source=source,
        )

    def push_ref(
        self,
        src: str,
        repo: str,
        dest_tag: str,
        *,
        all_platforms: bool = False,
        source_layout: Path,
        source_tag: str,
        source: LayoutImage | LayoutIndex | None = None,
    ) -> PushedImage:
        """Push any skopeo source reference unchanged (``--preserve-digests``)."""
        digestfile = self.skopeo.workdir / "tmp" / f"digest-{secrets.token_hex(6)}"
        args = ["copy", "--quiet", "--preserve-digests", "--retry-times", "2"]
        if all_platforms:
            args.append("--all")
        args += ["--digestfile", str(digestfile), *self.dest_args()]
        try:
            self.skopeo(*args, src, f"docker://{self.host}/{repo}:{dest_tag}")
        except CommandError as e:
            raise ImageBuildError(f"{e}\n--- registry log ---\n{self.log_tail()}") from e
        pushed_digest = digestfile.read_text().strip()
        digestfile.unlink()
        image = self.describe(repo, dest_tag, source_layout, source_tag, source)
        if image.manifest_digest != pushed_digest:
            raise ImageBuildError(
                f"skopeo reported {pushed_digest} for {repo}:{dest_tag}, registry serves "
                f"{image.manifest_digest}"
            )
        return image

    def inspect_raw(self, repo: str, ref: str, *, config: bool = False) -> bytes:
        """Raw manifest (or config) of ``repo:tag`` / ``repo@digest``, via skopeo."""
        sep = "@" if ref.startswith("sha256:") else ":"
        extra = ["--config"] if config else []
        return self.skopeo(
            "inspect", "--raw", *extra, *self.src_args(), f"docker://{self.host}/{repo}{sep}{ref}"
        )

    def describe(
        self,
        repo: str,
        tag: str,
        source_layout: Path,
        source_tag: str,
        source: LayoutImage | LayoutIndex | None = None,
    ) -> PushedImage:
        raw = self.inspect_raw(repo, tag)
        manifest = json.loads(raw)
        media_type = guess_media_type(manifest)
        common = dict(
            host=self.host,
            repo=repo,
            tag=tag,
            manifest_digest=sha256_digest(raw),
            raw_manifest=raw,
            source_layout=source_layout,
            source_tag=source_tag,
            source=source,
        )
        if media_type in (MT_OCI_INDEX, DOCKER_MANIFEST_LIST):
            children = []
            for entry in manifest["manifests"]:
                child_raw = self.inspect_raw(repo, entry["digest"])
                if sha256_digest(child_raw) != entry["digest"]:
                    raise ImageBuildError(f"{repo}@{entry['digest']}: digest mismatch")
                children.append(
                    self._describe_manifest(
                        repo,
                        child_raw,
                        entry.get("platform"),
                        entry.get("annotations", {}),
                        entry.get("mediaType", ""),
                    )
                )
            return PushedImage(
                media_type=media_type,
                config_digest=None,
                layer_digests=(),
                layer_media_types=(),
                diff_ids=(),
                children=tuple(children),
                **common,  # type: ignore[arg-type]
            )
        m = self._describe_manifest(repo, raw, None, {}, media_type)
        return PushedImage(
            media_type=m.media_type,
            config_digest=m.config_digest,
            layer_digests=m.layer_digests,
            layer_media_types=m.layer_media_types,
            diff_ids=m.diff_ids,
            children=(),
            **common,  # type: ignore[arg-type]
        )

    def _describe_manifest(
        self,
        repo: str,
        raw: bytes,
        platform: dict[str, str] | None,
        annotations: dict[str, str],
        media_type: str,
    ) -> PushedManifest:
        manifest = json.loads(raw)
        digest = sha256_digest(raw)
        config_raw = self.inspect_raw(repo, digest, config=True)
        config = json.loads(config_raw)
        return PushedManifest(
            digest=digest,
            media_type=guess_media_type(manifest, media_type),
            size=len(raw),
            raw=raw,
            config_digest=manifest["config"]["digest"],
            layer_digests=tuple(ld["digest"] for ld in manifest["layers"]),
            layer_media_types=tuple(ld["mediaType"] for ld in manifest["layers"]),
            diff_ids=tuple(config.get("rootfs", {}).get("diff_ids", [])),
            platform=platform,
            annotations=dict(annotations),
        )

    # -- lifecycle ---------------------------------------------------------

    def stop(self) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.process = None
        if self.token_server is not None:
            self.token_server.stop()


def guess_media_type(manifest: dict[str, Any], hint: str = "") -> str:
    """The manifest's ``mediaType``; umoci omits it (optional in OCI), so infer it."""
    if manifest.get("mediaType"):
        return str(manifest["mediaType"])
    if hint:
        return hint
    if "manifests" in manifest:
        return MT_OCI_INDEX
    return MT_OCI_MANIFEST


def convert_to_dir(
    skopeo: Skopeo, src: str, dest: Path, *, format: str | None, compress: str | None
) -> None:
    """skopeo copy into a ``dir:`` directory, converting the manifest/compression."""
    args = ["copy", "--quiet"]
    if format:
        args += ["--format", format]
    if compress:
        args += ["--dest-compress", "--dest-compress-format", compress]
    skopeo(*args, src, f"dir:{dest}")


class RegistryFactory:
    """Starts registries in fresh directories under ``root``; ``stop_all`` ends them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Registry] = []

    def start(self, kind: str, **kwargs: Any) -> Registry:
        workdir = Path(tempfile.mkdtemp(prefix=f"registry-{kind}-", dir=self.root))
        reg = start_registry(kind, workdir, **kwargs)
        self.started.append(reg)
        return reg

    def stop_all(self) -> None:
        for reg in reversed(self.started):
            reg.stop()
        self.started.clear()


STANDARD_REPOS = {
    "multi": "ocistore-test/multi",
    "multi_v2s2": "ocistore-test/multi-v2s2",
    "multi_zstd": "ocistore-test/multi-zstd",
    "multiarch": "ocistore-test/multiarch",
}
STANDARD_TAG = "latest"


def push_standard_images(reg: Registry, built: BuiltImages) -> StandardImages:
    """Fill ``reg`` with the standard images (all pushed with --preserve-digests)."""
    multi = built.multi

    def push_multi(src: str, key: str) -> PushedImage:
        return reg.push_ref(
            src,
            STANDARD_REPOS[key],
            STANDARD_TAG,
            source_layout=multi.layout,
            source_tag=multi.tag,
            source=multi,
        )

    return StandardImages(
        multi=push_multi(multi.oci_ref, "multi"),
        multi_v2s2=push_multi(f"dir:{built.multi_v2s2_dir}", "multi_v2s2"),
        multi_zstd=push_multi(f"dir:{built.multi_zstd_dir}", "multi_zstd"),
        multiarch=reg.push_ref(
            built.multiarch.oci_ref,
            STANDARD_REPOS["multiarch"],
            STANDARD_TAG,
            all_platforms=True,
            source_layout=built.multiarch.layout,
            source_tag=built.multiarch.tag,
            source=built.multiarch,
        ),
    )


def start_registry(
    kind: str,
    workdir: Path,
    *,
    username: str = "ocistore",
    password: str | None = None,
    token_expires_in: int = 300,
) -> Registry:
    """Start a registry of ``kind`` (see KINDS) and wait until ``GET /v2/`` answers."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}")
    if shutil.which("docker-registry") is None:
        raise RegistryStartError("docker-registry not found (apt-get install docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _attempt in range(3):  # a free port may be taken again before the registry binds it
        try:
            return _start_once(kind, workdir, username, password, token_expires_in)
        except RegistryStartError as e:
            last_error = e
            if "address already in use" not in str(e):
                raise
    assert last_error is not None
    raise last_error


def _start_once(
    kind: str, workdir: Path, username: str, password: str | None, token_expires_in: int
) -> Registry:
    port = free_port()
    host = f"127.0.0.1:{port}"
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {
            "level": "info",
            "formatter": "text",
            "accesslog": {"disabled": False},
            "fields": {"service": "registry", "kind": kind},
        },
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": host,
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "health": {"storagedriver": {"enabled": False}},
    }
    reg_user: str | None = None
    reg_password: str | None = None
    ca_file = certs_d = None
    token_server = None
    scheme = "http"
    if kind == "basic":
        reg_user, reg_password = username, password or secrets.token_urlsafe(12)
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(f"{reg_user}:{bcrypt_hash(reg_password)}\n")
        config["auth"] = {"htpasswd": {"realm": "ocistore-test", "path": str(htpasswd)}}
    elif kind == "token":
        token_server = TokenServer(workdir / "token-server", expires_in=token_expires_in)
        token_server.start()
        reg_user, reg_password = next(iter(token_server.users.items()))
        config["auth"] = {
            "token": {
                "realm": token_server.realm,
                "service": token_server.service,
                "issuer": token_server.issuer,
                "rootcertbundle": str(token_server.cert_path),
            }
        }
    elif kind == "tls":
        tls = make_tls_files(workdir / "pki")
        ca_file = tls.ca_file
        certs_d = workdir / "certs.d"
        (certs_d / host).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tls.ca_file, certs_d / host / "ca.crt")
        (certs_d / f"localhost:{port}").mkdir(exist_ok=True)
        shutil.copyfile(tls.ca_file, certs_d / f"localhost:{port}" / "ca.crt")
        config["http"]["tls"] = {"certificate": str(tls.cert_file), "key": str(tls.key_file)}
        scheme = "https"
    config_path = workdir / "config.yml"
    config_path.write_text(to_yaml(config) + "\n")
    log_path = workdir / "registry.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    reg = Registry(
        kind=kind,
        host=host,
        url=f"{scheme}://{host}",
        workdir=workdir,
        storage_dir=storage,
        config_path=config_path,
        log_path=log_path,
        skopeo=Skopeo.create(workdir / "skopeo"),
        process=proc,
        username=reg_user,
        password=reg_password,
        ca_file=ca_file,
        certs_d=certs_d,
        token_server=token_server,
    )
    try:
        _wait_ready(reg)
    except BaseException:
        reg.stop()
        raise
    return reg


def _wait_ready(reg: Registry) -> None:
    assert reg.process is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    verify: str | bool = str(reg.ca_file) if reg.ca_file else True
    last = ""
    while time.monotonic() < deadline:
        rc = reg.process.poll()
        if rc is not None:
            raise RegistryStartError(
                f"docker-registry ({reg.kind}) exited with status {rc} during startup; "
                f"config {reg.config_path}, log {reg.log_path}:\n{reg.log_tail()}"
            )
        try:
            r = requests.get(f"{reg.url}/v2/", timeout=1, verify=verify)
            # Any answer from the API (200, or 401 with a challenge) means it is up.
            if r.status_code in (200, 401) and "Docker-Distribution-Api-Version" in r.headers:
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as e:
            last = str(e)
        time.sleep(0.05)
    raise RegistryStartError(
        f"docker-registry ({reg.kind}) not answering GET {reg.url}/v2/ after "
        f"{STARTUP_TIMEOUT:.0f}s (last: {last}); log {reg.log_path}:\n{reg.log_tail()}"
    )
