"""Registries that lie, real ``docker-registry`` processes underneath.

Some lies are images a registry stores and serves faithfully: pushed by hand over the
registry's HTTP API (``POST /v2/<repo>/blobs/uploads/``, ``PUT ...?digest=``, ``PUT
/v2/<repo>/manifests/<tag>``) into a registry of this module's own, from the bytes of a
real layer of the ``multi`` test image:

* a config whose ``rootfs.diff_ids`` do not match the layer (an unknown diffID, and the
  diffID of another layer the store already holds);
* configs that are not JSON, not an object, without ``rootfs``, with a bad digest;
* a manifest of exactly 4 MiB (the limit, which distribution 2.8 also enforces on push).

Others are lies in transit, told by the fault proxy (faultproxy.py, ``rewrite``) in front
of a real registry: manifest bytes that do not hash to the digest asked for or announced
in ``Docker-Content-Digest``; a ``Content-Type`` naming another manifest type than the
body; malformed manifest JSON; a manifest over 4 MiB (with and without
``Content-Length``). Plus an index without the wanted platform.

Every case asserts the error class, its exit code and the key facts in its one-line
message, that the lie was caught before anything was fetched that did not need to be,
that nothing of the image is stored (no image, no reference, no layer directory or row,
no layer or manifest blob; at most the verified config blob, which prune removes), that
fsck finds the store consistent with nothing left in ``ingest/`` or ``layers/.tmp-*``,
and, once, that a good image pulled before is untouched. The CLI gives the same exit
codes with exactly one ``ocistore: `` line on stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests

from ocistore import Store
from ocistore import mediatypes as mt
from ocistore.digest import Digest
from ocistore.errors import (
    ContentError,
    DiffIDMismatchError,
    DigestMismatchError,
    IntegrityError,
    ManifestInvalidError,
    OcistoreError,
    PlatformNotFoundError,
    UnsupportedMediaTypeError,
)
from ocistore.model import MAX_MANIFEST_BYTES
from ocistore.registry.transport import TransportOptions

from .faultproxy import FaultProxy
from .images import BuiltImages, LayerInfo, PushedImage, sha256_digest
from .registryd import Registry, RegistryFactory

#: What the lying config claims the layer unpacks to.
WRONG_DIFF_ID = sha256_digest(b"not what the layer unpacks to")
DOCKER_SCHEMA1 = mt.DOCKER_SCHEMA1[1]


# --- a registry filled by hand -------------------------------------------------------------
class Pusher:
    """The registry's push API spoken with ``requests``: these images are wrong on purpose,
    and no tool may stand between their bytes and the registry."""

    def __init__(self, registry: Registry) -> None:
        self.url = registry.url
        self.kwargs = registry.requests_kwargs()

    def blob(self, repo: str, data: bytes, media_type: str) -> dict[str, Any]:
        """Monolithic upload; returns the blob's descriptor."""
        r = requests.post(f"{self.url}/v2/{repo}/blobs/uploads/", **self.kwargs)
        assert r.status_code == 202, r.text
        digest = sha256_digest(data)
        r = requests.put(
            urljoin(self.url, r.headers["Location"]),
            params={"digest": digest},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            **self.kwargs,
        )
        assert r.status_code == 201, r.text
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def manifest(self, repo: str, tag: str, body: bytes, media_type: str) -> str:
        r = requests.put(
            f"{self.url}/v2/{repo}/manifests/{tag}",
            data=body,
            headers={"Content-Type": media_type},
            **self.kwargs,
        )
        assert r.status_code == 201, r.text
        assert r.headers["Docker-Content-Digest"] == sha256_digest(body)
        return sha256_digest(body)


@dataclass(frozen=True)
class Crafted:
    """One image pushed by hand: ``repo:latest`` on the liars' registry."""

    repo: str
    manifest: bytes
    config: bytes
    layer: LayerInfo  # the real layer (blob, diffID) it carries

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    def ref(self, host: str) -> str:
        return f"{host}/{self.repo}:latest"


