"""Manifests, indexes and configs: the real busybox documents, and what must be refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from ocistore import mediatypes as mt
from ocistore.digest import Digest
from ocistore.errors import ContentError, ManifestInvalidError, UnsupportedMediaTypeError
from ocistore.model import (
    MAX_MANIFEST_BYTES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    chain_ids,
    parse_config,
    parse_manifest,
)
from ocistore.platform import Platform
from tests.unit.conftest import BUSYBOX_IDS, BUSYBOX_PLATFORM_DIRS, load_busybox

D1 = Digest.parse("sha256:" + "11" * 32)
D2 = Digest.parse("sha256:" + "22" * 32)
D3 = Digest.parse("sha256:" + "33" * 32)


def _desc(digest: Digest = D1, size: int = 10, media_type: str = mt.OCI_MANIFEST) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(digest), "size": size}


def _manifest_doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": _desc(D1, 100, mt.OCI_CONFIG),
        "layers": [_desc(D2, 200, "application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    doc.update(extra)
    return doc


def _index_doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "manifests": [
            {**_desc(D1), "platform": {"os": "linux", "architecture": "amd64"}},
            {**_desc(D2), "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        ],
    }
    doc.update(extra)
    return doc


def _enc(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# --- the recorded busybox documents --------------------------------------------------------------


@pytest.mark.parametrize("directory", BUSYBOX_PLATFORM_DIRS, ids=BUSYBOX_IDS)
def test_busybox_documents_parse(directory: Path) -> None:
    image = load_busybox(directory)

    index = parse_manifest(image.index, mt.OCI_INDEX)
    assert isinstance(index, Index)
    assert index.media_type == mt.OCI_INDEX
    assert len(index.manifests) == 1
    entry = index.manifests[0]
    # The fixture's promise: the index names the manifest's true digest and size.
    assert entry.digest == Digest.of(image.manifest)
    assert entry.size == len(image.manifest)
    assert entry.media_type == mt.OCI_MANIFEST
    assert entry.platform is not None
    raw_platform = image.index_doc["manifests"][0]["platform"]
    assert entry.platform == Platform.from_descriptor(raw_platform)
    assert entry.annotations[mt.ANNOTATION_REF_NAME].startswith("busybox:1.38.0-")

    manifest = parse_manifest(image.manifest, mt.OCI_MANIFEST + "; charset=utf-8")
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == mt.OCI_MANIFEST
    assert manifest.config.media_type == mt.OCI_CONFIG
    assert manifest.config.digest == Digest.of(image.config)
    assert manifest.config.size == len(image.config)
    assert len(manifest.layers) == 1
    for layer in manifest.layers:
        assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert mt.LAYER_COMPRESSION[layer.media_type] == "gzip"
        assert layer.size > 100_000  # a real busybox rootfs, not a stub

    config = parse_config(image.config)
    assert isinstance(config, ImageConfig)
    assert len(config.diff_ids) == len(manifest.layers)
    assert [str(d) for d in config.diff_ids] == image.config_doc["rootfs"]["diff_ids"]
    # The config's own platform agrees with the index entry that points at it.
    assert config.platform == entry.platform
    assert config.platform.os == "linux"
    # One layer: the chain ID is the diff ID itself.
    assert config.chain_ids == config.diff_ids
    assert config.document["config"]["Cmd"] == ["sh"]


def test_busybox_musl_amd64_known_values(busybox_musl_amd64: Any) -> None:
    manifest = parse_manifest(busybox_musl_amd64.manifest)
    assert isinstance(manifest, Manifest)
    assert str(manifest.config.digest) == (
        "sha256:654fc8fd836e35f4a64586bddf8f59b9029b48cf80f520834c6c98ca8ab5def9"
    )
    assert str(manifest.layers[0].digest) == (
        "sha256:5c3b447848a98e48dce106cb3e6acbd4fb6f9b26ee778798137349ce01f4d3c1"
    )
    assert manifest.layers[0].size == 886160
    config = parse_config(busybox_musl_amd64.config)
    assert [str(d) for d in config.diff_ids] == [
        "sha256:0f8918d0fe4f272ce8acece89916a9ba0b240584d3c1dd1943f343f69b0d0ffb"
    ]
    assert config.platform == Platform("linux", "amd64")


# --- chain IDs -----------------------------------------------------------------------------------


def test_chain_ids_by_hand() -> None:
    c2 = "sha256:" + hashlib.sha256(f"{D1} {D2}".encode()).hexdigest()
    c3 = "sha256:" + hashlib.sha256(f"{c2} {D3}".encode()).hexdigest()
    assert [str(c) for c in chain_ids([D1, D2, D3])] == [str(D1), c2, c3]
    # Pinned values (cross-checked with `printf '%s' "$C1 $D2" | sha256sum`), so a change
    # in the separator or the encoding is caught even if the code and this test agree.
    assert c2 == "sha256:9932074217c35353d2e03a3f5a86549f7c67bfeb0ba53e23d69f4d4c8f7958f5"
    assert c3 == "sha256:50127c0d6b338be78246434b4bce23ecf75e505158ea0bbd15effeb162fbf3ec"


def test_chain_ids_edge_cases() -> None:
    assert chain_ids([]) == []
    assert chain_ids([D2]) == [D2]
    # Order matters: the same layers stacked differently are a different chain.
    assert chain_ids([D1, D2])[1] != chain_ids([D2, D1])[1]
    config = ImageConfig([D1, D2], Platform("linux", "amd64"), {})
    assert config.chain_ids == chain_ids([D1, D2])


# --- indexes and manifests, with and without mediaType -------------------------------------------


def test_oci_index_without_media_type() -> None:
    index = parse_manifest(_enc(_index_doc()))
    assert isinstance(index, Index)
    assert index.media_type == mt.OCI_INDEX
    assert [d.digest for d in index.manifests] == [D1, D2]
    assert index.manifests[1].platform == Platform("linux", "arm64")


def test_oci_index_with_media_type_and_matching_header() -> None:
    index = parse_manifest(_enc(_index_doc(mediaType=mt.OCI_INDEX)), mt.OCI_INDEX)
    assert isinstance(index, Index)
    assert index.media_type == mt.OCI_INDEX


def test_docker_manifest_list() -> None:
    body = _enc(_index_doc(mediaType=mt.DOCKER_MANIFEST_LIST))
    index = parse_manifest(body, mt.DOCKER_MANIFEST_LIST)
    assert isinstance(index, Index)
    assert index.media_type == mt.DOCKER_MANIFEST_LIST


def test_manifest_without_media_type_is_oci() -> None:
    manifest = parse_manifest(_enc(_manifest_doc()))
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == mt.OCI_MANIFEST
    assert manifest.config.digest == D1
    assert manifest.layers[0].digest == D2


def test_header_type_used_when_body_has_none() -> None:
    manifest = parse_manifest(_enc(_manifest_doc()), mt.DOCKER_MANIFEST)
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == mt.DOCKER_MANIFEST


def test_generic_content_type_does_not_conflict() -> None:
    manifest = parse_manifest(_enc(_manifest_doc(mediaType=mt.DOCKER_MANIFEST)), "application/json")
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == mt.DOCKER_MANIFEST


def test_content_type_parameters_and_case_are_ignored() -> None:
    body = _enc(_manifest_doc(mediaType=mt.OCI_MANIFEST))
    manifest = parse_manifest(body, "Application/VND.OCI.Image.Manifest.v1+JSON ; charset=utf-8")
    assert isinstance(manifest, Manifest)


@pytest.mark.parametrize(
    ("body_type", "header_type", "doc_factory"),
    [
        (mt.OCI_MANIFEST, mt.OCI_INDEX, _manifest_doc),
        (mt.OCI_INDEX, mt.OCI_MANIFEST, _index_doc),
        (mt.DOCKER_MANIFEST, mt.OCI_MANIFEST, _manifest_doc),
        (mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST, _index_doc),
    ],
)
def test_content_type_body_disagreement_is_refused(
    body_type: str, header_type: str, doc_factory: Any
) -> None:
    with pytest.raises(ManifestInvalidError) as info:
        parse_manifest(_enc(doc_factory(mediaType=body_type)), header_type)
    assert body_type in str(info.value) and header_type in str(info.value)
    assert info.value.exit_code == 7


def test_header_says_index_but_body_is_a_manifest_without_media_type() -> None:
    with pytest.raises(ManifestInvalidError, match="no manifests list"):
        parse_manifest(_enc(_manifest_doc()), mt.OCI_INDEX)


# --- schema 1, malformed and oversized -----------------------------------------------------------


@pytest.mark.parametrize("header", mt.DOCKER_SCHEMA1)
def test_schema1_content_type_is_unsupported(header: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="schema 1") as info:
        # Even a body that would otherwise parse is refused on the header alone.
        parse_manifest(_enc(_manifest_doc()), header)
    assert info.value.exit_code == 7


def test_schema1_body_is_unsupported() -> None:
    body = _enc(
        {
            "schemaVersion": 1,
            "name": "library/busybox",
            "tag": "latest",
            "architecture": "amd64",
            "fsLayers": [{"blobSum": str(D1)}],
            "history": [{"v1Compatibility": "{}"}],
        }
    )
    with pytest.raises(UnsupportedMediaTypeError, match="schema 1"):
        parse_manifest(body)
    with pytest.raises(UnsupportedMediaTypeError, match="schema 1"):
        parse_manifest(body, "application/json")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"<html>502 Bad Gateway</html>", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'"manifest"', "not a JSON object"),
        (b"{}", "schemaVersion None is not 2"),
        (b'{"schemaVersion": 3}', "schemaVersion 3 is not 2"),
        (b'{"schemaVersion": "2"}', "is not 2"),
    ],
)
def test_malformed_manifest(body: bytes, message: str) -> None:
    with pytest.raises(ManifestInvalidError, match=message):
        parse_manifest(body)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_manifest_doc(layers=None), "no layers list"),
        (_manifest_doc(layers={}), "no layers list"),
        (_manifest_doc(config=None), "manifest config: descriptor is not an object"),
        (_manifest_doc(config={"digest": str(D1)}), "descriptor has no 'size'"),
        (_manifest_doc(config={"size": 1}), "descriptor has no 'digest'"),
        (_manifest_doc(layers=[{"digest": "sha256:abc", "size": 1}]), "layer 0: invalid digest"),
        (_manifest_doc(layers=[{"digest": str(D1), "size": -1}]), "is not a count"),
        (_manifest_doc(layers=[{"digest": str(D1), "size": True}]), "is not a count"),
        (_manifest_doc(layers=[{"digest": str(D1), "size": 1.5}]), "is not a count"),
        (_manifest_doc(layers=[{"digest": str(D1), "size": "1"}]), "is not a count"),
        (
            _manifest_doc(layers=[{"digest": str(D1), "size": 1, "mediaType": 5}]),
            "mediaType is not a string",
        ),
        (
            _manifest_doc(layers=[{"digest": str(D1), "size": 1, "annotations": ["x"]}]),
            "annotations is not an object",
        ),
        (_manifest_doc(mediaType=5), "mediaType is not a string"),
        (_index_doc(manifests=None), "no manifests list"),
        (_index_doc(manifests=["x"]), "index entry 0: descriptor is not an object"),
    ],
)
def test_malformed_documents(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestInvalidError, match=message):
        parse_manifest(_enc(doc))


def test_unknown_media_type_is_unsupported() -> None:
    doc = _manifest_doc(mediaType="application/vnd.example.thing.v1+json")
    with pytest.raises(UnsupportedMediaTypeError, match="unsupported manifest media type"):
        parse_manifest(_enc(doc))


def test_manifest_over_4_mib_is_refused_before_parsing() -> None:
    body = _enc(_manifest_doc())
    padded = body[:-1] + b" " * (MAX_MANIFEST_BYTES - len(body) + 1) + b"}"
    assert len(padded) == MAX_MANIFEST_BYTES + 1
    with pytest.raises(ManifestInvalidError, match="over the 4 MiB limit") as info:
        parse_manifest(padded)
    assert isinstance(info.value, ContentError)
    # Exactly at the limit is still fine.
    at_limit = padded[:-2] + b"}"
    assert len(at_limit) == MAX_MANIFEST_BYTES
    assert isinstance(parse_manifest(at_limit), Manifest)


# --- configs and descriptors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "no rootfs.diff_ids"),
        ({"rootfs": {"type": "layers"}}, "no rootfs.diff_ids"),
        ({"rootfs": []}, "no rootfs.diff_ids"),
        ({"rootfs": {"diff_ids": ["sha256:xyz"]}}, "image config: invalid digest"),
    ],
)
def test_malformed_config(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestInvalidError, match=message):
        parse_config(_enc(doc))
    with pytest.raises(ManifestInvalidError, match="not valid JSON"):
        parse_config(b"not json")


def test_config_platform_with_variant() -> None:
    doc = {"architecture": "arm", "os": "linux", "variant": "v6", "rootfs": {"diff_ids": []}}
    config = parse_config(_enc(doc))
    assert config.platform == Platform("linux", "arm", "v6")
    assert config.diff_ids == []


def test_descriptor_round_trip() -> None:
    raw = {
        "mediaType": mt.OCI_MANIFEST,
        "digest": str(D3),
        "size": 42,
        "platform": {"architecture": "arm", "os": "linux", "variant": "v6"},
        "annotations": {"a": "b"},
    }
    desc = Descriptor.from_json(raw, where="test")
    assert desc.to_json() == raw
    assert Descriptor.from_json(desc.to_json(), where="test") == desc
    bare = Descriptor.from_json({"digest": str(D3), "size": 0}, where="test")
    assert bare.to_json() == {"mediaType": "", "digest": str(D3), "size": 0}
