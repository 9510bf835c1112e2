"""Smoke tests of the integration fixtures themselves, without ocistore.

They check what the fixtures promise with independent clients only: skopeo,
umoci, Python's tarfile and plain ``requests`` calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import requests

from .images import (
    MT_IN_TOTO,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    NON_UTF8_NAME,
    XATTR_NAME,
    XATTR_VALUE,
    BuiltImages,
    Layout,
    MissingDebsError,
    find_debs,
)
from .registryd import Registry, RegistryFactory
from .tokenserver import LEEWAY, TokenServer, decode_jwt, parse_scope

pytestmark = pytest.mark.integration

DOCKER_V2S2 = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT_ALL = ", ".join(
    [
        MT_OCI_INDEX,
        MT_OCI_MANIFEST,
        DOCKER_V2S2,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_members(layout: Path, digest: str) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(Layout(layout).blob_path(digest), "r:gz") as tf:
        return {m.name: m for m in tf.getmembers()}


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme, dict(re.findall(r'(\w+)="([^"]*)"', rest))


# --------------------------------------------------------------------------
# Images


def test_missing_debs_message_names_fetch_script(tmp_path: Path) -> None:
    with pytest.raises(MissingDebsError, match="tools/fetch-test-debs"):
        find_debs(tmp_path)


def test_multi_layers_have_expected_tar_entries(test_images: BuiltImages) -> None:
    multi = test_images.multi
    assert len(multi.layers) == 4
    l1, l2, l3, l4 = (layer_members(multi.layout, d) for d in multi.layer_digests)

    assert "bin/busybox" in l1 and "usr/share/doc/netbase/copyright" in l1
    # L2: file and whole-directory whiteouts; umoci writes no opaque markers.
    assert "etc/.wh.rpc" in l2
    assert "usr/share/doc/.wh.netbase" in l2
    assert "lib/terminfo/.wh.l" in l2 and "lib/terminfo/o/ocistore-term" in l2
    assert not any(n.endswith(".wh..wh..opq") for n in [*l1, *l2, *l3])
    assert l2["bin/sh"].issym() and l2["bin/sh"].linkname == "/bin/busybox"
    assert l2["usr/bin/hi"].linkname == "hello"
    assert l2["usr/bin/hello-hardlink"].islnk()
    assert l2["ocistore-test/hardlink-b"].islnk()
    assert l2["ocistore-test/fifo"].isfifo()
    assert l2["ocistore-test/setuid-file"].mode & stat.S_ISUID
    assert l2["ocistore-test/readonly-dir"].mode & 0o777 == 0o555
    xattr_file = l2["ocistore-test/xattr-file"]
    assert xattr_file.pax_headers[f"SCHILY.xattr.{XATTR_NAME}"] == XATTR_VALUE.decode()
    names = set(l2)
    assert any(len(n.rsplit("/", 1)[-1]) >= 200 for n in names)
    # tarfile decodes the non-UTF-8 name with surrogateescape.
    assert "ocistore-test/" + os.fsdecode(NON_UTF8_NAME) in names
    # L3: file -> directory, directory -> file (umoci adds .wh. entries *below*
    # the new file for the old directory's children).
    assert l3["etc/protocols"].isdir() and "etc/protocols/README" in l3
    assert l3["usr/share/cowsay/cows"].isfile()
    assert "usr/share/cowsay/cows/.wh.apt.cow" in l3
    # L4: hand-built with GNU tar.
    assert "usr/share/doc/busybox-static/.wh..wh..opq" in l4
    assert "ocistore-test/.wh.hardlink-b" in l4


def test_umoci_unpack_oracle(test_images: BuiltImages, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "--log", "error", "unpack", "--image", test_images.multi.umoci_image, bundle],
        check=True,
        capture_output=True,
    )
    root = bundle / "rootfs"
    assert not (root / "etc/rpc").exists()
    assert not (root / "usr/share/doc/netbase").exists()
    assert sorted(os.listdir(root / "usr/share/doc/busybox-static")) == ["README.opaque"]
    assert sorted(os.listdir(root / "lib/terminfo")) == ["o"]
    assert (root / "etc/protocols").is_dir()
    assert (root / "usr/share/cowsay/cows").is_file()
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert os.getxattr(root / "ocistore-test/xattr-file", XATTR_NAME) == XATTR_VALUE
    assert not (root / "ocistore-test/hardlink-b").exists()
    assert os.stat(root / "ocistore-test/hardlink-a").st_nlink == 2
    assert stat.S_ISFIFO(os.lstat(root / "ocistore-test/fifo").st_mode)
    assert os.path.exists(os.fsencode(root / "ocistore-test") + b"/" + NON_UTF8_NAME)


def test_multiarch_layout_index(test_images: BuiltImages) -> None:
    idx = test_images.multiarch
    platforms = sorted(
        "/".join(v for k in ("os", "architecture", "variant") if (v := (i.platform or {}).get(k)))
        for i in idx.images
    )
    assert platforms == ["linux/amd64", "linux/arm/v7", "linux/arm64/v8"]
    assert idx.image_for("linux/arm64/v8").platform == {
        "os": "linux",
        "architecture": "arm64",
        "variant": "v8",
    }
    assert idx.attestation_digest


# --------------------------------------------------------------------------
# Every image on every registry


@pytest.mark.parametrize("name", ["multi", "multi_v2s2", "multi_zstd", "multiarch"])
def test_skopeo_inspect_every_image(any_registry: Registry, name: str) -> None:
    img = getattr(any_registry.images, name)
    raw = any_registry.inspect_raw(img.repo, img.tag)
    assert sha256(raw) == img.manifest_digest
    assert img.host == any_registry.host
    if name == "multiarch":
        assert img.is_index and len(img.children) == 4
        return
    manifest = json.loads(raw)
    assert manifest["config"]["digest"] == img.config_digest
    assert [ld["digest"] for ld in manifest["layers"]] == list(img.layer_digests)
    assert len(img.diff_ids) == len(img.layer_digests) == 4


def test_variants_differ_as_expected(registry_plain: Registry, test_images: BuiltImages) -> None:
    imgs = registry_plain.images
    layout = test_images.multi
    # OCI push is byte-for-byte the layout's manifest.
    assert imgs.multi.manifest_digest == layout.manifest_digest
    assert imgs.multi.media_type == MT_OCI_MANIFEST
    assert imgs.multi.layer_digests == layout.layer_digests
    assert imgs.multi.diff_ids == layout.diff_ids
    # Docker schema 2: same blobs, different manifest.
    assert imgs.multi_v2s2.media_type == DOCKER_V2S2
    assert imgs.multi_v2s2.layer_digests == layout.layer_digests
    assert set(imgs.multi_v2s2.layer_media_types) == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }
    # zstd: new layer blobs, same diffIDs (same config).
    assert imgs.multi_zstd.layer_media_types == (
        ("application/vnd.oci.image.layer.v1.tar+zstd",) * 4
    )
    assert not set(imgs.multi_zstd.layer_digests) & set(layout.layer_digests)
    assert imgs.multi_zstd.diff_ids == layout.diff_ids
    assert imgs.multi_zstd.config_digest == layout.config_digest


def test_same_digests_on_every_registry(
    registry_plain: Registry,
    registry_basic: Registry,
    registry_token: Registry,
    registry_tls: Registry,
) -> None:
    for name in ("multi", "multi_v2s2", "multi_zstd", "multiarch"):
        digests = {
            getattr(r.images, name).manifest_digest
            for r in (registry_plain, registry_basic, registry_token, registry_tls)
        }
        assert len(digests) == 1, name


def test_multiarch_served_as_index(registry_plain: Registry, test_images: BuiltImages) -> None:
    img = registry_plain.images.multiarch
    r = requests.get(
        f"{registry_plain.url}/v2/{img.repo}/manifests/{img.tag}",
        headers={"Accept": MT_OCI_INDEX},
        timeout=10,
    )
    assert r.status_code == 200
    assert r.headers["Content-Type"] == MT_OCI_INDEX
    assert r.headers["Docker-Content-Digest"] == img.manifest_digest == sha256(r.content)
    assert img.manifest_digest == test_images.multiarch.index_digest
    assert {c.platform_string for c in img.children} == {
        "linux/amd64",
        "linux/arm64/v8",
        "linux/arm/v7",
        "unknown/unknown",
    }
    att = img.child("unknown/unknown")
    assert att.annotations["vnd.docker.reference.type"] == "attestation-manifest"
    assert att.annotations["vnd.docker.reference.digest"] == img.child("linux/amd64").digest
    assert att.layer_media_types == (MT_IN_TOTO,)
    arm = img.child("linux/arm/v7")
    assert arm.digest == test_images.multiarch.image_for("linux/arm/v7").manifest_digest


def test_push_helper_converts(registry_factory: RegistryFactory, test_images: BuiltImages) -> None:
    reg = registry_factory.start("plain")
    with pytest.raises(RuntimeError, match="no standard images"):
        _ = reg.images
    layout = test_images.multiarch
    small = layout.image_for("linux/amd64")
    zstd = reg.push(layout.layout, small.tag, "scratch/small", "zstd", compress="zstd")
    assert zstd.layer_media_types == ("application/vnd.oci.image.layer.v1.tar+zstd",)
    assert zstd.diff_ids == small.diff_ids
    v2s2 = reg.push(layout.layout, small.tag, "scratch/small", "v2s2", format="v2s2")
    assert v2s2.media_type == DOCKER_V2S2
    assert v2s2.layer_digests == small.layer_digests
    plain = reg.push(layout.layout, small.tag, "scratch/small", "oci")
    assert plain.manifest_digest == small.manifest_digest
    assert plain.source_oci_ref == f"oci:{layout.layout}:{small.tag}"


# --------------------------------------------------------------------------
# Plain


def test_plain_no_auth(registry_plain: Registry) -> None:
    r = requests.get(f"{registry_plain.url}/v2/", timeout=10)
    assert r.status_code == 200
    assert r.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


# --------------------------------------------------------------------------
# Basic


def test_basic_auth(registry_basic: Registry) -> None:
    url = f"{registry_basic.url}/v2/"
    r = requests.get(url, timeout=10)
    assert r.status_code == 401
    scheme, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert scheme == "Basic" and params["realm"] == "ocistore-test"
    assert (
        requests.get(url, auth=(str(registry_basic.username), "wrong"), timeout=10).status_code
        == 401
    )
    assert requests.get(url, **registry_basic.requests_kwargs()).status_code == 200
    img = registry_basic.images.multi
    r = requests.get(
        f"{registry_basic.url}/v2/{img.repo}/manifests/{img.tag}",
        headers={"Accept": ACCEPT_ALL},
        **registry_basic.requests_kwargs(),
    )
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == img.manifest_digest


# --------------------------------------------------------------------------
# Token


def test_token_challenge(registry_token: Registry, token_server: TokenServer) -> None:
    img = registry_token.images.multi
    r = requests.get(f"{registry_token.url}/v2/{img.repo}/manifests/{img.tag}", timeout=10)
    assert r.status_code == 401
    scheme, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert scheme == "Bearer"
    assert params["realm"] == token_server.realm
    assert params["service"] == token_server.service
    assert params["scope"] == f"repository:{img.repo}:pull"
    assert token_server.tokens_issued == 0


def test_token_anonymous_pull(registry_token: Registry, token_server: TokenServer) -> None:
    img = registry_token.images.multi
    scope = f"repository:{img.repo}:pull,push"
    r = requests.get(
        token_server.realm, params={"service": token_server.service, "scope": scope}, timeout=10
    )
    assert r.status_code == 200
    body = r.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == token_server.expires_in and body["issued_at"].endswith("Z")
    header, claims = decode_jwt(body["token"])
    assert header["alg"] == "ES256" and header["x5c"]
    assert claims["access"] == [{"type": "repository", "name": img.repo, "actions": ["pull"]}]
    for claim in ("iss", "sub", "aud", "exp", "nbf", "iat", "jti"):
        assert claim in claims

    auth = {"Authorization": f"Bearer {body['token']}", "Accept": ACCEPT_ALL}
    r = requests.get(
        f"{registry_token.url}/v2/{img.repo}/manifests/{img.tag}", headers=auth, timeout=10
    )
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == img.manifest_digest
    # Anonymous token has no push: starting an upload is refused.
    r = requests.post(
        f"{registry_token.url}/v2/{img.repo}/blobs/uploads/", headers=auth, timeout=10
    )
    assert r.status_code == 401
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]

    assert token_server.tokens_issued == 1
    (req,) = token_server.requests
    assert not req.has_authorization and not req.authenticated
    assert req.scopes == (scope,)


def test_token_credentials_grant_push(registry_token: Registry, token_server: TokenServer) -> None:
    token = registry_token.bearer_token("repository:scratch/upload:pull,push", credentials=True)
    _, claims = decode_jwt(token)
    assert claims["sub"] == registry_token.username
    assert claims["access"][0]["actions"] == ["pull", "push"]
    auth = {"Authorization": f"Bearer {token}"}
    r = requests.post(
        f"{registry_token.url}/v2/scratch/upload/blobs/uploads/", headers=auth, timeout=10
    )
    assert r.status_code == 202
    location = r.headers["Location"]
    if location.startswith("/"):
        location = registry_token.url + location
    requests.delete(location, headers=auth, timeout=10)
    (req,) = token_server.requests
    assert req.has_authorization and req.authorization_scheme == "Basic" and req.authenticated

    bad = requests.get(
        token_server.realm,
        params={"service": token_server.service, "scope": "repository:x:pull"},
        auth=(str(registry_token.username), "wrong"),
        timeout=10,
    )
    assert bad.status_code == 401
    assert token_server.tokens_issued == 1


def test_expired_token_rejected(registry_token: Registry, token_server: TokenServer) -> None:
    img = registry_token.images.multi
    url = f"{registry_token.url}/v2/{img.repo}/manifests/{img.tag}"
    access = [{"type": "repository", "name": img.repo, "actions": ["pull"]}]

    def status(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT_ALL}
        return requests.get(url, headers=headers, timeout=10).status_code

    now = time.time()
    assert status(token_server.make_token(access)) == 200
    # distribution allows 60 s of clock skew past "exp"...
    assert status(token_server.make_token(access, expires_in=60, issued_at=now - 70)) == 200
    # ...but not more.
    expired = token_server.make_token(access, expires_in=60, issued_at=now - 60 - LEEWAY - 30)
    assert status(expired) == 401
    assert status(token_server.make_token(access, issuer="someone-else")) == 401
    assert status(token_server.make_token(access, audience="other-service")) == 401


def test_short_lived_tokens(registry_token: Registry, token_server: TokenServer) -> None:
    token_server.expires_in = 60
    token = registry_token.bearer_token("repository:ocistore-test/multi:pull")
    _, claims = decode_jwt(token)
    assert claims["exp"] - claims["iat"] == 60
    assert token_server.requests[-1].granted[0]["actions"] == ["pull"]


def test_skopeo_pull_fetches_anonymous_token(
    registry_token: Registry, token_server: TokenServer
) -> None:
    img = registry_token.images.multi_v2s2
    before = token_server.tokens_issued
    raw = registry_token.inspect_raw(img.repo, img.tag)
    assert sha256(raw) == img.manifest_digest
    assert token_server.tokens_issued > before
    assert not any(r.has_authorization for r in token_server.requests)


def test_skopeo_push_uses_credentials_at_realm(
    registry_token: Registry, token_server: TokenServer, test_images: BuiltImages
) -> None:
    small = test_images.multiarch.image_for("linux/arm/v7")
    pushed = registry_token.push(small.layout, small.tag, "scratch/pushed", "v1")
    assert pushed.manifest_digest == small.manifest_digest
    push_requests = [
        r
        for r in token_server.requests
        if any("push" in (parse_scope(s) or ("", "", []))[2] for s in r.scopes)
    ]
    assert push_requests and all(r.authenticated for r in push_requests)
    # The registry's own manifest reads after the push (describe) are anonymous.
    assert any(not r.has_authorization for r in token_server.requests)


# --------------------------------------------------------------------------
# TLS


def test_tls(registry_tls: Registry) -> None:
    assert registry_tls.url.startswith("https://127.0.0.1:")
    assert registry_tls.ca_file is not None and registry_tls.certs_d is not None
    ca = registry_tls.certs_d / registry_tls.host / "ca.crt"
    assert ca.read_bytes() == registry_tls.ca_file.read_bytes()
    r = requests.get(f"{registry_tls.url}/v2/", verify=str(registry_tls.ca_file), timeout=10)
    assert r.status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{registry_tls.url}/v2/", timeout=10)  # system CAs only
    r = requests.get(
        f"https://localhost:{registry_tls.port}/v2/", verify=str(registry_tls.ca_file), timeout=10
    )
    assert r.status_code == 200
    # Go's TLS server answers plain HTTP with 400.
    assert requests.get(f"http://{registry_tls.host}/v2/", timeout=10).status_code == 400