@dataclass(frozen=True)
class Liars:
    registry: Registry
    diffid: Crafted  # config names WRONG_DIFF_ID for the layer
    diffid_known: Crafted  # config names the diffID of another layer of ``multi``
    bad_configs: dict[str, Crafted]
    at_limit: Crafted  # a valid manifest of exactly MAX_MANIFEST_BYTES

    @property
    def host(self) -> str:
        return self.registry.host


BAD_CONFIGS: dict[str, tuple[bytes, str]] = {
    # id: (config bytes, a fragment of the error)
    "not-json": (b"this is not JSON {", "image config is not valid JSON"),
    "latin1": (b'{"os": "caf\xe9"}', "image config is not valid JSON"),
    "array": (b'[{"rootfs": {"diff_ids": []}}]', "image config is not a JSON object"),
    "no-rootfs": (b'{"architecture": "amd64", "os": "linux"}', "has no rootfs.diff_ids"),
    "bad-diffid": (
        b'{"architecture": "amd64", "os": "linux", "rootfs": {"diff_ids": ["sha256:1234"]}}',
        "image config: ",
    ),
}


def _config(diff_id: str) -> bytes:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _manifest(config: dict[str, Any], layer: LayerInfo, pad: int | None = None) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": config,
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}],
    }
    if pad is not None:
        doc["annotations"] = {"org.example.padding": "x" * pad}
    return json.dumps(doc, separators=(",", ":")).encode()


def _push_image(
    pusher: Pusher, layout: Path, repo: str, layer: LayerInfo, config: bytes, pad: int | None
) -> Crafted:
    algo, _, hexpart = layer.digest.partition(":")
    pusher.blob(repo, (layout / "blobs" / algo / hexpart).read_bytes(), layer.media_type)
    config_desc = pusher.blob(repo, config, mt.OCI_CONFIG)
    if pad is not None:  # grow the padding until the manifest is exactly ``pad`` bytes
        pad = pad - len(_manifest(config_desc, layer, 0))
    body = _manifest(config_desc, layer, pad)
    pusher.manifest(repo, "latest", body, mt.OCI_MANIFEST)
    return Crafted(repo, body, config, layer)


@pytest.fixture(scope="module")
def liars(registry_factory: RegistryFactory, test_images: BuiltImages) -> Liars:
    """A registry of its own holding the hand-made lying images. Their one layer is the
    smallest layer of ``multi`` (so a store that pulled ``multi`` already has its blob)."""
    registry = registry_factory.start("plain")
    pusher = Pusher(registry)
    multi = test_images.multi
    smallest, second = sorted(multi.layers, key=lambda layer: layer.size)[:2]

    def push(repo: str, config: bytes, pad: int | None = None) -> Crafted:
        return _push_image(pusher, multi.layout, repo, smallest, config, pad)

    return Liars(
        registry=registry,
        diffid=push("liar/diffid", _config(WRONG_DIFF_ID)),
        diffid_known=push("liar/diffid-known", _config(second.diff_id)),
        bad_configs={
            name: push(f"liar/config-{name}", data) for name, (data, _) in BAD_CONFIGS.items()
        },
        # distribution 2.8 refuses to store a manifest over 4 MiB ("http: request body too
        # large", HTTP 400), so 4 MiB exactly is the largest a real registry serves; the
        # test over the limit has the fault proxy serve it one byte longer.
        at_limit=push("liar/at-limit", _config(smallest.diff_id), pad=MAX_MANIFEST_BYTES),
    )


@pytest.fixture
def liar_proxy(liars: Liars) -> Iterator[FaultProxy]:
    with FaultProxy(liars.host) as p:
        yield p


@pytest.fixture
def proxy(registry_plain: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry_plain.host) as p:
        yield p


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = _store(tmp_path / "store")
    yield s
    s.close()


# --- helpers ---------------------------------------------------------------------------------
def _store(root: Path) -> Store:
    return Store(str(root), transport=TransportOptions(certs_dir="/nonexistent", timeout=(5, 10)))


def _ref(host: str, image: PushedImage) -> str:
    return f"{host}/{image.repo}:{image.tag}"


def _one_line(exc: OcistoreError) -> str:
    message = str(exc)
    assert message and "\n" not in message and "\r" not in message, message
    return message


def _blobs(store: Store) -> set[str]:
    return {str(d) for d in store.content.iter_blobs()}


