"""ocistore pull against real docker-registry processes holding umoci/skopeo-built images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ocistore import Store
from ocistore.digest import Digest
from ocistore.errors import AuthError, Interrupted, PlatformNotFoundError
from ocistore.progress import PullEvent
from ocistore.registry.transport import TransportOptions, refuses_tls

from . import trees
from .registryd import Registry, free_port

ROOT_USER = os.geteuid() == 0


def _store(tmp_path: Path, registry: Registry | None = None, name: str = "store") -> Store:
    certs = str(registry.certs_d) if registry is not None and registry.certs_d else "/nonexistent"
    return Store(str(tmp_path / name), transport=TransportOptions(certs_dir=certs))


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $DOCKER_CONFIG, so the host's real credentials never leak into a test."""
    path = tmp_path / "docker-config"
    path.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(path))
    return path


def _login(docker_config: Path, registry: Registry) -> None:
    import base64

    assert registry.credentials is not None
    user, password = registry.credentials
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (docker_config / "config.json").write_text(
        json.dumps({"auths": {registry.host: {"auth": auth}}})
    )


def _blob_gets(registry: Registry, repo: str) -> int:
    return registry.log_path.read_text(errors="replace").count(f"GET /v2/{repo}/blobs/")


def _gnu_tar_extract(blob: Path, dest: Path) -> None:
    dest.mkdir()
    # GNU tar, the reference extractor. Its exit status is ignored on purpose: umoci writes
    # whiteouts below a file that replaced a directory, which tar cannot create either.
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=user.*", "-xpf", str(blob), "-C", str(dest)],
        capture_output=True,
        check=False,
    )


# --- every kind of registry ------------------------------------------------------------
def test_pull_from_every_kind_of_registry(
    any_registry: Registry, tmp_path: Path, docker_config: Path
) -> None:
    if any_registry.kind == "basic":
        _login(docker_config, any_registry)
    image = any_registry.images.multi
    store = _store(tmp_path, any_registry)
    result = store.pull(image.reference)
    assert str(result.manifest_digest) == image.manifest_digest
    info = store.inspect(image.reference)
    assert [layer.digest for layer in info.layers] == list(image.layer_digests)
    assert [layer.diff_id for layer in info.layers] == list(image.diff_ids)
    for layer in info.layers:
        assert layer.directory is not None and os.path.isdir(layer.directory)
        assert os.path.dirname(layer.directory) == os.path.join(store.root, "layers")
    assert os.listdir(os.path.join(store.root, "ingest")) == []


def test_basic_auth_registry_without_credentials_is_an_auth_error(
    registry_basic: Registry, tmp_path: Path, docker_config: Path
) -> None:
    with pytest.raises(AuthError) as exc:
        _store(tmp_path).pull(registry_basic.images.multi.reference)
    assert exc.value.exit_code == 4
    assert registry_basic.credentials is not None
    assert registry_basic.credentials[1] not in str(exc.value)


def test_token_registry_anonymous_pull_asks_for_pull_scope(
    registry_token: Registry, token_server: object, tmp_path: Path, docker_config: Path
) -> None:
    image = registry_token.images.multi
    _store(tmp_path).pull(image.reference)
    scopes = [s for r in token_server.requests for s in r.scopes]  # type: ignore[attr-defined]
    assert f"repository:{image.repo}:pull" in scopes
    assert not any("push" in s for s in scopes)
    # One token serves the whole pull: it is cached, not fetched per request.
    assert token_server.tokens_issued == 1  # type: ignore[attr-defined]


def test_loopback_tls_registry_without_its_ca_is_still_https(
    registry_tls: Registry, tmp_path: Path
) -> None:
    # Docker's rule for loopback registries: HTTPS when the host speaks it, verified when
    # its CA is known (the test above), unverified otherwise. It must not fall to HTTP.
    image = registry_tls.images.multi
    store = _store(tmp_path)
    assert str(store.pull(image.reference).manifest_digest) == image.manifest_digest
    log = registry_tls.log_path.read_text(errors="replace")
    assert "http: TLS handshake error" in log  # the verified attempt was refused by us


