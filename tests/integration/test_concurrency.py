"""Several ``ocistore`` processes on one store at once: pulls of overlapping images, and a
prune while a pull runs. Requests go through faultproxy.FaultProxy, which counts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ocistore import Store
from ocistore.digest import Digest
from ocistore.registry.transport import TransportOptions

from .faultproxy import FaultProxy
from .images import PushedImage
from .registryd import Registry

KiB = 1024


@pytest.fixture
def proxy(registry_plain: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry_plain.host) as p:
        yield p


def _ref(proxy: FaultProxy, image: PushedImage) -> str:
    return f"{proxy.host}/{image.repo}:{image.tag}"


def _cli(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ocistore", "--debug", "--root", str(root), *args]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "DOCKER_CONFIG": str(tmp_path / "no-docker-config")}


def _store(root: Path) -> Store:
    return Store(str(root), transport=TransportOptions(certs_dir="/nonexistent"))


def _init(root: Path) -> None:
    store = _store(root)
    store.unpack_options  # noqa: B018 - creates the layout, metadata.db, the whiteout probe
    store.close()


def _layer_blobs(image: PushedImage) -> list[str]:
    return [d["digest"] for d in json.loads(image.raw_manifest)["layers"]]


def _assert_clean(store: Store) -> None:
    report = store.fsck()
    assert report.problems == []
    assert os.listdir(store.content.ingest_dir) == []
    assert store.layer_dirs.temp_dirs() == []


def test_concurrent_pulls_of_overlapping_images_store_each_blob_and_layer_once(
    registry_plain: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    images = registry_plain.images
    # multi and multi_v2s2 share their layer blobs; multi_zstd has other blobs for the
    # same diffIDs: every layer directory is wanted by all six processes.
    chosen = [images.multi, images.multi_v2s2, images.multi_zstd] * 2
    root = tmp_path / "store"
    # Created first, alone: concurrent first opens of a fresh metadata.db can fail (see
    # the xfail test at the end); this test is about the pulls.
    _init(root)
    proxy.throttle(32 * KiB, 0.001)  # long enough for the pulls to overlap
    procs = [
        subprocess.Popen(
            _cli(root, "pull", "--quiet", _ref(proxy, image)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(tmp_path),
        )
        for image in chosen
    ]
    results = [(proc, *proc.communicate(timeout=120)) for proc in procs]
    for (proc, out, err), image in zip(results, chosen, strict=True):
        assert proc.returncode == 0, err
        assert out == f"{_ref(proxy, image)} {image.manifest_digest}\n"
        assert err == ""

    store = _store(root)
    diff_ids = set(images.multi.diff_ids)
    assert diff_ids == set(images.multi_zstd.diff_ids) == set(images.multi_v2s2.diff_ids)
    # Each layer unpacked once: one directory per diffID, one row per diffID.
    assert len(store.layer_dirs.names()) == len(diff_ids)
    assert {layer.diff_id for layer in store.metadata.layers()} == diff_ids
    for image in chosen:
        layers = store.inspect(_ref(proxy, image)).layers
        assert [layer.diff_id for layer in layers] == list(image.diff_ids)
    dirs = {
        tuple(layer.directory for layer in store.inspect(_ref(proxy, image)).layers)
        for image in chosen
    }
    assert len(dirs) == 1  # all three images use the same directories
    # Each layer blob fetched once (the per-layer lock makes the others wait, then find
    # it), and stored once.
    layer_blobs = set(_layer_blobs(images.multi)) | set(_layer_blobs(images.multi_zstd))
    gets = Counter(d for d in proxy.fetched_digests() if d in layer_blobs)
    assert gets == dict.fromkeys(layer_blobs, 1)
    for digest in layer_blobs:
        assert store.content.has(Digest.parse(digest))
    assert len(store.metadata.images()) == 3
    _assert_clean(store)


def _blocked_on_a_lock(pid: int) -> bool:
    """Whether ``pid`` waits for a file lock (a ``->`` line in /proc/locks)."""
    with open("/proc/locks") as f:
        return any("->" in line and line.split()[5] == str(pid) for line in f)


def test_prune_during_a_pull_never_removes_what_the_pull_fetched(
    registry_plain: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    root = tmp_path / "store"
    # Something for prune to remove: a blob nothing references and a crash's partial file.
    _init(root)
    store = _store(root)
    stray_blob = store.content.put(b"nobody needs me")
    store.close()
    stray = Path(root, "ingest", "sha256-0000.partial")
    stray.write_bytes(b"left behind by a crash")

    proxy.throttle(32 * KiB, 0.002)
    total = sum(int(d["size"]) for d in json.loads(image.raw_manifest)["layers"])
    paused = proxy.pause_after(total // 2)  # the pull holds half its layers' bytes
    env = _env(tmp_path)
    pull = subprocess.Popen(
        _cli(root, "pull", "--quiet", _ref(proxy, image)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    prune: subprocess.Popen[str] | None = None
    try:
        assert paused.wait(30), "the pull never got half way"
        # Some layers are in the store now, others half downloaded in ingest/.
        prune = subprocess.Popen(
            _cli(root, "prune"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(600):  # prune must wait for the pull's lock (looked for up to 30 s)
            try:
                prune.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if _blocked_on_a_lock(prune.pid):
                    break
                continue
            pytest.fail(f"prune did not wait for the running pull: {prune.communicate()}")
        else:
            pytest.fail("prune never waited for the pull's lock")
        proxy.resume()
        out, err = pull.communicate(timeout=60)
        assert pull.returncode == 0, err
        assert out == f"{_ref(proxy, image)} {image.manifest_digest}\n"
        pruned, perr = prune.communicate(timeout=60)
        assert prune.returncode == 0, perr
    finally:
        proxy.resume()
        for proc in (pull, prune):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    # prune ran after the pull: it removed the untagged image's leftovers and the stray
    # partial file, and nothing of the image just pulled.
    assert "Deleted temporary: sha256-0000.partial" in pruned
    assert f"Deleted blob: {stray_blob}" in pruned
    store = _store(root)
    info = store.inspect(_ref(proxy, image))
    for digest in (image.manifest_digest, info.config_digest, *image.layer_digests):
        assert digest not in pruned
        assert store.content.has(Digest.parse(digest))
    for layer in info.layers:
        assert layer.directory is not None and os.path.isdir(layer.directory)
        assert os.path.basename(layer.directory) not in pruned
    _assert_clean(store)
    # Nothing was lost: a second pull fetches nothing.
    proxy.clear()
    proxy.reset_records()
    assert store.pull(_ref(proxy, image)).layers_fetched == 0
    assert proxy.fetched_digests() == []


def _open_store(path: str, barrier: Any) -> None:
    from ocistore.store.metadata import Metadata

    barrier.wait()
    Metadata(path).close()


def test_concurrent_first_opens_of_a_fresh_store_all_succeed(tmp_path: Path) -> None:
    """Several processes opening a store that does not exist yet: switching a fresh
    database to WAL fails at once ("database is locked", no busy timeout) unless the opens
    are serialised. Unserialised, this failed about once in 30 opens."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(10):
        path = str(tmp_path / f"metadata-{round_}.db")
        barrier = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_store, args=(path, barrier)) for _ in range(6)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert [proc.exitcode for proc in procs] == [0] * 6, f"round {round_}"