def _assert_holds_nothing(store: Store, *, config: str | None = None) -> None:
    """No image, reference, layer directory, layer row or blob-to-layer row; no blob but
    (if given) the config, which was verified against its digest before it was parsed
    and is unreferenced garbage that prune removes."""
    assert store.metadata.images() == []
    assert store.content.read_index()["manifests"] == []
    assert store.layer_dirs.names() == []
    assert store.metadata.layers() == []
    assert store.metadata.layer_blob_sizes() == []
    assert _blobs(store) <= ({config} if config else set())


def _assert_consistent(store: Store) -> None:
    """fsck finds nothing; nothing temporary is left, not even a download to resume."""
    report = store.fsck()
    assert report.problems == [] and report.resumable == []
    assert os.listdir(store.content.ingest_dir) == []
    assert store.layer_dirs.temp_dirs() == []


def _cli(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ocistore", "--root", str(root), *args]


def _cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "DOCKER_CONFIG": str(tmp_path / "no-docker-config")}


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ocistore: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _files(root: str) -> dict[str, tuple[int, int, int, int, str]]:
    """Every entry below ``root``: (mode, size, mtime, inode, sha256 of a regular file)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            sha = ""
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    sha = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
                sha,
            )
    return out


def _snapshot(store: Store, ref: str) -> dict[str, Any]:
    """What a pulled image is made of, to compare before and after a liar's pull."""
    info = store.inspect(ref)
    return {
        "inspect": info.to_json(),
        "images": store.metadata.images(),
        "index": store.content.read_index(),
        "layers": store.metadata.layers(),
        "blob_to_diff_id": {
            layer.digest: store.metadata.blob_diff_id(layer.digest) for layer in info.layers
        },
        "files": {layer.directory: _files(str(layer.directory)) for layer in info.layers},
    }


def _rootfs(store: Store, ref: str, dest: Path) -> dict[str, tuple[int, int, int, int, str]]:
    store.rootfs(ref, str(dest))
    return {k: (mode, size, 0, 0, sha) for k, (mode, size, _, _, sha) in _files(str(dest)).items()}


# --- 1. a config whose diffIDs do not match the layers ---------------------------------------
def test_config_diffid_not_matching_the_layer_is_refused_and_nothing_is_kept(
    liars: Liars, liar_proxy: FaultProxy, store: Store
) -> None:
    image = liars.diffid
    with pytest.raises(DiffIDMismatchError) as exc:
        store.pull(image.ref(liar_proxy.host))
    message = _one_line(exc.value)
    assert isinstance(exc.value, IntegrityError) and exc.value.exit_code == 6
    # Names the layer, what it really unpacks to and what the config claimed.
    assert image.layer.digest in message
    assert image.layer.diff_id in message and WRONG_DIFF_ID in message
    # Fetched once: an integrity failure is not retried.
    assert len(liar_proxy.blob_requests(image.layer.digest)) == 1
    assert not store.content.has(Digest.parse(image.layer.digest))
    assert store.metadata.layer(WRONG_DIFF_ID) is None
    assert store.metadata.layer(image.layer.diff_id) is None
    _assert_holds_nothing(store, config=image.config_digest)
    _assert_consistent(store)
    store.prune()
    assert _blobs(store) == set()


def test_liar_after_a_good_image_leaves_the_good_one_untouched(
    registry_plain: Registry, liars: Liars, store: Store, tmp_path: Path
) -> None:
    good = registry_plain.images.multi
    store.pull(good.reference)
    # The liar's layer blob is one the good image brought: the store re-reads it locally.
    assert liars.diffid.layer.digest in good.layer_digests
    before = _snapshot(store, good.reference)
    blobs_before = _blobs(store)
    rootfs_before = _rootfs(store, good.reference, tmp_path / "rootfs-before")
    assert "bin/busybox" in rootfs_before

    with pytest.raises(DiffIDMismatchError) as exc:
        store.pull(liars.diffid.ref(liars.host))
    assert WRONG_DIFF_ID in _one_line(exc.value)

    assert _snapshot(store, good.reference) == before
    assert _blobs(store) - blobs_before <= {liars.diffid.config_digest}
    assert blobs_before <= _blobs(store)
    assert _rootfs(store, good.reference, tmp_path / "rootfs-after") == rootfs_before
    assert [i.name for i in store.metadata.images()] == [good.reference]
    _assert_consistent(store)