def test_tls_probe_tells_plain_http_from_tls_and_otherwise_says_it_cannot_tell(
    registry_plain: Registry, registry_tls: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cheap probe that spares loopback pulls loading a CA bundle: True only for a
    server that answered the handshake with something other than TLS."""
    timeout = (5.0, 5.0)
    assert refuses_tls(registry_plain.host, timeout) is True
    assert refuses_tls(registry_tls.host, timeout) is False
    assert refuses_tls(f"127.0.0.1:{free_port()}", timeout) is False  # nobody listens
    # A proxy in the way: a direct answer says nothing about what the proxy would reach.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert refuses_tls(registry_plain.host, timeout) is False


# --- what lands on disk -----------------------------------------------------------------
def test_layer_directories_equal_gnu_tar_extraction(
    registry_plain: Registry, test_images: object, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    store = _store(tmp_path)
    store.pull(image.reference)
    form = store.unpack_options.whiteouts.value
    layout = Path(image.source_layout)
    for i, layer in enumerate(store.inspect(image.reference).layers):
        expected_dir = tmp_path / f"tar-{i}"
        _gnu_tar_extract(layout / "blobs" / "sha256" / layer.digest.split(":")[1], expected_dir)
        assert layer.directory is not None
        ours = trees.snapshot(layer.directory, whiteouts=form)
        theirs = trees.snapshot(expected_dir)
        assert trees.diff(ours, theirs) == [], f"layer {i} ({layer.digest})"
    # The oracle saw real content: whiteouts, an opaque marker, hardlinks, xattrs, setuid.
    all_entries = [trees.snapshot(d) for d in sorted(tmp_path.glob("tar-*"))]
    names = [p for snap in all_entries for p in snap]
    assert any(p.endswith(b".wh..wh..opq") for p in names)
    assert any(os.path.basename(p).startswith(b".wh.") for p in names)
    flat = [e for snap in all_entries for e in snap.values() if isinstance(e, trees.Entry)]
    assert any(e.link_group is not None for e in flat)
    assert any(e.xattrs for e in flat)
    assert any(e.mode & 0o4000 for e in flat)


@pytest.mark.skipif(not ROOT_USER, reason="overlay-native whiteouts need root")
def test_whiteouts_are_overlay_native_as_root(registry_plain: Registry, tmp_path: Path) -> None:
    image = registry_plain.images.multi
    store = _store(tmp_path)
    store.pull(image.reference)
    assert store.unpack_options.whiteouts.value == "overlay"
    layers = store.inspect(image.reference).layers
    opaque_layer = layers[3].directory
    assert opaque_layer is not None
    opaque_dir = os.path.join(opaque_layer, "usr/share/doc/busybox-static")
    assert os.getxattr(opaque_dir, "trusted.overlay.opaque") == b"y"
    assert not os.path.exists(os.path.join(opaque_dir, ".wh..wh..opq"))
    assert layers[1].directory is not None
    whiteout = os.lstat(os.path.join(layers[1].directory, "etc/rpc"))
    assert os.major(whiteout.st_rdev) == 0 and os.minor(whiteout.st_rdev) == 0


def test_store_is_an_oci_layout_skopeo_and_umoci_read(
    registry_plain: Registry, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    store = _store(tmp_path)
    result = store.pull(image.reference)
    inspected = json.loads(
        subprocess.run(
            ["skopeo", "inspect", f"oci:{store.root}:{result.name}"],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert inspected["Digest"] == image.manifest_digest
    assert inspected["Layers"] == list(image.layer_digests)
    ours, theirs = tmp_path / "from-store", tmp_path / "from-source"
    for layout_ref, dest in (
        (f"{store.root}:{result.name}", ours),
        (f"{image.source_layout}:{image.source_tag}", theirs),
    ):
        subprocess.run(
            ["umoci", "unpack", "--image", layout_ref, str(dest)], capture_output=True, check=True
        )
    assert trees.diff(trees.snapshot(ours / "rootfs"), trees.snapshot(theirs / "rootfs")) == []


# --- sharing and idempotence ------------------------------------------------------------
def test_second_pull_downloads_no_blob(registry_plain: Registry, tmp_path: Path) -> None:
    image = registry_plain.images.multi
    store = _store(tmp_path)
    first = store.pull(image.reference)
    assert first.layers_fetched == len(image.layer_digests)
    before = _blob_gets(registry_plain, image.repo)
    events: list[PullEvent] = []
    second = _store(tmp_path).pull(image.reference, progress=events.append)
    assert second.manifest_digest == first.manifest_digest
    assert (second.layers_fetched, second.bytes_fetched) == (0, 0)
    assert _blob_gets(registry_plain, image.repo) == before
    exists = {e.layer for e in events if e.phase == "already-exists"}
    assert len(exists) == len(image.layer_digests)


def test_layers_that_find_the_unpack_slot_taken_download_meanwhile_then_unpack(
    registry_plain: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One unpack at a time (as on 2 CPUs): the first layer keeps the slot until another
    layer has spooled its whole blob into ingest/; that one then unpacks from there."""
    from ocistore import ingest

    image = registry_plain.images.multi
    assert len(image.layer_digests) >= 2
    monkeypatch.setattr(ingest, "unpack_slots", lambda: 1)
    spooled = threading.Event()
    spools: list[str] = []
    real_spool = ingest.LayerIngester._spool
    real_stream = ingest.LayerIngester._stream_layer

    def spool(self: ingest.LayerIngester, stream: object, desc: object, writer: object) -> None:
        real_spool(self, stream, desc, writer)  # type: ignore[arg-type]
        spools.append(str(desc.digest))  # type: ignore[attr-defined]
        spooled.set()

    def stream_layer(self: ingest.LayerIngester, *args: object, **kwargs: object) -> None:
        # The first unpack holds the slot until some other layer spooled (bounded wait).
        spooled.wait(30)
        real_stream(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest.LayerIngester, "_spool", spool)
    monkeypatch.setattr(ingest.LayerIngester, "_stream_layer", stream_layer)
    before = _blob_gets(registry_plain, image.repo)
    store = _store(tmp_path)
    result = store.pull(image.reference, jobs=3)
    assert spools and set(spools) <= set(image.layer_digests)
    assert result.layers_fetched == len(image.layer_digests)
    # Every blob (the layers and the config) was fetched once: the spooled ones were read
    # back from ingest/.
    assert _blob_gets(registry_plain, image.repo) - before == len(image.layer_digests) + 1
    assert os.listdir(tmp_path / "store" / "ingest") == []
    assert store.fsck().problems == []
    monkeypatch.undo()
    plain = _store(tmp_path, name="one-by-one")
    plain.pull(image.reference, jobs=1)
    for ours, theirs in zip(
        store.inspect(image.reference).layers, plain.inspect(image.reference).layers, strict=True
    ):
        assert ours.diff_id == theirs.diff_id
        assert ours.directory is not None and theirs.directory is not None
        assert trees.diff(trees.snapshot(ours.directory), trees.snapshot(theirs.directory)) == []


def test_gzip_schema2_and_zstd_variants_share_layer_directories(
    registry_plain: Registry, tmp_path: Path
) -> None:
    images = registry_plain.images
    store = _store(tmp_path)
    dirs = {}
    for image in (images.multi, images.multi_v2s2, images.multi_zstd):
        store.pull(image.reference)
        info = store.inspect(image.reference)
        dirs[image.repo] = [layer.directory for layer in info.layers]
        for digest in image.layer_digests:
            assert store.content.has(__import__("ocistore.digest").digest.Digest.parse(digest))
    assert len({tuple(d) for d in dirs.values()}) == 1
    assert len(store.layer_dirs.names()) == len(images.multi.diff_ids)
    v2s2 = store.inspect(images.multi_v2s2.reference)
    assert v2s2.manifest_media_type == "application/vnd.docker.distribution.manifest.v2+json"
    zstd = store.inspect(images.multi_zstd.reference)
    assert all(layer.media_type.endswith("+zstd") for layer in zstd.layers)


def test_rmi_removes_only_what_nothing_else_uses(registry_plain: Registry, tmp_path: Path) -> None:
    images = registry_plain.images
    store = _store(tmp_path)
    store.pull(images.multi.reference)
    store.pull(images.multi_zstd.reference)
    removed = store.rmi(images.multi.reference)
    assert set(removed.blobs) >= set(images.multi.layer_digests)
    assert removed.layers == []  # the zstd image still uses every diffID
    zstd = store.inspect(images.multi_zstd.reference)
    assert all(layer.directory and os.path.isdir(layer.directory) for layer in zstd.layers)
    store.rmi(images.multi_zstd.reference)
    assert list(store.content.iter_blobs()) == []
    assert store.layer_dirs.names() == []
    assert store.content.read_index()["manifests"] == []


# --- indexes and platforms -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ("linux/arm64", "linux/arm64/v8"),
        ("linux/arm/v7", "linux/arm/v7"),
        ("linux/arm", "linux/arm/v7"),
    ],
)
def test_index_platform_choice(
    registry_plain: Registry, tmp_path: Path, wanted: str, expected: str
) -> None:
    image = registry_plain.images.multiarch
    result = _store(tmp_path).pull(image.reference, platform=wanted)
    assert str(result.manifest_digest) == image.child(expected).digest
    assert str(result.index_digest) == image.manifest_digest


