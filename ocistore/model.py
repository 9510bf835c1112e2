"""Parsed, validated image documents: descriptors, indexes, manifests and configs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from ocistore import mediatypes as mt
from ocistore.digest import Digest
from ocistore.errors import (
    InvalidDigestError,
    ManifestInvalidError,
    UnsupportedMediaTypeError,
)
from ocistore.platform import Platform

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024


class Descriptor(NamedTuple):
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = MappingProxyType({})  # a shared default: read-only

    @classmethod
    def from_json(cls, obj: Any, *, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ManifestInvalidError(f"{where}: descriptor is not an object")
        try:
            digest = Digest.parse(str(obj["digest"]))
            size = obj["size"]
            media_type = obj.get("mediaType", "")
        except KeyError as exc:
            raise ManifestInvalidError(f"{where}: descriptor has no {exc.args[0]!r}") from None
        except InvalidDigestError as exc:
            raise ManifestInvalidError(f"{where}: {exc.message}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestInvalidError(f"{where}: descriptor size {size!r} is not a count")
        if not isinstance(media_type, str):
            raise ManifestInvalidError(f"{where}: descriptor mediaType is not a string")
        plat = obj.get("platform")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise ManifestInvalidError(f"{where}: annotations is not an object")
        return cls(
            media_type,
            digest,
            size,
            Platform.from_descriptor(plat) if isinstance(plat, dict) else None,
            {str(k): str(v) for k, v in annotations.items()},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.platform is not None:
            plat: dict[str, str] = {
                "architecture": self.platform.architecture,
                "os": self.platform.os,
            }
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            out["platform"] = plat
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


class Index(NamedTuple):
    media_type: str
    manifests: list[Descriptor]


class Manifest(NamedTuple):
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


class ImageConfig(NamedTuple):
    diff_ids: list[Digest]
    platform: Platform
    document: dict[str, Any]

    @property
    def chain_ids(self) -> list[Digest]:
        return chain_ids(self.diff_ids)


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestInvalidError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestInvalidError(f"{what} is not a JSON object")
    return doc


def _base_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def parse_manifest(data: bytes, content_type: str | None = None) -> Index | Manifest:
    """Parse an index or image manifest, deciding its type from the body and Content-Type.

    The body's ``mediaType`` is authoritative; a Content-Type naming a different manifest
    type is a lying registry, and is refused.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalidError(f"manifest is {len(data)} bytes, over the 4 MiB limit")
    header_type = _base_type(content_type)
    if header_type in mt.DOCKER_SCHEMA1:
        raise UnsupportedMediaTypeError(
            "the registry only offers a Docker schema 1 manifest, which is deprecated and "
            "not supported; ask its maintainer to push a schema 2 or OCI image"
        )
    doc = _load_json(data, "manifest")
    if doc.get("schemaVersion") == 1:
        raise UnsupportedMediaTypeError(
            "Docker schema 1 manifests are deprecated and not supported"
        )
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalidError(f"manifest schemaVersion {doc.get('schemaVersion')!r} is not 2")
    body_type = doc.get("mediaType")
    known = mt.INDEX_TYPES + mt.MANIFEST_TYPES
    if body_type is not None and not isinstance(body_type, str):
        raise ManifestInvalidError("manifest mediaType is not a string")
    if body_type and header_type in known and body_type != header_type:
        raise ManifestInvalidError(
            f"manifest says it is {body_type} but was served as {header_type}"
        )
    media_type = body_type or (header_type if header_type in known else "")
    if not media_type:
        # OCI allows omitting mediaType; tell the two shapes apart by their fields.
        media_type = mt.OCI_INDEX if "manifests" in doc else mt.OCI_MANIFEST
    if media_type in mt.INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ManifestInvalidError("index has no manifests list")
        return Index(
            media_type,
            [Descriptor.from_json(e, where=f"index entry {i}") for i, e in enumerate(entries)],
        )
    if media_type in mt.MANIFEST_TYPES:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestInvalidError("manifest has no layers list")
        return Manifest(
            media_type,
            Descriptor.from_json(doc.get("config"), where="manifest config"),
            [Descriptor.from_json(e, where=f"layer {i}") for i, e in enumerate(layers)],
        )
    raise UnsupportedMediaTypeError(f"unsupported manifest media type {media_type!r}")


def parse_config(data: bytes) -> ImageConfig:
    doc = _load_json(data, "image config")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise ManifestInvalidError("image config has no rootfs.diff_ids")
    try:
        diff_ids = [Digest.parse(str(d)) for d in rootfs["diff_ids"]]
    except InvalidDigestError as exc:
        raise ManifestInvalidError(f"image config: {exc.message}") from None
    plat = Platform.from_descriptor(doc)
    return ImageConfig(diff_ids, plat, doc)


def chain_ids(diff_ids: list[Digest]) -> list[Digest]:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[Digest] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            text = f"{out[-1]} {diff_id}".encode()
            out.append(Digest("sha256", hashlib.sha256(text).hexdigest()))
    return out