def test_config_naming_the_diffid_of_another_stored_layer_is_refused(
    registry_plain: Registry, liars: Liars, store: Store
) -> None:
    """The liar's one layer is blob A of ``multi``; its config says the layer's diffID is
    that of another layer B of ``multi``. A store holding ``multi`` has blob A and a
    directory for B, so nothing needs downloading or unpacking; taking that shortcut would
    record the image with B's files for blob A and re-map the good image's blob A to B. Like
    docker ("layers from manifest don't match image configuration"), the store keeps the
    diffID each blob was verified to unpack to and refuses a config that names another."""
    good = registry_plain.images.multi
    store.pull(good.reference)
    liar = liars.diffid_known
    assert liar.layer.digest in good.layer_digests
    claimed_diff_id = json.loads(liar.config)["rootfs"]["diff_ids"][0]
    assert claimed_diff_id in good.diff_ids and claimed_diff_id != liar.layer.diff_id
    before = _snapshot(store, good.reference)
    with pytest.raises(IntegrityError) as exc:
        store.pull(liar.ref(liars.host))
    message = _one_line(exc.value)
    assert liar.layer.digest in message or claimed_diff_id in message
    assert store.metadata.image(liar.ref(liars.host)) is None
    assert _snapshot(store, good.reference) == before
    _assert_consistent(store)


# --- 2. manifest bytes that are not what their digest says -----------------------------------
@dataclass(frozen=True)
class ManifestLie:
    ref: str
    platform: str | None
    expected: str  # the digest asked for, or announced by the registry
    served: str  # the digest of the bytes served instead


def _wrong_manifest_by_digest(registry: Registry, proxy: FaultProxy) -> ManifestLie:
    """Pull ``multi`` by digest; the registry answers with ``multi_zstd``'s manifest."""
    multi, other = registry.images.multi, registry.images.multi_zstd
    proxy.rewrite(match=f"/manifests/{multi.manifest_digest}", body=other.raw_manifest)
    ref = f"{proxy.host}/{multi.repo}@{multi.manifest_digest}"
    return ManifestLie(ref, None, multi.manifest_digest, other.manifest_digest)


def _wrong_manifest_for_tag(registry: Registry, proxy: FaultProxy) -> ManifestLie:
    """Pull ``multi`` by tag; the body is ``multi_zstd``'s, the Docker-Content-Digest header
    still ``multi``'s."""
    multi, other = registry.images.multi, registry.images.multi_zstd
    proxy.rewrite(match=f"{multi.repo}/manifests/", body=other.raw_manifest)
    return ManifestLie(_ref(proxy.host, multi), None, multi.manifest_digest, other.manifest_digest)


def _wrong_index_child(registry: Registry, proxy: FaultProxy) -> ManifestLie:
    """Pull the amd64 image of ``multiarch``; asked for by its digest, the registry serves
    the arm64 manifest."""
    index = registry.images.multiarch
    amd64, arm64 = index.child("linux/amd64"), index.child("linux/arm64/v8")
    proxy.rewrite(match=f"/manifests/{amd64.digest}", body=arm64.raw)
    return ManifestLie(_ref(proxy.host, index), "linux/amd64", amd64.digest, arm64.digest)


@pytest.mark.parametrize(
    "lie",
    [_wrong_manifest_by_digest, _wrong_manifest_for_tag, _wrong_index_child],
    ids=["by-digest", "tag-with-digest-header", "index-child-by-digest"],
)
def test_manifest_bytes_that_do_not_match_their_digest_are_refused(
    registry_plain: Registry,
    proxy: FaultProxy,
    store: Store,
    lie: Callable[[Registry, FaultProxy], ManifestLie],
) -> None:
    told = lie(registry_plain, proxy)
    with pytest.raises(DigestMismatchError) as exc:
        store.pull(told.ref, platform=told.platform)
    message = _one_line(exc.value)
    assert exc.value.exit_code == 6
    assert proxy.host in message and told.expected in message and told.served in message
    assert [r.fault for r in proxy.requests].count("rewrite") == 1
    assert proxy.blob_requests() == []  # caught before any blob was asked for
    _assert_holds_nothing(store)
    _assert_consistent(store)