def test_index_default_platform_is_this_machine(registry_plain: Registry, tmp_path: Path) -> None:
    from ocistore.platform import Platform

    host = Platform.host()
    image = registry_plain.images.multiarch
    if str(host) not in ("linux/amd64", "linux/arm64", "linux/arm/v7"):
        pytest.skip(f"no test image for {host}")
    result = _store(tmp_path).pull(image.reference)
    expected = "linux/arm64/v8" if str(host) == "linux/arm64" else str(host)
    assert str(result.manifest_digest) == image.child(expected).digest


def test_index_without_the_platform_names_the_ones_it_has(
    registry_plain: Registry, tmp_path: Path
) -> None:
    with pytest.raises(PlatformNotFoundError) as exc:
        _store(tmp_path).pull(registry_plain.images.multiarch.reference, platform="linux/s390x")
    message = str(exc.value)
    assert "linux/amd64" in message and "linux/arm/v7" in message and "linux/arm64" in message
    assert "unknown" not in message


def test_pull_by_digest_is_stored_by_digest(registry_plain: Registry, tmp_path: Path) -> None:
    image = registry_plain.images.multi
    store = _store(tmp_path)
    result = store.pull(image.digest_reference)
    assert result.name == image.digest_reference
    assert store.inspect(image.digest_reference).manifest_digest == image.manifest_digest


