"""Typed errors. Each carries the reference or digest it concerns and an exit code.

The library raises these and never prints or exits; the CLI turns one into a single line
on stderr and the class's ``exit_code``. Messages must never contain credentials or tokens.
"""

from __future__ import annotations


class OcistoreError(Exception):
    """Base of every error ocistore raises on purpose."""

    exit_code = 1

    def __init__(
        self, message: str, *, reference: str | None = None, digest: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reference = reference
        self.digest = digest

    def __str__(self) -> str:
        parts = [self.message]
        # Only add what the message does not already say, so lines stay short.
        if self.reference and self.reference not in self.message:
            parts.append(f"(reference {self.reference})")
        if self.digest and self.digest not in self.message:
            parts.append(f"(digest {self.digest})")
        return " ".join(parts)


# --- bad input from the user: exit 2, like argparse --------------------------------------
class UsageError(OcistoreError):
    exit_code = 2


class InvalidReferenceError(UsageError):
    pass


class InvalidDigestError(UsageError):
    pass


class InvalidPlatformError(UsageError):
    pass


# --- something named does not exist: exit 3 ----------------------------------------------
class NotFoundError(OcistoreError):
    exit_code = 3


class ManifestNotFoundError(NotFoundError):
    pass


class BlobNotFoundError(NotFoundError):
    pass


class ImageNotFoundError(NotFoundError):
    """The reference is not in the local store."""


class PlatformNotFoundError(NotFoundError):
    """An index has no manifest for the requested platform."""


class PathNotFoundError(NotFoundError):
    """A path does not exist in an image's composed tree."""


class ContainerNotFoundError(NotFoundError):
    pass


class VolumeNotFoundError(NotFoundError):
    pass


# --- the registry refused our credentials: exit 4 ----------------------------------------
class AuthError(OcistoreError):
    exit_code = 4


# --- could not talk to the registry: exit 5 ----------------------------------------------
class NetworkError(OcistoreError):
    exit_code = 5


class RegistryError(NetworkError):
    """The registry answered with an HTTP error we cannot recover from."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reference: str | None = None,
        digest: str | None = None,
    ) -> None:
        super().__init__(message, reference=reference, digest=digest)
        self.status = status


# --- bytes are not what their digest or size says: exit 6 --------------------------------
class IntegrityError(OcistoreError):
    exit_code = 6


class DigestMismatchError(IntegrityError):
    pass


class SizeMismatchError(IntegrityError):
    pass


class DiffIDMismatchError(IntegrityError):
    pass


# --- content we will not accept (unsupported, malformed or hostile): exit 7 --------------
class ContentError(OcistoreError):
    exit_code = 7


class UnsupportedMediaTypeError(ContentError):
    pass


class ManifestInvalidError(ContentError):
    pass


class LayerFormatError(ContentError):
    """A layer's compression or tar stream is broken (truncated, garbage, bad header)."""


class UnsafeLayerError(ContentError):
    """A layer tries to write outside its directory or carries an invalid whiteout."""


# --- the local store cannot do what was asked: exit 8 ------------------------------------
class StorageError(OcistoreError):
    exit_code = 8


class StoreLockedError(StorageError):
    pass


class ImageInUseError(StorageError):
    pass


class InUseError(StorageError):
    """A container, volume or image is used by something that must go first."""


class MountError(StorageError):
    """A mount (overlayfs, bind) could not be made or removed."""


class AlreadyExistsError(UsageError):
    """A name (container, volume) is taken."""


class Interrupted(OcistoreError):
    """Raised in place of KeyboardInterrupt once cleanup is done; 128 + SIGINT."""

    exit_code = 130