# --- 3. a Content-Type that names another manifest type ---------------------------------------
CONTENT_TYPE_LIES = [
    # (id, image, platform child or "", served Content-Type, error, message fragment)
    (
        "index-as-oci-manifest",
        "multiarch",
        "",
        mt.OCI_MANIFEST,
        ManifestInvalidError,
        f"manifest says it is {mt.OCI_INDEX} but was served as {mt.OCI_MANIFEST}",
    ),
    (
        "docker-manifest-as-manifest-list",
        "multi_v2s2",
        "",
        mt.DOCKER_MANIFEST_LIST,
        ManifestInvalidError,
        f"manifest says it is {mt.DOCKER_MANIFEST} but was served as {mt.DOCKER_MANIFEST_LIST}",
    ),
    (
        "docker-manifest-as-oci-manifest",
        "multi_v2s2",
        "",
        f"{mt.OCI_MANIFEST}; charset=utf-8",
        ManifestInvalidError,
        f"manifest says it is {mt.DOCKER_MANIFEST} but was served as {mt.OCI_MANIFEST}",
    ),
    # umoci writes no mediaType into the body: the header decides, and the body is no index.
    (
        "untyped-manifest-as-manifest-list",
        "multi",
        "",
        mt.DOCKER_MANIFEST_LIST,
        ManifestInvalidError,
        "index has no manifests list",
    ),
    (
        "untyped-index-child-as-oci-index",
        "multiarch",
        "linux/arm/v7",
        mt.OCI_INDEX,
        ManifestInvalidError,
        "index has no manifests list",
    ),
    (
        "manifest-as-schema1",
        "multi",
        "",
        DOCKER_SCHEMA1,
        UnsupportedMediaTypeError,
        "schema 1",
    ),
]


@pytest.mark.parametrize(
    ("name", "child", "content_type", "error", "fragment"),
    [case[1:] for case in CONTENT_TYPE_LIES],
    ids=[case[0] for case in CONTENT_TYPE_LIES],
)
def test_content_type_disagreeing_with_the_manifest_is_refused(
    registry_plain: Registry,
    proxy: FaultProxy,
    store: Store,
    name: str,
    child: str,
    content_type: str,
    error: type[OcistoreError],
    fragment: str,
) -> None:
    image: PushedImage = getattr(registry_plain.images, name)
    target = image.child(child).digest if child else f"{image.repo}/manifests/{image.tag}"
    proxy.rewrite(match=target, headers={"Content-Type": content_type})
    with pytest.raises(error) as exc:
        store.pull(_ref(proxy.host, image), platform=child or None)
    assert fragment in _one_line(exc.value)
    assert isinstance(exc.value, ContentError) and exc.value.exit_code == 7
    assert [r.fault for r in proxy.requests].count("rewrite") == 1
    assert proxy.blob_requests() == []
    _assert_holds_nothing(store)
    _assert_consistent(store)


# --- 4. an index without the wanted platform ---------------------------------------------------
def test_index_without_the_platform_stores_nothing(
    registry_plain: Registry, proxy: FaultProxy, store: Store
) -> None:
    """test_pull checks the message; here: only the index was fetched, and nothing stored."""
    image = registry_plain.images.multiarch
    with pytest.raises(PlatformNotFoundError) as exc:
        store.pull(_ref(proxy.host, image), platform="linux/s390x")
    message = _one_line(exc.value)
    assert exc.value.exit_code == 3
    assert "linux/s390x" in message
    assert "available: linux/amd64, linux/arm/v7, linux/arm64" in message
    assert [r.path for r in proxy.requests if "/manifests/" in r.path] == [
        f"/v2/{image.repo}/manifests/{image.tag}"
    ]
    assert proxy.blob_requests() == []
    _assert_holds_nothing(store)
    _assert_consistent(store)


