"""Pulls through a fault-injecting proxy (faultproxy.py) in front of a real docker-registry:
dropped and stalled connections, servers that ignore Range, 5xx and 429 answers, wrong
bytes, a client killed (SIGKILL) or interrupted (SIGINT) at random moments, a full disk.

Every test asserts the real outcome: the image pulled (or one clear error), what crossed
the wire (from the proxy's records), and a store that fsck finds consistent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ocistore import Store
from ocistore.digest import Digest
from ocistore.errors import (
    DigestMismatchError,
    Interrupted,
    NetworkError,
    RegistryError,
    StorageError,
)
from ocistore.ingest import MAX_ATTEMPTS_WITHOUT_PROGRESS, ResumingReader
from ocistore.registry.client import MAX_ATTEMPTS, RegistryClient
from ocistore.registry.transport import TransportOptions

from .faultproxy import FaultProxy
from .images import PushedImage, run
from .registryd import Registry, RegistryFactory

KiB = 1024
MiB = 1024 * KiB
BIG_DATA_SIZE = 4 * MiB
ROOT_USER = os.geteuid() == 0


# --- fixtures and helpers -----------------------------------------------------------------
@dataclass
class Sleeps:
    """The waits the client asked for, instead of waiting them."""

    client: list[float] = field(default_factory=list)  # RegistryClient: 408/429/5xx backoff
    reader: list[float] = field(default_factory=list)  # ResumingReader: reconnect backoff


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Sleeps:
    record = Sleeps()
    kwdefaults = RegistryClient.__init__.__kwdefaults__
    assert kwdefaults is not None and "sleep" in kwdefaults
    monkeypatch.setitem(kwdefaults, "sleep", record.client.append)
    reader_defaults = ResumingReader.__init__.__kwdefaults__
    assert reader_defaults is not None and "sleep" in reader_defaults
    monkeypatch.setitem(reader_defaults, "sleep", record.reader.append)
    return record


@dataclass(frozen=True)
class BigImage:
    image: PushedImage
    registry: Registry
    data_sha256: str  # of the random file inside the layer

    @property
    def layer(self) -> str:
        return self.image.layer_digests[-1]

    @property
    def layer_size(self) -> int:
        manifest = json.loads(self.image.raw_manifest)
        return int(manifest["layers"][-1]["size"])


@pytest.fixture(scope="module")
def big(registry_factory: RegistryFactory, tmp_path_factory: pytest.TempPathFactory) -> BigImage:
    """A one-layer image holding 4 MiB of random bytes (a ~4 MiB gzip blob), built with
    umoci and pushed by skopeo into a registry of its own."""
    work = tmp_path_factory.mktemp("big-image")
    layout, bundle = work / "layout", work / "bundle"
    image = f"{layout}:big"
    rootless = [] if ROOT_USER else ["--rootless"]
    run(["umoci", "--log", "error", "init", "--layout", layout])
    run(["umoci", "--log", "error", "new", "--image", image])
    run(["umoci", "--log", "error", "unpack", *rootless, "--image", image, bundle])
    data = random.Random(5).randbytes(BIG_DATA_SIZE)
    (bundle / "rootfs" / "random.bin").write_bytes(data)
    run(["umoci", "--log", "error", "repack", "--image", image, bundle])
    registry = registry_factory.start("plain")
    pushed = registry.push(layout, "big", "ocistore-test/big")
    return BigImage(pushed, registry, hashlib.sha256(data).hexdigest())


@pytest.fixture
def proxy(registry_plain: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry_plain.host) as p:
        yield p


@pytest.fixture
def big_proxy(big: BigImage) -> Iterator[FaultProxy]:
    with FaultProxy(big.registry.host) as p:
        yield p


def _ref(proxy: FaultProxy, image: PushedImage) -> str:
    return f"{proxy.host}/{image.repo}:{image.tag}"


def _store(root: Path, read_timeout: float = 10.0) -> Store:
    return Store(
        str(root), transport=TransportOptions(certs_dir="/nonexistent", timeout=(5.0, read_timeout))
    )


def _blob_sizes(image: PushedImage) -> dict[str, int]:
    """Every blob a pull of ``image`` fetches (config and layers) -> size."""
    manifest = json.loads(image.raw_manifest)
    sizes = {manifest["config"]["digest"]: int(manifest["config"]["size"])}
    sizes.update({d["digest"]: int(d["size"]) for d in manifest["layers"]})
    return sizes


def _assert_clean(store: Store) -> None:
    """fsck finds nothing, and nothing temporary is left but downloads kept to resume."""
    report = store.fsck()
    assert report.problems == []
    assert sorted(os.listdir(store.content.ingest_dir)) == report.resumable
    assert all(name.endswith(".partial") for name in report.resumable)
    assert store.layer_dirs.temp_dirs() == []


def _assert_nothing_half_written(root: Path) -> list[str]:
    """What a killed or failed pull may leave: only temporary leftovers (prune removes the
    files; an image recorded a moment before its index.json entry gets the entry from the
    next pull or fsck --repair).

    fsck re-hashes every visible blob, checks every layer directory has its metadata row
    and every row its directory, and that every recorded image has its blobs and layers;
    any finding other than a leftover temporary one fails. Returns the leftovers."""
    store = _store(root)
    try:
        report = store.fsck()
        leftovers = [p for p in report.problems if p.startswith("leftover temporary ")]
        assert [p for p in report.problems if p not in leftovers] == []
        leftovers += [f"resumable download ingest/{name}" for name in report.resumable]
        for image in store.metadata.images():
            for layer in store.metadata.image_layers(image.name):
                record = store.metadata.layer(layer.diff_id)
                assert record is not None
                assert os.path.isdir(store.layer_dirs.path(record.dir))
        return leftovers
    finally:
        store.close()


def _cli(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ocistore", "--root", str(root), *args]


def _cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "DOCKER_CONFIG": str(tmp_path / "no-docker-config")}


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ocistore: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# --- dropped, stalled and restarted connections --------------------------------------------
def test_cut_every_100k_resumes_with_range_from_the_bytes_received(
    big: BigImage, big_proxy: FaultProxy, sleeps: Sleeps, tmp_path: Path
) -> None:
    big_proxy.cut(100 * KiB, match=big.layer)  # every response to the layer: 100 KiB only
    store = _store(tmp_path / "store")
    result = store.pull(_ref(big_proxy, big.image))
    assert str(result.manifest_digest) == big.image.manifest_digest

    requests = big_proxy.blob_requests(big.layer)
    size = big.layer_size
    assert len(requests) == -(-size // (100 * KiB))  # one per 100 KiB: no attempt wasted
    assert requests[0].range is None
    received = 0
    for previous, request in itertools.pairwise(requests):
        received += previous.sent
        assert request.range == f"bytes={received}-"
        assert request.status == 206
    assert received + requests[-1].sent == size
    assert big_proxy.bytes_sent(big.layer) <= 1.2 * size
    # Every drop made progress: none used up the budget, each waited only the first backoff.
    assert len(sleeps.reader) == len(requests) - 1
    assert set(sleeps.reader) == {sleeps.reader[0]}

    layer_dir = store.inspect(_ref(big_proxy, big.image)).layers[-1].directory
    assert layer_dir is not None
    with open(os.path.join(layer_dir, "random.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == big.data_sha256
    _assert_clean(store)


def test_connection_reset_mid_blob_resumes(
    big: BigImage, big_proxy: FaultProxy, sleeps: Sleeps, tmp_path: Path
) -> None:
    # RST instead of FIN: the client gets ECONNRESET, and Linux drops what was still in its
    # receive queue, so how far each attempt got (the next Range) is not predictable; it
    # never goes backwards, and three resets stay within the budget.
    big_proxy.cut(MiB, times=3, match=big.layer, reset=True)
    store = _store(tmp_path / "store")
    store.pull(_ref(big_proxy, big.image))
    requests = big_proxy.blob_requests(big.layer)
    assert len(requests) == 4
    starts = [int(r.range[6:-1]) if r.range else 0 for r in requests]
    assert starts == sorted(starts)
    assert requests[-1].sent == big.layer_size - starts[-1]
    _assert_clean(store)


def test_server_that_ignores_range_is_restarted_and_skipped(
    big: BigImage, big_proxy: FaultProxy, sleeps: Sleeps, tmp_path: Path
) -> None:
    big_proxy.ignore_range = True
    big_proxy.cut(MiB, times=3, match=big.layer)
    store = _store(tmp_path / "store")
    store.pull(_ref(big_proxy, big.image))
    requests = big_proxy.blob_requests(big.layer)
    assert len(requests) == 4
    assert [r.range for r in requests] == [None, f"bytes={MiB}-", f"bytes={MiB}-", f"bytes={MiB}-"]
    assert {r.status for r in requests} == {200}  # whole blob every time: skipped locally
    assert requests[-1].sent == big.layer_size
    _assert_clean(store)


def test_stalled_blob_times_out_and_resumes(
    big: BigImage, big_proxy: FaultProxy, sleeps: Sleeps, tmp_path: Path
) -> None:
    big_proxy.stall(MiB, times=1, match=big.layer, timeout=20)
    store = _store(tmp_path / "store", read_timeout=0.5)
    try:
        store.pull(_ref(big_proxy, big.image))
    finally:
        big_proxy.release()
    requests = big_proxy.blob_requests(big.layer)
    assert [r.range for r in requests] == [None, f"bytes={MiB}-"]
    assert big_proxy.bytes_sent(big.layer) == big.layer_size
    _assert_clean(store)


def test_slow_registry_completes(
    registry_plain: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.throttle(16 * KiB, 0.002)
    image = registry_plain.images.multi
    store = _store(tmp_path / "store")
    assert str(store.pull(_ref(proxy, image)).manifest_digest) == image.manifest_digest
    _assert_clean(store)


def test_no_progress_is_a_bounded_clear_error_and_leaves_a_clean_store(
    registry_plain: Registry, proxy: FaultProxy, sleeps: Sleeps, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    layer = image.layer_digests[0]
    proxy.cut(0, match=layer)  # headers with the full Content-Length, then nothing
    store = _store(tmp_path / "store")
    with pytest.raises(NetworkError) as exc:
        store.pull(_ref(proxy, image), jobs=1)
    message = str(exc.value)
    assert "\n" not in message
    assert proxy.host in message and layer in message
    assert f"{MAX_ATTEMPTS_WITHOUT_PROGRESS} attempts" in message
    assert exc.value.exit_code == 5
    assert len(proxy.blob_requests(layer)) == MAX_ATTEMPTS_WITHOUT_PROGRESS
    # Backoff between attempts grows.
    assert len(sleeps.reader) == MAX_ATTEMPTS_WITHOUT_PROGRESS - 1
    assert sleeps.reader == sorted(sleeps.reader) and sleeps.reader[0] < sleeps.reader[-1]
    assert store.metadata.images() == []
    assert store.content.read_index()["manifests"] == []
    assert not store.content.has(Digest.parse(layer))
    _assert_clean(store)


# --- HTTP errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("status", [500, 502, 503])
def test_transient_server_errors_are_retried_with_backoff(
    registry_plain: Registry, proxy: FaultProxy, sleeps: Sleeps, tmp_path: Path, status: int
) -> None:
    image = registry_plain.images.multi
    proxy.fail(status, times=3)  # the first three blob GETs, whichever they are
    store = _store(tmp_path / "store")
    assert str(store.pull(_ref(proxy, image)).manifest_digest) == image.manifest_digest
    assert [r.status for r in proxy.blob_requests()].count(status) == 3
    assert len(sleeps.client) == 3 and all(0 < s <= 30 for s in sleeps.client)
    _assert_clean(store)


@pytest.mark.parametrize(
    ("retry_after", "expected"), [("0", [0.0, 0.0]), ("3", [3.0, 3.0]), (None, None)]
)
def test_429_honours_retry_after(
    registry_plain: Registry,
    proxy: FaultProxy,
    sleeps: Sleeps,
    tmp_path: Path,
    retry_after: str | None,
    expected: list[float] | None,
) -> None:
    image = registry_plain.images.multi
    proxy.fail(429, times=2, match="/manifests/", retry_after=retry_after)
    store = _store(tmp_path / "store")
    assert str(store.pull(_ref(proxy, image)).manifest_digest) == image.manifest_digest
    if expected is not None:
        assert sleeps.client == expected
    else:  # exponential backoff with jitter: attempt n waits within [b/2, b], b = 0.5 * 2^(n-1)
        assert len(sleeps.client) == 2
        assert 0.25 <= sleeps.client[0] <= 0.5 and 0.5 <= sleeps.client[1] <= 1.0
    _assert_clean(store)


def test_persistent_503_fails_after_bounded_attempts_naming_the_registry(
    registry_plain: Registry, proxy: FaultProxy, sleeps: Sleeps, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    layer = image.layer_digests[1]
    proxy.fail(503, times=None, match=layer)
    store = _store(tmp_path / "store")
    with pytest.raises(RegistryError) as exc:
        store.pull(_ref(proxy, image))
    assert proxy.host in str(exc.value) and "503" in str(exc.value)
    assert exc.value.exit_code == 5
    # The client's retries are the only ones: a 503 is an answer, not a broken link.
    assert len(proxy.blob_requests(layer)) == MAX_ATTEMPTS
    _assert_clean(store)


def test_cli_persistent_503_is_exit_5_and_one_line(
    registry_plain: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    proxy.fail(503, times=None, match="/manifests/", retry_after="0")  # no real waiting
    proc = subprocess.run(
        _cli(tmp_path / "store", "pull", "--quiet", _ref(proxy, image)),
        capture_output=True,
        text=True,
        env=_cli_env(tmp_path),
        timeout=60,
    )
    assert proc.returncode == 5, proc.stderr
    line = _one_error_line(proc.stderr)
    assert proxy.host in line and "503" in line
    assert len([r for r in proxy.requests if "/manifests/" in r.path]) == MAX_ATTEMPTS


# --- wrong bytes ------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["layer", "config"])
def test_wrong_bytes_are_a_digest_mismatch_and_never_stored(
    registry_plain: Registry, proxy: FaultProxy, tmp_path: Path, which: str
) -> None:
    image = registry_plain.images.multi
    assert image.config_digest is not None
    digest = image.layer_digests[1] if which == "layer" else image.config_digest
    proxy.corrupt(match=digest, at=100)
    store = _store(tmp_path / "store")
    with pytest.raises(DigestMismatchError) as exc:
        store.pull(_ref(proxy, image))
    assert digest in str(exc.value) and exc.value.exit_code == 6
    assert not store.content.has(Digest.parse(digest))
    assert store.metadata.images() == []
    _assert_clean(store)


def test_cli_wrong_bytes_is_exit_6(
    registry_plain: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    digest = image.layer_digests[0]
    proxy.corrupt(match=digest, at=5000)
    root = tmp_path / "store"
    proc = subprocess.run(
        _cli(root, "pull", "--quiet", _ref(proxy, image)),
        capture_output=True,
        text=True,
        env=_cli_env(tmp_path),
        timeout=60,
    )
    assert proc.returncode == 6, proc.stderr
    assert digest in _one_error_line(proc.stderr)
    store = _store(root)
    assert not store.content.has(Digest.parse(digest))
    _assert_clean(store)


# --- killed, interrupted ----------------------------------------------------------------------
def _present(root: Path, wanted: set[str]) -> set[str]:
    return {d for d in wanted if os.path.exists(root / "blobs" / "sha256" / d.split(":")[1])}


def _kept_whole(root: Path, sizes: dict[str, int]) -> set[str]:
    """Blobs a killed pull downloaded completely but had not published: kept to resume,
    they need no byte from the registry."""
    ingest = root / "ingest"
    return {
        d
        for d, size in sizes.items()
        if (ingest / f"sha256-{d.split(':')[1]}.partial").exists()
        and (ingest / f"sha256-{d.split(':')[1]}.partial").stat().st_size == size
    }


def test_sigkill_at_random_moments_then_the_next_pull_fetches_only_what_is_missing(
    registry_plain: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    sizes = _blob_sizes(image)
    wanted = set(sizes)
    total = sum(sizes.values())
    ref = _ref(proxy, image)
    env = _cli_env(tmp_path)
    # A fixed seed: the same kill points every run (OCISTORE_TEST_KILL_SEED to explore).
    rng = random.Random(int(os.environ.get("OCISTORE_TEST_KILL_SEED", "24301")))
    proxy.throttle(32 * KiB, 0.003)  # a whole pull takes about 0.45 s
    roots = iter(tmp_path / f"store-{n}" for n in range(100))
    root = next(roots)

    def pull(kill: bool) -> bool:
        """One CLI pull into ``root``; True if it was killed. Checks what it fetched."""
        before = _present(root, wanted)
        whole = _kept_whole(root, sizes)
        proxy.reset_records()
        # Most kills come after a random number of blob bytes left the proxy (a frozen
        # moment: every download stops there until the process is dead); the others after
        # a random delay, which also lands in unpacking, publishing and recording.
        paused = proxy.pause_after(rng.randrange(total)) if kill and rng.random() < 0.7 else None
        delay = rng.uniform(0.15, 0.5)
        proc = subprocess.Popen(
            _cli(root, "pull", "--quiet", ref),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            if paused is not None:
                for _ in range(1500):  # at most 30 s
                    if paused.wait(0.02) or proc.poll() is not None:
                        break
            elif kill:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=delay)
            killed = kill and proc.poll() is None
            if killed:
                proc.kill()
            _, err = proc.communicate(timeout=60)
        finally:
            proxy.resume()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        fetched = proxy.fetched_digests()
        # Only what was missing is fetched, each blob once...
        assert not set(fetched) & before, (fetched, before)
        assert len(fetched) == len(set(fetched))
        left = set(_assert_nothing_half_written(root))
        if killed:
            # What this kill left: "ingest/..." (a download kept to resume), "layers/.tmp-..."
            # (a layer being unpacked), "layer" (a row whose directory was not renamed yet)
            new_kinds.update({p.split()[2].split("/")[0] for p in left - seen})
            seen.update(left)
            return True
        assert proc.returncode == 0, err
        assert set(fetched) == wanted - before - whole  # ...and all of it, when not killed
        store = _store(root)
        assert len(store.inspect(ref).layers) == len(image.layer_digests)
        store.fsck(repair=True)  # the killed pulls' leftovers go
        _assert_clean(store)
        store.close()
        return False

    kills = 0
    seen: set[str] = set()
    new_kinds: Counter[str] = Counter()
    for _attempt in range(60):
        if kills == 20:
            break
        if pull(kill=True):
            kills += 1
        else:  # finished before the kill: start again from an empty store
            root = next(roots)
            seen.clear()
    assert kills == 20
    assert new_kinds["ingest"] and new_kinds["layers"], new_kinds  # killed mid-download
    assert not pull(kill=False)  # after the last kill, the next pull completes the store


def test_ctrl_c_exits_130_with_one_line_and_nothing_half_written(
    registry_plain: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    sizes = _blob_sizes(image)
    root = tmp_path / "store"
    proxy.throttle(32 * KiB, 0.003)
    paused = proxy.pause_after(sum(sizes.values()) // 2)
    proc = subprocess.Popen(
        _cli(root, "pull", "--quiet", _ref(proxy, image)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(tmp_path),
    )
    try:
        assert paused.wait(30), "the pull never got half way"
        proc.send_signal(signal.SIGINT)
        proxy.resume()
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.resume()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err == "ocistore: interrupted\n"
    assert out == ""
    store = _store(root)
    assert store.metadata.images() == []
    _assert_clean(store)  # nothing half-written visible; interrupted downloads kept
    kept = store.fsck().resumable
    assert kept, "the interrupted download was not kept for resumption"
    kept_sizes = {
        "sha256:" + name.split("-", 1)[1].split(".")[0]: os.path.getsize(
            os.path.join(store.content.ingest_dir, name)
        )
        for name in kept
    }
    before = _present(root, set(sizes))
    assert before != set(sizes)
    whole = _kept_whole(root, sizes)
    proxy.clear()
    proxy.reset_records()
    store.pull(_ref(proxy, image))
    assert set(proxy.fetched_digests()) == set(sizes) - before - whole
    # The next process resumed each kept download where it stopped (HTTP Range).
    for digest, offset in kept_sizes.items():
        if 0 < offset < sizes[digest]:
            ranges = [r.range for r in proxy.requests if digest in r.path]
            assert f"bytes={offset}-" in ranges, (digest, ranges)
    _assert_clean(store)
    assert store.fsck().resumable == []


def test_ctrl_c_while_the_registry_stalls_exits_at_once(
    registry_plain: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    """Downloads blocked on a registry that stopped sending must not hold Ctrl-C up until
    their read timeout (60 s), nor for good while a few bytes keep trickling in."""
    image = registry_plain.images.multi
    root = tmp_path / "store"
    paused = proxy.pause_after(sum(_blob_sizes(image).values()) // 2)  # never resumed
    proc = subprocess.Popen(
        _cli(root, "pull", "--quiet", _ref(proxy, image)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(tmp_path),
    )
    try:
        assert paused.wait(30), "the pull never got half way"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.resume()
    assert proc.returncode == 130, err
    assert err == "ocistore: interrupted\n"
    store = _store(root)
    assert store.metadata.images() == []
    _assert_clean(store)


def test_cancel_from_another_thread_while_the_registry_stalls(
    registry_plain: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    paused = proxy.pause_after(sum(_blob_sizes(image).values()) // 2)  # never resumed
    cancel = threading.Event()

    def cancel_when_paused() -> None:
        if paused.wait(30):
            cancel.set()

    threading.Thread(target=cancel_when_paused, daemon=True).start()
    store = _store(tmp_path / "store", read_timeout=60)
    try:
        with pytest.raises(Interrupted):
            store.pull(_ref(proxy, image), cancel=cancel)
    finally:
        proxy.resume()
    assert cancel.is_set()
    assert store.metadata.images() == []
    _assert_clean(store)


# --- disk full ---------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs as the store's filesystem; tests make it as small as they need."""
    if not ROOT_USER:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _resize(mountpoint: Path, size: str) -> None:
    run(["mount", "-o", f"remount,size={size}", str(mountpoint)])


