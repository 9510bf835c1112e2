"""Media types ocistore reads, and how each layer type is compressed."""

from __future__ import annotations

from typing import Final, Literal

OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYOUT_VERSION: Final = "1.0.0"

DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1: Final = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

INDEX_TYPES: Final = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES: Final = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES: Final = (OCI_CONFIG, DOCKER_CONFIG)

# What we send in Accept: every type we can read, and nothing we cannot.
MANIFEST_ACCEPT: Final = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))

Compression = Literal["gzip", "zstd", "none"]

LAYER_COMPRESSION: Final[dict[str, Compression]] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    # Non-distributable variants are deprecated but still in the wild (Windows bases).
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}

ANNOTATION_REF_NAME: Final = "org.opencontainers.image.ref.name"