# --- 5. malformed JSON: manifests and configs -----------------------------------------------
def _malformed_manifests() -> list[tuple[str, bytes, str]]:
    no_layers = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": WRONG_DIFF_ID, "size": 2},
    }
    bad_config_digest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": "sha256:zz", "size": 2},
        "layers": [],
    }
    return [
        ("not-json", b'{"schemaVersion": 2, "layers": [', "manifest is not valid JSON"),
        ("empty", b"", "manifest is not valid JSON"),
        ("latin1", b'{"schemaVersion": 2, "x": "caf\xe9"}', "manifest is not valid JSON"),
        ("array", b"[]", "manifest is not a JSON object"),
        ("schema-3", b'{"schemaVersion": 3}', "schemaVersion 3 is not 2"),
        ("no-layers", json.dumps(no_layers).encode(), "manifest has no layers list"),
        ("bad-config-digest", json.dumps(bad_config_digest).encode(), "manifest config: "),
    ]


MALFORMED_MANIFESTS = _malformed_manifests()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [case[1:] for case in MALFORMED_MANIFESTS],
    ids=[case[0] for case in MALFORMED_MANIFESTS],
)
def test_malformed_manifest_is_refused(
    registry_plain: Registry, proxy: FaultProxy, store: Store, body: bytes, fragment: str
) -> None:
    """A consistent liar: the Docker-Content-Digest header matches the broken body."""
    image = registry_plain.images.multi
    proxy.rewrite(
        match=f"{image.repo}/manifests/",
        body=body,
        headers={"Docker-Content-Digest": sha256_digest(body)},
    )
    with pytest.raises(ManifestInvalidError) as exc:
        store.pull(_ref(proxy.host, image))
    assert fragment in _one_line(exc.value)
    assert exc.value.exit_code == 7
    assert proxy.blob_requests() == []
    _assert_holds_nothing(store)
    _assert_consistent(store)


@pytest.mark.parametrize(("name", "fragment"), [(k, v[1]) for k, v in BAD_CONFIGS.items()])
def test_malformed_config_from_the_registry_is_refused(
    liars: Liars, liar_proxy: FaultProxy, store: Store, name: str, fragment: str
) -> None:
    image = liars.bad_configs[name]
    with pytest.raises(ManifestInvalidError) as exc:
        store.pull(image.ref(liar_proxy.host))
    assert fragment in _one_line(exc.value)
    assert exc.value.exit_code == 7
    # The config came (verified by its digest); no layer was asked for.
    assert liar_proxy.fetched_digests() == [image.config_digest]
    _assert_holds_nothing(store, config=image.config_digest)
    _assert_consistent(store)


# --- 6. manifests at and over 4 MiB ------------------------------------------------------------
def _over_limit(manifest: bytes) -> bytes:
    """The manifest with one more byte of padding in its annotation (still valid JSON)."""
    return manifest.replace(b'"xxx', b'"xxxx', 1)


def test_manifest_of_exactly_4_mib_from_the_real_registry_is_pulled(
    liars: Liars, store: Store
) -> None:
    image = liars.at_limit
    assert len(image.manifest) == MAX_MANIFEST_BYTES
    result = store.pull(image.ref(liars.host))
    assert str(result.manifest_digest) == image.manifest_digest
    assert store.content.read(result.manifest_digest) == image.manifest
    _assert_consistent(store)


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "no-content-length"])
def test_manifest_over_4_mib_is_refused_before_it_is_parsed(
    liars: Liars, liar_proxy: FaultProxy, store: Store, length: bool
) -> None:
    """The 4 MiB manifest plus one byte of padding: still valid JSON, its digest announced
    correctly; refused by size alone, from Content-Length or while reading."""
    body = _over_limit(liars.at_limit.manifest)
    assert len(body) == MAX_MANIFEST_BYTES + 1 and json.loads(body)
    liar_proxy.rewrite(
        match=f"{liars.at_limit.repo}/manifests/",
        body=body,
        headers={"Docker-Content-Digest": sha256_digest(body)},
        length=length,
    )
    with pytest.raises(ManifestInvalidError) as exc:
        store.pull(liars.at_limit.ref(liar_proxy.host))
    message = _one_line(exc.value)
    assert exc.value.exit_code == 7
    # The client's own refusals (model.parse_manifest would say "over the 4 MiB limit").
    if length:
        assert f"is {len(body)} bytes, over the limit" in message
    else:
        assert f"over the {MAX_MANIFEST_BYTES}-byte limit" in message
    assert liar_proxy.blob_requests() == []
    _assert_holds_nothing(store)
    _assert_consistent(store)


