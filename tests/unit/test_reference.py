"""Image references: Docker's normalisation, and refusal of anything malformed."""

from __future__ import annotations

import pytest

from ocistore.digest import Digest
from ocistore.errors import InvalidReferenceError, UsageError
from ocistore.reference import Reference

D = "sha256:" + "ab" * 32
D2 = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "full", "api_host"),
    [
        (
            "ubuntu",
            "docker.io",
            "library/ubuntu",
            "latest",
            None,
            "docker.io/library/ubuntu:latest",
            "registry-1.docker.io",
        ),
        (
            "ubuntu:22.04",
            "docker.io",
            "library/ubuntu",
            "22.04",
            None,
            "docker.io/library/ubuntu:22.04",
            "registry-1.docker.io",
        ),
        (
            "index.docker.io/x",
            "docker.io",
            "library/x",
            "latest",
            None,
            "docker.io/library/x:latest",
            "registry-1.docker.io",
        ),
        (
            "registry-1.docker.io/library/busybox:1.38.0",
            "docker.io",
            "library/busybox",
            "1.38.0",
            None,
            "docker.io/library/busybox:1.38.0",
            "registry-1.docker.io",
        ),
        (
            "docker.io/myorg/app:v1",
            "docker.io",
            "myorg/app",
            "v1",
            None,
            "docker.io/myorg/app:v1",
            "registry-1.docker.io",
        ),
        (
            "localhost:5000/a",
            "localhost:5000",
            "a",
            "latest",
            None,
            "localhost:5000/a:latest",
            "localhost:5000",
        ),
        ("localhost/a:1", "localhost", "a", "1", None, "localhost/a:1", "localhost"),
        ("ghcr.io/o/i:t", "ghcr.io", "o/i", "t", None, "ghcr.io/o/i:t", "ghcr.io"),
        (
            "registry.example.com:8443/team/app",
            "registry.example.com:8443",
            "team/app",
            "latest",
            None,
            "registry.example.com:8443/team/app:latest",
            "registry.example.com:8443",
        ),
        (
            "127.0.0.1:5000/x/y/z:1.0",
            "127.0.0.1:5000",
            "x/y/z",
            "1.0",
            None,
            "127.0.0.1:5000/x/y/z:1.0",
            "127.0.0.1:5000",
        ),
        ("[::1]:5000/a:b", "[::1]:5000", "a", "b", None, "[::1]:5000/a:b", "[::1]:5000"),
        (f"a/b@{D}", "docker.io", "a/b", None, D, f"docker.io/a/b@{D}", "registry-1.docker.io"),
        (
            f"ubuntu:22.04@{D}",
            "docker.io",
            "library/ubuntu",
            "22.04",
            D,
            f"docker.io/library/ubuntu:22.04@{D}",
            "registry-1.docker.io",
        ),
        (
            "quay.io/a_b/c__d/e-f/g.h---i:Tag_1.x-Y",
            "quay.io",
            "a_b/c__d/e-f/g.h---i",
            "Tag_1.x-Y",
            None,
            "quay.io/a_b/c__d/e-f/g.h---i:Tag_1.x-Y",
            "quay.io",
        ),
    ],
)
def test_normalisation_table(
    text: str,
    registry: str,
    repository: str,
    tag: str | None,
    digest: str | None,
    full: str,
    api_host: str,
) -> None:
    ref = Reference.parse(text)
    assert ref.registry == registry
    assert ref.repository == repository
    assert ref.tag == tag
    assert (str(ref.digest) if ref.digest else None) == digest
    assert str(ref) == full
    assert ref.api_host == api_host
    assert ref.name == f"{registry}/{repository}"
    # Normalising is idempotent: the full form parses back to the same reference.
    assert Reference.parse(full) == ref


def test_tag_and_digest_store_name_keeps_only_the_digest() -> None:
    ref = Reference.parse(f"ubuntu:22.04@{D}")
    assert ref.tag == "22.04"
    assert ref.store_name == f"docker.io/library/ubuntu@{D}"
    assert ref.familiar == f"ubuntu@{D}"


