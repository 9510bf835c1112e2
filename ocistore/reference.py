"""Image references (``[host[:port]/]path[:tag][@digest]``), normalised as Docker does."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple

from ocistore.errors import InvalidDigestError, InvalidReferenceError

if TYPE_CHECKING:
    from ocistore.digest import Digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
DEFAULT_TAG = "latest"

# These are used with fullmatch(): with match(), '$' also matches before a trailing "\n",
# so "ubuntu\n:latest" or "a.b\n/x" were accepted. re.ASCII keeps \w to [A-Za-z0-9_] as in
# Docker's grammar; Python's default \w also accepts letters and digits of any script.
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^\w[\w.-]{0,127}$", re.ASCII)
_HOST = re.compile(
    r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[0-9a-fA-F:.]+\])"
    r"(?::[0-9]+)?$"
)
_MAX_NAME = 255


class Reference(NamedTuple):
    """A fully normalised reference. ``registry`` is the name users see (``docker.io``)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        original = text
        if not text or text != text.strip():
            raise InvalidReferenceError(f"invalid reference {original!r}: empty or padded")
        digest: Digest | None = None
        if "@" in text:
            from ocistore.digest import Digest  # here: most references have no digest

            text, _, digest_text = text.partition("@")
            try:
                digest = Digest.parse(digest_text)
            except InvalidDigestError as exc:
                raise InvalidReferenceError(
                    f"invalid reference {original!r}: {exc.message}"
                ) from None
        tag: str | None = None
        # A ':' after the last '/' is a tag; one before it belongs to host:port.
        last = text.rfind("/")
        colon = text.rfind(":")
        if colon > last:
            text, tag = text[:colon], text[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise InvalidReferenceError(f"invalid reference {original!r}: bad tag {tag!r}")
        registry, path = _split_registry(text, original)
        if len(path) + len(registry) + 1 > _MAX_NAME:
            raise InvalidReferenceError(f"invalid reference {original!r}: name too long")
        for component in path.split("/"):
            if not _COMPONENT.fullmatch(component):
                if component.lower() != component and _COMPONENT.fullmatch(component.lower()):
                    raise InvalidReferenceError(
                        f"invalid reference {original!r}: repository name must be lowercase"
                    )
                raise InvalidReferenceError(
                    f"invalid reference {original!r}: bad path component {component!r}"
                )
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, path, tag, digest)

    @property
    def api_host(self) -> str:
        """The host the registry API lives on (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.registry, self.repository, None, digest)

    @property
    def store_name(self) -> str:
        """The name an image is kept under: a digest wins over a tag, as Docker does."""
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def familiar(self) -> str:
        """The short form Docker prints (``ubuntu:22.04``, ``ghcr.io/o/i:t``)."""
        name = self.name
        if self.registry == DOCKER_HUB:
            name = self.repository.removeprefix("library/")
        if self.digest is not None:
            return f"{name}@{self.digest}"
        return f"{name}:{self.tag}"


def _split_registry(text: str, original: str) -> tuple[str, str]:
    first, slash, rest = text.partition("/")
    # Docker's rule: the first component is a host only if it has '.' or ':', is
    # 'localhost', or has an uppercase letter (which no repository may have).
    if slash and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        if not _HOST.fullmatch(first):
            raise InvalidReferenceError(f"invalid reference {original!r}: bad registry {first!r}")
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, text
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if not path:
        raise InvalidReferenceError(f"invalid reference {original!r}: no repository")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return registry, path