# 100k: the metadata database cannot even be created; 600k: a layer blob does not fit;
# 1600k and 3500k: blobs fit, unpacking does not (some layers are published by then).
@pytest.mark.parametrize("size", ["100k", "600k", "1600k", "3500k"])
def test_disk_full_is_a_clean_storage_error_and_the_store_stays_usable(
    registry_plain: Registry, small_disk: Path, tmp_path: Path, size: str
) -> None:
    image = registry_plain.images.multi
    root = small_disk / "store"
    _resize(small_disk, size)
    proc = subprocess.run(
        _cli(root, "pull", "--quiet", image.reference),
        capture_output=True,
        text=True,
        env=_cli_env(tmp_path),
        timeout=60,
    )
    assert proc.returncode == StorageError.exit_code, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "no space left on device" in line.lower() or "disk is full" in line, line
    assert proc.stdout == ""
    if size != "100k":  # the store opens: consistent, nothing recorded, nothing left over
        store = _store(root)
        assert store.metadata.images() == []
        _assert_clean(store)
        store.close()
    # With room again, the same store completes the pull.
    _resize(small_disk, "16m")
    store = _store(root)
    assert str(store.pull(image.reference).manifest_digest) == image.manifest_digest
    _assert_clean(store)


@pytest.mark.parametrize("size", ["600k", "1600k"])
def test_disk_full_in_process_raises_storage_error(
    registry_plain: Registry, small_disk: Path, size: str
) -> None:
    _resize(small_disk, size)
    store = _store(small_disk / "store")
    with pytest.raises(StorageError) as exc:
        store.pull(registry_plain.images.multi.reference, jobs=1)
    assert "no space left on device" in str(exc.value).lower()
    assert str(small_disk) in str(exc.value)
    _assert_clean(store)


