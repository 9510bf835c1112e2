"""The content store: verified, atomic blob writes and a valid OCI image layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ocistore.digest import Digest, VerifyingReader
from ocistore.errors import DigestMismatchError, SizeMismatchError
from ocistore.model import Descriptor
from ocistore.store.content import ContentStore


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    s = ContentStore(str(tmp_path / "root"))
    s.init()
    return s


def test_layout_files(store: ContentStore) -> None:
    root = Path(store.root)
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads((root / "index.json").read_text()) == {"schemaVersion": 2, "manifests": []}


def test_put_and_read(store: ContentStore) -> None:
    digest = store.put(b"hello")
    assert digest == Digest.of(b"hello")
    assert store.read(digest) == b"hello"
    assert os.stat(store.blob_path(digest)).st_mode & 0o777 == 0o444
    assert os.listdir(store.ingest_dir) == []


def test_wrong_digest_never_becomes_visible(store: ContentStore) -> None:
    claimed = Digest.of(b"what the registry promised")
    with pytest.raises(DigestMismatchError), store.writer(claimed, 5) as w:
        w.write(b"lies!")
        w.commit()
    assert not store.has(claimed)
    assert os.listdir(store.ingest_dir) == []


def test_wrong_size_never_becomes_visible(store: ContentStore) -> None:
    digest = Digest.of(b"hello")
    with pytest.raises(SizeMismatchError), store.writer(digest, 6) as w:
        w.write(b"hello")
        w.commit()
    assert not store.has(digest)


def test_abandoned_writer_leaves_nothing(store: ContentStore) -> None:
    digest = Digest.of(b"hello")
    with pytest.raises(RuntimeError), store.writer(digest, 5) as w:
        w.write(b"hel")
        raise RuntimeError("connection dropped")
    assert not store.has(digest)
    assert os.listdir(store.ingest_dir) == []


def test_refs_replace_and_remove(store: ContentStore) -> None:
    a = Descriptor("application/vnd.oci.image.manifest.v1+json", Digest.of(b"a"), 1)
    b = Descriptor("application/vnd.oci.image.manifest.v1+json", Digest.of(b"b"), 1)
    store.set_ref("docker.io/library/x:1", a)
    store.set_ref("docker.io/library/x:2", a)
    store.set_ref("docker.io/library/x:1", b)
    manifests = store.read_index()["manifests"]
    names = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in manifests}
    assert names == {"docker.io/library/x:1": str(b.digest), "docker.io/library/x:2": str(a.digest)}
    store.remove_ref("docker.io/library/x:1")
    assert [m["digest"] for m in store.read_index()["manifests"]] == [str(a.digest)]


class _Chunks:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_verifying_reader_checks_at_eof() -> None:
    good = VerifyingReader(_Chunks(b"hello"), Digest.of(b"hello"), 5)
    while good.read(2):
        pass
    assert good.verified
    bad = VerifyingReader(_Chunks(b"hellO"), Digest.of(b"hello"), 5)
    with pytest.raises(DigestMismatchError):
        while bad.read(2):
            pass
    long = VerifyingReader(_Chunks(b"hello!"), Digest.of(b"hello"), 5)
    with pytest.raises(SizeMismatchError):
        while long.read(10):
            pass