# --- interruption -------------------------------------------------------------------------
def test_interrupted_pull_leaves_nothing_half_written(
    registry_plain: Registry, tmp_path: Path
) -> None:
    image = registry_plain.images.multi
    store = _store(tmp_path)
    cancel = threading.Event()
    seen: list[str] = []

    def progress(event: PullEvent) -> None:
        if event.phase == "done" and event.layer is not None:
            seen.append(event.layer)
            cancel.set()  # Ctrl-C after the first layer completes

    with pytest.raises(Interrupted):
        store.pull(image.reference, progress=progress, cancel=cancel, jobs=1)
    assert len(seen) == 1
    assert store.metadata.images() == []
    assert store.content.read_index()["manifests"] == []
    assert store.layer_dirs.temp_dirs() == []
    # Interrupted downloads are kept to resume; nothing else is left, nothing is visible.
    kept = sorted(os.listdir(store.content.ingest_dir))
    assert kept == store.fsck().resumable
    assert not any(store.content.has(Digest.parse("sha256:" + k[7:71])) for k in kept)
    assert len(store.layer_dirs.names()) == 1
    result = store.pull(image.reference)
    assert result.layers_fetched <= len(image.layer_digests) - 1
    assert os.listdir(store.content.ingest_dir) == []
    assert store.fsck().clean


# --- the command line ---------------------------------------------------------------------
def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "no-docker-config")}
    return subprocess.run(
        [sys.executable, "-m", "ocistore", "--root", str(tmp_path / "cli-store"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_quiet_pull_prints_one_line(registry_plain: Registry, tmp_path: Path) -> None:
    image = registry_plain.images.multi
    proc = _cli(tmp_path, "pull", "--quiet", image.reference)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{image.reference} {image.manifest_digest}\n"
    assert proc.stderr == ""
    listed = json.loads(_cli(tmp_path, "images", "--json").stdout)
    assert [i["reference"] for i in listed] == [image.reference]


def test_cli_log_progress_when_not_a_terminal(registry_plain: Registry, tmp_path: Path) -> None:
    image = registry_plain.images.multi
    proc = _cli(tmp_path, "pull", image.reference)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    short = image.layer_digests[0].split(":")[1][:12]
    assert f"{short}: Downloading" in "\n".join(lines)
    assert f"{short}: Pull complete" in lines
    again = _cli(tmp_path, "pull", image.reference)
    assert f"{short}: Already exists" in again.stderr.splitlines()


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["pull", "Ubuntu:22.04"], 2, "lowercase"),
        (["pull", "no-such-host.invalid/x:1"], 5, "no-such-host.invalid"),
        (["pull", "busybox@sha256:1234"], 2, "digest"),
        (["pull", "{host}/ocistore-test/multi:no-such-tag"], 3, "not found"),
        (["pull", "{host}/ocistore-test/no-such-repo:latest"], 3, "not found"),
        (["inspect", "never/pulled:1"], 3, "no image"),
        (["pull", "--platform", "linux", "busybox"], 2, "platform"),
    ],
)
def test_cli_errors_are_one_line_with_distinct_codes(
    registry_plain: Registry, tmp_path: Path, args: list[str], code: int, needle: str
) -> None:
    proc = _cli(tmp_path, *[a.replace("{host}", registry_plain.host) for a in args])
    assert proc.returncode == code, proc.stderr
    # Progress lines may come first; the error is the single last line.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ocistore: ")]
    assert errors == [proc.stderr.splitlines()[-1]], proc.stderr
    assert needle in errors[0].lower()
    assert "Traceback" not in proc.stderr


def test_cli_auth_failure_exit_code(registry_basic: Registry, tmp_path: Path) -> None:
    proc = _cli(tmp_path, "pull", "--quiet", registry_basic.images.multi.reference)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr == f"ocistore: {registry_basic.host} requires a login (basic auth)\n"
    assert proc.stdout == ""


def test_cli_help_documents_exit_codes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ocistore", "--help"], capture_output=True, text=True, check=True
    )
    for code in ("0 ", "2 ", "3 ", "4 ", "5 ", "6 ", "130"):
        assert f"  {code}" in proc.stdout
