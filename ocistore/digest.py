"""Content digests (``algorithm:hex``) and readers that verify them while bytes stream."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ocistore.errors import DigestMismatchError, InvalidDigestError, SizeMismatchError

if TYPE_CHECKING:
    import hashlib

_HEX_LEN = {"sha256": 64, "sha512": 128}
_ALGO = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*$")


class Digest(NamedTuple):  # a tuple: immutable, ordered, and no dataclasses import
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, value = text.partition(":")
        if not sep or not _ALGO.match(algorithm):
            raise InvalidDigestError(f"invalid digest {text!r}: expected ALGORITHM:HEX")
        expected = _HEX_LEN.get(algorithm)
        if expected is None:
            raise InvalidDigestError(f"unsupported digest algorithm {algorithm!r} in {text!r}")
        if len(value) != expected or not re.fullmatch(r"[0-9a-f]+", value):
            raise InvalidDigestError(
                f"invalid digest {text!r}: {algorithm} needs {expected} lowercase hex digits"
            )
        return cls(algorithm, value)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        import hashlib  # here: loading OpenSSL costs ms, and parsing digests needs none of it

        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        import hashlib

        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class VerifyingReader:
    """Wraps a byte stream; at EOF checks the size and digest of everything read.

    The check happens on the read that returns b"" (or earlier, as soon as more bytes than
    expected arrive), so a consumer that reads to the end cannot miss a mismatch.
    """

    def __init__(self, source: _Readable, expected: Digest, size: int | None) -> None:
        self._source = source
        self._expected = expected
        self._size = size
        self._hash = expected.hasher()
        self.bytes_read = 0
        self.verified = False

    def read(self, n: int = -1, /) -> bytes:
        data = self._source.read(n)
        if data:
            self._hash.update(data)
            self.bytes_read += len(data)
            if self._size is not None and self.bytes_read > self._size:
                raise SizeMismatchError(
                    f"blob is larger than the {self._size} bytes its descriptor says",
                    digest=str(self._expected),
                )
            return data
        self._finish()
        return data

    def _finish(self) -> None:
        if self.verified:
            return
        if self._size is not None and self.bytes_read != self._size:
            raise SizeMismatchError(
                f"blob has {self.bytes_read} bytes, its descriptor says {self._size}",
                digest=str(self._expected),
            )
        actual = self._hash.hexdigest()
        if actual != self._expected.hex:
            raise DigestMismatchError(
                f"content does not match digest {self._expected} "
                f"(got {self._expected.algorithm}:{actual})",
                digest=str(self._expected),
            )
        self.verified = True