def test_blob_write_on_a_full_disk_leaves_no_partial_file(small_disk: Path) -> None:
    _resize(small_disk, "600k")
    store = _store(small_disk / "store")
    store.metadata  # noqa: B018 - creates the store's layout
    with open(small_disk / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:  # fill the disk up
            f.write(b"\0" * 65536)
            f.flush()
    # Writes go through the file's buffer: the one that fails leaves bytes in it, and the
    # abort's close() flushes them, failing once more. The partial file must go anyway.
    data = b"0123456789abcdef" * 256
    with pytest.raises(OSError) as exc, store.content.writer(Digest.of(data), None) as writer:
        for _ in range(1000):
            writer.write(data)
    assert exc.value.errno == errno.ENOSPC
    assert os.listdir(store.content.ingest_dir) == []


def test_metadata_failure_after_publishing_a_layer_leaves_no_orphan_directory(
    registry_plain: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one step between a layer directory's rename and its row: if the row cannot be
    written (sqlite: "database or disk is full"), the directory must not stay behind."""
    from ocistore.store.metadata import Metadata

    calls: list[str] = []

    def full(self: Metadata, record: object, *args: object) -> None:
        calls.append(str(record))
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Metadata, "add_layer", full)
    store = _store(tmp_path / "store")
    with pytest.raises(StorageError) as exc:
        store.pull(registry_plain.images.multi.reference, jobs=1)
    assert "disk is full" in str(exc.value)
    assert len(calls) == 1
    assert store.layer_dirs.names() == []
    _assert_clean(store)
    monkeypatch.undo()
    store.pull(registry_plain.images.multi.reference)
    _assert_clean(store)