# --- the same lies through the CLI -------------------------------------------------------------
@dataclass(frozen=True)
class CliLie:
    ref: str
    args: list[str]
    exit_code: int
    fragment: str  # of the stderr line
    config: str | None = None  # the (verified) config blob the failed pull may leave


Setup = Callable[[Registry, Liars, FaultProxy, FaultProxy], CliLie]


def _cli_diffid(reg: Registry, liars: Liars, proxy: FaultProxy, lp: FaultProxy) -> CliLie:
    return CliLie(liars.diffid.ref(liars.host), [], 6, WRONG_DIFF_ID, liars.diffid.config_digest)


def _cli_manifest_digest(reg: Registry, liars: Liars, proxy: FaultProxy, lp: FaultProxy) -> CliLie:
    told = _wrong_manifest_by_digest(reg, proxy)
    return CliLie(told.ref, [], 6, told.served)


def _cli_content_type(reg: Registry, liars: Liars, proxy: FaultProxy, lp: FaultProxy) -> CliLie:
    image = reg.images.multiarch
    proxy.rewrite(match=f"{image.repo}/manifests/", headers={"Content-Type": mt.OCI_MANIFEST})
    return CliLie(_ref(proxy.host, image), [], 7, f"but was served as {mt.OCI_MANIFEST}")


def _cli_platform(reg: Registry, liars: Liars, proxy: FaultProxy, lp: FaultProxy) -> CliLie:
    image = reg.images.multiarch
    return CliLie(image.reference, ["--platform", "linux/s390x"], 3, "available: linux/amd64")


def _cli_manifest_json(reg: Registry, liars: Liars, proxy: FaultProxy, lp: FaultProxy) -> CliLie:
    image, body = reg.images.multi, b"{not json"
    proxy.rewrite(
        match=f"{image.repo}/manifests/",
        body=body,
        headers={"Docker-Content-Digest": sha256_digest(body)},
    )
    return CliLie(_ref(proxy.host, image), [], 7, "manifest is not valid JSON")


def _cli_config_json(reg: Registry, liars: Liars, proxy: FaultProxy, lp: FaultProxy) -> CliLie:
    image = liars.bad_configs["not-json"]
    return CliLie(
        image.ref(liars.host), [], 7, "image config is not valid JSON", image.config_digest
    )


def _cli_oversized(reg: Registry, liars: Liars, proxy: FaultProxy, lp: FaultProxy) -> CliLie:
    image = liars.at_limit
    lp.rewrite(match=f"{image.repo}/manifests/", body=_over_limit(image.manifest), length=False)
    return CliLie(image.ref(lp.host), [], 7, f"over the {MAX_MANIFEST_BYTES}-byte limit")


CLI_LIES: dict[str, Setup] = {
    "diffid": _cli_diffid,
    "manifest-digest": _cli_manifest_digest,
    "content-type": _cli_content_type,
    "platform": _cli_platform,
    "manifest-json": _cli_manifest_json,
    "config-json": _cli_config_json,
    "oversized-manifest": _cli_oversized,
}


@pytest.mark.parametrize("lie", list(CLI_LIES))
def test_cli_reports_a_lie_in_one_line_with_its_exit_code(
    registry_plain: Registry,
    liars: Liars,
    proxy: FaultProxy,
    liar_proxy: FaultProxy,
    tmp_path: Path,
    lie: str,
) -> None:
    told = CLI_LIES[lie](registry_plain, liars, proxy, liar_proxy)
    root = tmp_path / "store"
    proc = subprocess.run(
        _cli(root, "pull", "--quiet", *told.args, told.ref),
        capture_output=True,
        text=True,
        env=_cli_env(tmp_path),
        timeout=60,
    )
    assert proc.returncode == told.exit_code, proc.stderr
    assert told.fragment in _one_error_line(proc.stderr)
    assert proc.stdout == ""
    s = _store(root)
    try:
        _assert_holds_nothing(s, config=told.config)
        _assert_consistent(s)
    finally:
        s.close()
