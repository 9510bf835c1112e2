"""What ``Store``'s read and remove operations return (``images``, ``inspect``, ``df``,
``rmi``): plain frozen records, kept out of :mod:`ocistore.api` so that commands which
never build one (``create``, ``pull``) do not pay for defining them at start-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DiskUsage", "ImageInfo", "ImageSummary", "ImageUsage", "LayerInfo", "RemovedImage"]


@dataclass(frozen=True)
class LayerInfo:
    digest: str
    media_type: str
    size: int
    diff_id: str
    chain_id: str
    directory: str | None
    unpacked_size: int | None


@dataclass(frozen=True)
class ImageInfo:
    reference: str
    manifest_digest: str
    manifest_media_type: str
    index_digest: str | None
    platform: str
    config_digest: str
    config: dict[str, Any]
    layers: list[LayerInfo]
    pulled: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageSummary:
    reference: str
    manifest_digest: str
    platform: str
    created: str | None
    size: int  # unpacked bytes of all its layers
    compressed_size: int
    layers: int


@dataclass(frozen=True)
class ImageUsage:
    reference: str
    size: int  # all its layers (what `images` shows)
    shared: int  # of that, layers another image uses too
    unique: int  # what removing only this image would free in layers


@dataclass(frozen=True)
class DiskUsage:
    images: list[ImageUsage]
    layers_total: int  # every layer directory once, however many images share it
    layers_shared: int  # layers used by two or more images
    layers_count: int
    blobs_total: int  # the content store (compressed layers, manifests, configs)
    blobs_count: int
    containers: list[tuple[str, int]]  # (name, writable layer bytes)
    volumes: list[tuple[str, int]]  # (name, bytes)


@dataclass(frozen=True)
class RemovedImage:
    reference: str
    blobs: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