def test_store_name_and_familiar_for_tags() -> None:
    assert Reference.parse("ubuntu").store_name == "docker.io/library/ubuntu:latest"
    assert Reference.parse("ubuntu").familiar == "ubuntu:latest"
    assert Reference.parse("myorg/app:v1").familiar == "myorg/app:v1"
    assert Reference.parse("ghcr.io/o/i:t").familiar == "ghcr.io/o/i:t"
    # Only Docker Hub's library/ prefix is hidden, not another registry's.
    assert Reference.parse("ghcr.io/library/x").familiar == "ghcr.io/library/x:latest"


def test_with_digest_drops_the_tag() -> None:
    ref = Reference.parse("ghcr.io/o/i:t").with_digest(Digest.parse(D2))
    assert ref.tag is None
    assert str(ref) == f"ghcr.io/o/i@{D2}"
    assert ref.store_name == f"ghcr.io/o/i@{D2}"


def test_digest_only_reference_has_no_default_tag() -> None:
    ref = Reference.parse(f"busybox@{D}")
    assert ref.tag is None
    assert ref.digest == Digest.parse(D)


def test_name_length_limit_boundary() -> None:
    # registry + "/" + path may be 255 characters, not 256.
    path = "a" * (255 - len("ghcr.io/"))
    assert Reference.parse(f"ghcr.io/{path}").repository == path
    with pytest.raises(InvalidReferenceError, match="name too long"):
        Reference.parse(f"ghcr.io/{path}a")


def test_tag_length_limit_boundary() -> None:
    assert Reference.parse("ubuntu:" + "t" * 128).tag == "t" * 128
    with pytest.raises(InvalidReferenceError, match="bad tag"):
        Reference.parse("ubuntu:" + "t" * 129)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty or padded"),
        (" ubuntu", "empty or padded"),
        ("ubuntu\n", "empty or padded"),
        ("Ubuntu", "repository name must be lowercase"),
        ("ghcr.io/Owner/img", "repository name must be lowercase"),
        ("myorg/App:1", "repository name must be lowercase"),
        ("ubuntu@sha256:abc", "sha256 needs 64 lowercase hex digits"),
        ("ubuntu@sha256:" + "AB" * 32, "sha256 needs 64 lowercase hex digits"),
        ("ubuntu@sha256:" + "g" * 64, "sha256 needs 64 lowercase hex digits"),
        ("ubuntu@md5:" + "a" * 32, "unsupported digest algorithm 'md5'"),
        ("ubuntu@", "expected ALGORITHM:HEX"),
        ("ubuntu@" + "a" * 64, "expected ALGORITHM:HEX"),
        ("ubuntu:", "bad tag ''"),
        ("localhost:5000/a:", "bad tag ''"),
        ("ubuntu:-x", "bad tag '-x'"),
        ("ubuntu:a/b", "bad registry 'ubuntu:a'"),
        ("ubuntu:a b", "bad tag 'a b'"),
        ("a//b", "bad path component ''"),
        ("a/b/", "bad path component ''"),
        ("/a", "bad path component ''"),
        ("a/-b", "bad path component '-b'"),
        ("a/b.", "bad path component 'b.'"),
        ("a/b___c", "bad path component 'b___c'"),
        ("x" * 300, "name too long"),
        ("-bad.example.com/x", "bad registry '-bad.example.com'"),
        ("bad_host.example.com/x", "bad registry 'bad_host.example.com'"),
        ("host.example.com:port/x", "bad registry 'host.example.com:port'"),
        ("host.example.com:/x", "bad registry 'host.example.com:'"),
        ("docker.io/", "no repository"),
        ("ghcr.io/", "no repository"),
        # Control and non-ASCII characters hidden in the middle of a reference must not
        # slip through (a regex '$' also matches before a trailing newline).
        ("ubuntu\n:latest", "bad path component"),
        ("ubuntu:latest\n@" + D, "bad tag"),
        ("a.example.com\n/x:1", "bad registry"),
        ("ubuntu:\uff12\uff12", "bad tag"),  # fullwidth digits are \w to Python, not to Docker
        ("ubuntu:lat\u00e9st", "bad tag"),
    ],
)
def test_rejections_have_clear_messages(text: str, message: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        Reference.parse(text)
    assert message in str(info.value)
    # The message names what the user typed, so they can find it in a script.
    assert repr(text) in str(info.value)
    # Bad input is a usage error (exit 2), like argparse's.
    assert isinstance(info.value, UsageError)
    assert info.value.exit_code == 2
