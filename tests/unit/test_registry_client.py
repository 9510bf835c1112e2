"""The registry client against mocked HTTP: what a real local registry won't do on demand.

Docker Hub's anonymous token dance, retries and backoff (with a recorded sleep, never a real
one), token expiry, redirects to a CDN, ranges and size limits. Manifests served are the
recorded busybox 1.38.0 bytes, so digests are real.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from responses import matchers

from ocistore import mediatypes as mt
from ocistore.digest import Digest, VerifyingReader
from ocistore.errors import (
    AuthError,
    BlobNotFoundError,
    DigestMismatchError,
    ManifestInvalidError,
    ManifestNotFoundError,
    NetworkError,
    NotFoundError,
    RegistryError,
)
from ocistore.model import MAX_MANIFEST_BYTES, Index, Manifest, parse_config, parse_manifest
from ocistore.platform import Platform, choose
from ocistore.reference import Reference
from ocistore.registry.auth import Authenticator, Credentials
from ocistore.registry.client import MAX_ATTEMPTS, MAX_REDIRECTS, RegistryClient
from ocistore.registry.transport import TransportOptions, is_insecure
from tests.unit.conftest import BusyboxImage, FakeClock, SleepRecorder

HUB = "https://registry-1.docker.io"
AUTH_URL = "https://auth.docker.io/token"
HUB_CHALLENGE = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'
BUSYBOX_SCOPE = "repository:library/busybox:pull"
CDN = "https://production.cloudflare.docker.com"
REG = "https://registry.example.com"


@pytest.fixture
def options(tmp_path: Path, isolated_env: Path) -> TransportOptions:
    # An empty certs dir: no machine's /etc/docker/certs.d can change what is tested.
    return TransportOptions(certs_dir=str(tmp_path / "certs.d"))


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    # assert_all_requests_are_fired is off: many tests register more than a failing path uses.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def hub_client(
    options: TransportOptions, sleeps: SleepRecorder, clock: FakeClock | None = None
) -> RegistryClient:
    client = RegistryClient.for_reference(
        Reference.parse("busybox:1.38.0"), options=options, use_docker_config=False, sleep=sleeps
    )
    if clock is not None:
        # The client has no clock parameter; give its Authenticator an injected one.
        client.auth = Authenticator(
            client.host,
            None,
            session=client.session,
            insecure=False,
            timeout=options.timeout,
            clock=clock,
        )
    return client


def plain_client(
    options: TransportOptions, sleeps: SleepRecorder, host: str = "registry.example.com"
) -> RegistryClient:
    return RegistryClient(host, options=options, use_docker_config=False, sleep=sleeps)


def calls_to(rsps: responses.RequestsMock, prefix: str) -> list[requests.PreparedRequest]:
    return [c.request for c in rsps.calls if str(c.request.url).startswith(prefix)]


def status_of(call: responses.Call) -> int:
    # responses types Call.response loosely; a call that was answered records a requests.Response.
    assert isinstance(call.response, requests.Response)
    return call.response.status_code


def digest_of(data: bytes) -> str:
    return str(Digest.of(data))


class FakeHub:
    """Docker Hub as seen by a pull of busybox: 401 ping, token service, bearer-checked API.

    Tokens are tok-1, tok-2, ...; ``revoke()`` makes every issued token invalid, as a
    registry does when one expires earlier than the client expected.
    """

    def __init__(
        self, rsps: responses.RequestsMock, image: BusyboxImage, *, expires_in: int = 300
    ) -> None:
        self.image = image
        self.expires_in = expires_in
        self.issued: list[str] = []
        self.valid: set[str] = set()
        self.unauthorized = 0
        self.always_401 = False
        self.manifests = {
            "1.38.0": (image.index, mt.OCI_INDEX),
            digest_of(image.index): (image.index, mt.OCI_INDEX),
            digest_of(image.manifest): (image.manifest, mt.OCI_MANIFEST),
        }
        self.blobs = {digest_of(image.config): image.config}
        self.redirects: dict[str, str] = {}  # blob digest -> Location
        rsps.get(f"{HUB}/v2/", status=401, headers={"WWW-Authenticate": HUB_CHALLENGE})
        rsps.add_callback(responses.GET, AUTH_URL, callback=self._token)
        rsps.add_callback(
            responses.GET,
            re.compile(re.escape(HUB) + r"/v2/library/busybox/manifests/[^/?]+$"),
            callback=self._manifest,
        )
        rsps.add_callback(
            responses.GET,
            re.compile(re.escape(HUB) + r"/v2/library/busybox/blobs/[^/?]+$"),
            callback=self._blob,
        )

    def revoke(self) -> None:
        self.valid.clear()

    def _token(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        token = f"tok-{len(self.issued) + 1}"
        self.issued.append(token)
        self.valid.add(token)
        body = {"token": token, "access_token": token, "expires_in": self.expires_in}
        return 200, {"Content-Type": "application/json"}, json.dumps(body)

    def _denied(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str] | None:
        auth = request.headers.get("Authorization", "")
        if not self.always_401 and auth.startswith("Bearer ") and auth[7:] in self.valid:
            return None
        self.unauthorized += 1
        challenge = f'{HUB_CHALLENGE},scope="{BUSYBOX_SCOPE}",error="invalid_token"'
        return 401, {"WWW-Authenticate": challenge}, '{"errors":[{"code":"UNAUTHORIZED"}]}'

    def _manifest(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        denied = self._denied(request)
        if denied:
            return denied[0], denied[1], denied[2].encode()
        target = str(request.url).rsplit("/", 1)[1]
        if target not in self.manifests:
            return 404, {}, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
        body, media_type = self.manifests[target]
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest_of(body)}
        return 200, headers, body

    def _blob(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        denied = self._denied(request)
        if denied:
            return denied[0], denied[1], denied[2].encode()
        target = str(request.url).rsplit("/", 1)[1]
        if target in self.redirects:
            return 307, {"Location": self.redirects[target]}, b""
        if target not in self.blobs:
            return 404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}'
        return 200, {"Content-Type": "application/octet-stream"}, self.blobs[target]


def read_all(stream: Any, size: int = 7) -> bytes:
    out = bytearray()
    while chunk := stream.read(size):
        out += chunk
    return bytes(out)


# --- Docker Hub, exactly as it does it -----------------------------------------------------------


def test_docker_hub_anonymous_flow(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    image = busybox_musl_amd64
    rsps.get(f"{HUB}/v2/", status=401, headers={"WWW-Authenticate": HUB_CHALLENGE})
    rsps.get(
        AUTH_URL,
        match=[
            matchers.query_param_matcher(
                {"scope": "repository:library/busybox:pull", "service": "registry.docker.io"}
            )
        ],
        json={
            "token": "hub-token",
            "access_token": "hub-token",
            "expires_in": 300,
            "issued_at": "2026-05-13T02:21:49Z",
        },
    )
    rsps.get(
        f"{HUB}/v2/library/busybox/manifests/1.38.0",
        match=[
            matchers.header_matcher(
                {"Authorization": "Bearer hub-token", "Accept": mt.MANIFEST_ACCEPT}
            )
        ],
        body=image.index,
        content_type=mt.OCI_INDEX,
        headers={"Docker-Content-Digest": digest_of(image.index)},
    )

    client = hub_client(options, sleeps)
    assert client.base_url == HUB
    fetched = client.get_manifest(Reference.parse("busybox:1.38.0"))

    assert fetched.data == image.index  # the exact bytes, not a re-serialisation
    assert fetched.digest == Digest.of(image.index)
    assert fetched.content_type == mt.OCI_INDEX
    ping, token, manifest = (c.request for c in rsps.calls)
    assert ping.url == f"{HUB}/v2/" and "Authorization" not in ping.headers
    assert "Authorization" not in token.headers  # anonymous
    assert manifest.headers["Authorization"] == "Bearer hub-token"
    accept = [t.strip() for t in manifest.headers["Accept"].split(",")]
    for media_type in (mt.OCI_INDEX, mt.OCI_MANIFEST, mt.DOCKER_MANIFEST_LIST, mt.DOCKER_MANIFEST):
        assert media_type in accept
    assert not set(accept) & set(mt.DOCKER_SCHEMA1)  # never invite schema 1
    assert sleeps.calls == []


def test_full_pull_of_busybox_metadata(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    image = busybox_musl_amd64
    hub = FakeHub(rsps, image)
    client = hub_client(options, sleeps)
    ref = Reference.parse("busybox:1.38.0")

    top = client.get_manifest(ref)
    index = parse_manifest(top.data, top.content_type)
    assert isinstance(index, Index)
    chosen = choose(
        Platform.parse("linux/amd64"), [d.platform for d in index.manifests if d.platform]
    )
    assert chosen is not None
    entry = index.manifests[chosen]

    fetched = client.get_manifest(ref.with_digest(entry.digest))
    assert fetched.data == image.manifest
    assert fetched.digest == entry.digest
    manifest = parse_manifest(fetched.data, fetched.content_type)
    assert isinstance(manifest, Manifest)

    with client.open_blob(ref.repository, manifest.config.digest) as (stream, start):
        assert start == 0
        reader = VerifyingReader(stream, manifest.config.digest, manifest.config.size)
        data = read_all(reader)
    assert reader.verified
    assert data == image.config
    assert parse_config(data).platform == Platform("linux", "amd64")

    # One ping and one token for the whole session.
    assert len(calls_to(rsps, f"{HUB}/v2/")) == 4
    assert len([c for c in rsps.calls if c.request.url == f"{HUB}/v2/"]) == 1
    assert hub.issued == ["tok-1"]
    assert hub.unauthorized == 0


# --- digests -------------------------------------------------------------------------------------


def test_pull_by_digest_verifies_the_bytes(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    image = busybox_musl_amd64
    hub = FakeHub(rsps, image)
    wanted = digest_of(image.manifest)
    tampered = image.manifest.replace(b'"size": 886160', b'"size": 886161')
    assert tampered != image.manifest
    # The lying registry even sends the digest we asked for in its header.
    hub.manifests[wanted] = (tampered, mt.OCI_MANIFEST)
    client = hub_client(options, sleeps)
    ref = Reference.parse(f"busybox@{wanted}")
    with pytest.raises(DigestMismatchError) as info:
        client.get_manifest(ref)
    assert wanted in str(info.value)
    assert digest_of(tampered) in str(info.value)
    assert info.value.exit_code == 6


def test_docker_content_digest_disagreeing_is_refused(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    image = busybox_musl_amd64
    rsps.get(f"{REG}/v2/", status=200)
    other = digest_of(image.manifest)
    rsps.get(
        f"{REG}/v2/library/busybox/manifests/1.38.0",
        body=image.index,
        content_type=mt.OCI_INDEX,
        headers={"Docker-Content-Digest": other},
    )
    client = plain_client(options, sleeps)
    with pytest.raises(DigestMismatchError) as info:
        client.get_manifest(Reference.parse("registry.example.com/library/busybox:1.38.0"))
    assert other in str(info.value)
    assert digest_of(image.index) in str(info.value)


def test_docker_content_digest_agreeing_and_absent_are_fine(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    image = busybox_musl_amd64
    rsps.get(f"{REG}/v2/", status=200)
    url = f"{REG}/v2/library/busybox/manifests/1.38.0"
    rsps.get(url, body=image.index, content_type=mt.OCI_INDEX)
    client = plain_client(options, sleeps)
    ref = Reference.parse("registry.example.com/library/busybox:1.38.0")
    assert client.get_manifest(ref).digest == Digest.of(image.index)


# --- token expiry and 401s -----------------------------------------------------------------------


def test_token_expiring_mid_session_is_refreshed_by_the_clock(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    hub = FakeHub(rsps, busybox_musl_amd64, expires_in=60)
    clock = FakeClock(5000.0)
    client = hub_client(options, sleeps, clock)
    ref = Reference.parse("busybox:1.38.0")
    client.get_manifest(ref)
    clock.advance(30)
    client.get_manifest(ref)
    assert hub.issued == ["tok-1"]
    clock.advance(30)  # 60 s: past expiry
    hub.revoke()  # and the registry agrees the old token is dead
    client.get_manifest(ref)
    assert hub.issued == ["tok-1", "tok-2"]
    used = [r.headers["Authorization"] for r in calls_to(rsps, f"{HUB}/v2/library/")]
    assert used == ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]
    assert hub.unauthorized == 0  # refreshed before, not after, the registry said no


def test_401_on_a_later_request_fetches_a_new_token_and_retries_once(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    image = busybox_musl_amd64
    hub = FakeHub(rsps, image)
    client = hub_client(options, sleeps)
    ref = Reference.parse("busybox:1.38.0")
    client.get_manifest(ref)
    hub.revoke()  # expired early, from the registry's point of view
    fetched = client.get_manifest(ref)
    assert fetched.data == image.index
    assert hub.issued == ["tok-1", "tok-2"]
    assert hub.unauthorized == 1
    used = [r.headers["Authorization"] for r in calls_to(rsps, f"{HUB}/v2/library/")]
    assert used == ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]
    assert sleeps.calls == []
    # The same works for blobs.
    hub.revoke()
    with client.open_blob("library/busybox", Digest.of(image.config)) as (stream, _):
        assert read_all(stream) == image.config
    assert hub.issued == ["tok-1", "tok-2", "tok-3"]


def test_401_twice_is_an_auth_error(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    hub = FakeHub(rsps, busybox_musl_amd64)
    hub.always_401 = True
    client = hub_client(options, sleeps)
    with pytest.raises(AuthError) as info:
        client.get_manifest(Reference.parse("busybox:1.38.0"))
    assert hub.unauthorized == 2  # the first try and exactly one retry
    assert hub.issued == ["tok-1", "tok-2"]
    message = str(info.value)
    assert "registry-1.docker.io" in message and "library/busybox" in message
    assert "anonymously" in message
    assert all(token not in message for token in hub.issued)
    assert info.value.exit_code == 4


def test_403_is_an_auth_error(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    rsps.get(f"{REG}/v2/private/app/manifests/1", status=403)
    client = plain_client(options, sleeps)
    with pytest.raises(AuthError, match="denied access to private/app"):
        client.get_manifest(Reference.parse("registry.example.com/private/app:1"))
    assert sleeps.calls == []


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_challenge_with_credentials(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    image = busybox_musl_amd64
    rsps.get(f"{REG}/v2/", status=401, headers={"WWW-Authenticate": 'Basic realm="Registry"'})
    rsps.get(
        f"{REG}/v2/team/busybox/manifests/1.38.0",
        match=[matchers.header_matcher({"Authorization": _basic("alice", "pw:with:colons")})],
        body=image.index,
        content_type=mt.OCI_INDEX,
    )
    client = RegistryClient(
        "registry.example.com",
        options=options,
        credentials=Credentials("alice", "pw:with:colons"),
        sleep=sleeps,
    )
    fetched = client.get_manifest(Reference.parse("registry.example.com/team/busybox:1.38.0"))
    assert fetched.data == image.index
    assert not calls_to(rsps, "https://auth.")  # no token service for basic auth


def test_basic_auth_challenge_without_credentials(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=401, headers={"WWW-Authenticate": 'Basic realm="Registry"'})
    client = plain_client(options, sleeps)
    with pytest.raises(AuthError, match="requires a login"):
        client.get_manifest(Reference.parse("registry.example.com/team/busybox:1"))
    assert len(rsps.calls) == 1  # only the ping


def test_docker_hub_credentials_come_from_the_docker_config(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    isolated_env: Path,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    auth = base64.b64encode(b"hubuser:hubpass").decode()
    (isolated_env / "config.json").write_text(
        json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}})
    )
    FakeHub(rsps, busybox_musl_amd64)
    client = RegistryClient.for_reference(
        Reference.parse("busybox:1.38.0"), options=options, sleep=sleeps
    )
    client.get_manifest(Reference.parse("busybox:1.38.0"))
    (token_request,) = calls_to(rsps, AUTH_URL)
    assert token_request.headers["Authorization"] == _basic("hubuser", "hubpass")
    # The registry itself only ever sees the token.
    (manifest_request,) = calls_to(rsps, f"{HUB}/v2/library/")
    assert manifest_request.headers["Authorization"] == "Bearer tok-1"


# --- retries -------------------------------------------------------------------------------------


def _busybox_registry(rsps: responses.RequestsMock, image: BusyboxImage) -> str:
    rsps.get(f"{REG}/v2/", status=200)
    return f"{REG}/v2/library/busybox/manifests/1.38.0"


REF = "registry.example.com/library/busybox:1.38.0"


def test_429_with_retry_after_sleeps_that_long(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    url = _busybox_registry(rsps, busybox_musl_amd64)
    rsps.get(url, status=429, headers={"Retry-After": "3"})
    rsps.get(url, body=busybox_musl_amd64.index, content_type=mt.OCI_INDEX)
    client = plain_client(options, sleeps)
    assert client.get_manifest(Reference.parse(REF)).data == busybox_musl_amd64.index
    assert sleeps.calls == [3.0]
    assert len(calls_to(rsps, url)) == 2


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        ("120", 30.0),  # capped: a registry cannot park us for hours
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # an HTTP date in the past: no wait
    ],
)
def test_retry_after_forms(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
    retry_after: str,
    expected: float,
) -> None:
    url = _busybox_registry(rsps, busybox_musl_amd64)
    rsps.get(url, status=503, headers={"Retry-After": retry_after})
    rsps.get(url, body=busybox_musl_amd64.index, content_type=mt.OCI_INDEX)
    plain_client(options, sleeps).get_manifest(Reference.parse(REF))
    assert sleeps.calls == [expected]


def test_503_then_success(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    url = _busybox_registry(rsps, busybox_musl_amd64)
    rsps.get(url, status=503)
    rsps.get(url, body=busybox_musl_amd64.index, content_type=mt.OCI_INDEX)
    fetched = plain_client(options, sleeps).get_manifest(Reference.parse(REF))
    assert fetched.data == busybox_musl_amd64.index
    assert len(sleeps.calls) == 1
    assert 0.25 <= sleeps.calls[0] <= 0.5  # first backoff: 0.5 s with jitter


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_five_consecutive_failures_give_up(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
    status: int,
) -> None:
    url = _busybox_registry(rsps, busybox_musl_amd64)
    rsps.get(url, status=status)
    with pytest.raises(RegistryError) as info:
        plain_client(options, sleeps).get_manifest(Reference.parse(REF))
    assert isinstance(info.value, NetworkError)
    assert info.value.exit_code == 5
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value)
    assert len(calls_to(rsps, url)) == MAX_ATTEMPTS == 5
    # Exponential backoff with jitter between the attempts, none after the last.
    assert len(sleeps.calls) == 4
    for attempt, delay in enumerate(sleeps.calls, start=1):
        base = 0.5 * 2 ** (attempt - 1)
        assert base / 2 <= delay <= base


def test_five_503s_on_a_blob(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    digest = Digest.of(b"blob")
    rsps.get(f"{REG}/v2/a/blobs/{digest}", status=503)
    client = plain_client(options, sleeps)
    with pytest.raises(RegistryError) as info, client.open_blob("a", digest):
        pass
    assert info.value.status == 503
    assert str(digest) in str(info.value)
    assert len(sleeps.calls) == 4


def test_non_retryable_status_is_not_retried(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    url = f"{REG}/v2/library/busybox/manifests/1.38.0"
    rsps.get(url, status=400)
    with pytest.raises(RegistryError) as info:
        plain_client(options, sleeps).get_manifest(Reference.parse(REF))
    assert info.value.status == 400
    assert len(calls_to(rsps, url)) == 1
    assert sleeps.calls == []


def test_connection_error_then_success(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    url = _busybox_registry(rsps, busybox_musl_amd64)
    rsps.get(url, body=requests.ConnectionError("connection reset by peer"))
    rsps.get(url, body=busybox_musl_amd64.index, content_type=mt.OCI_INDEX)
    fetched = plain_client(options, sleeps).get_manifest(Reference.parse(REF))
    assert fetched.data == busybox_musl_amd64.index
    assert len(sleeps.calls) == 1


def test_connection_errors_exhausted_name_the_host_not_the_token(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    hub = FakeHub(rsps, busybox_musl_amd64)
    url = f"{HUB}/v2/library/ubuntu/manifests/latest"
    rsps.get(
        url,
        body=requests.ConnectionError(
            "HTTPSConnectionPool(host='registry-1.docker.io', port=443): Max retries exceeded"
        ),
    )
    client = hub_client(options, sleeps)
    with pytest.raises(NetworkError) as info:
        client.get_manifest(Reference.parse("ubuntu"))
    assert not isinstance(info.value, RegistryError)
    assert info.value.exit_code == 5
    message = str(info.value)
    assert "registry-1.docker.io" in message
    assert f"{MAX_ATTEMPTS} attempts" in message
    assert "ConnectionError" in message
    assert hub.issued and all(token not in message for token in hub.issued)
    assert len(calls_to(rsps, url)) == MAX_ATTEMPTS
    assert len(sleeps.calls) == MAX_ATTEMPTS - 1


def test_ping_failure_says_it_is_not_a_registry(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=500)
    with pytest.raises(RegistryError, match="does not look like a registry") as info:
        plain_client(options, sleeps).get_manifest(Reference.parse(REF))
    assert info.value.status == 500
    assert len(rsps.calls) == MAX_ATTEMPTS


def test_ping_happens_once(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    url = _busybox_registry(rsps, busybox_musl_amd64)
    rsps.get(url, body=busybox_musl_amd64.index, content_type=mt.OCI_INDEX)
    client = plain_client(options, sleeps)
    client.get_manifest(Reference.parse(REF))
    client.get_manifest(Reference.parse(REF))
    assert len([c for c in rsps.calls if c.request.url == f"{REG}/v2/"]) == 1
    assert len(calls_to(rsps, url)) == 2


# --- not found -----------------------------------------------------------------------------------


def test_404_manifest(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    FakeHub(rsps, busybox_musl_amd64)
    with pytest.raises(ManifestNotFoundError) as info:
        hub_client(options, sleeps).get_manifest(Reference.parse("busybox:no-such-tag"))
    assert "docker.io/library/busybox:no-such-tag" in str(info.value)
    assert isinstance(info.value, NotFoundError) and info.value.exit_code == 3
    assert sleeps.calls == []


def test_404_blob(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    FakeHub(rsps, busybox_musl_amd64)
    missing = Digest.of(b"not there")
    client = hub_client(options, sleeps)
    with pytest.raises(BlobNotFoundError) as info, client.open_blob("library/busybox", missing):
        pass
    assert str(missing) in str(info.value)
    assert info.value.exit_code == 3


# --- blob redirects ------------------------------------------------------------------------------


def _cdn_url(digest: Digest, suffix: str = "") -> str:
    path = f"registry-v2/docker/registry/v2/blobs/sha256/{digest.hex[:2]}/{digest.hex}/data"
    return f"{CDN}/{path}{suffix}"


def test_blob_redirect_to_a_cdn_drops_authorization(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    image = busybox_musl_amd64
    hub = FakeHub(rsps, image)
    digest = Digest.of(image.config)
    blob_url = f"{HUB}/v2/library/busybox/blobs/{digest}"
    signed = _cdn_url(digest, "?verify=1778640000-abcdef")
    hub.redirects[str(digest)] = signed
    rsps.get(_cdn_url(digest), body=image.config)
    client = hub_client(options, sleeps)
    with client.open_blob("library/busybox", digest) as (stream, start):
        assert read_all(stream) == image.config
        assert start == 0
    (registry_request,) = calls_to(rsps, blob_url)
    assert registry_request.headers["Authorization"] == "Bearer tok-1"
    (cdn_request,) = calls_to(rsps, CDN)
    assert cdn_request.url == signed
    assert "Authorization" not in cdn_request.headers


def test_redirect_chain_within_the_cdn_still_drops_authorization(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    # registry -> cdn/a -> cdn/b: the second hop is "same host" as the first, but the
    # host that may see the registry's token is the registry, not the previous hop.
    image = busybox_musl_amd64
    hub = FakeHub(rsps, image)
    digest = Digest.of(image.config)
    hub.redirects[str(digest)] = f"{CDN}/first"
    rsps.get(f"{CDN}/first", status=302, headers={"Location": "/second"})
    rsps.get(f"{CDN}/second", body=image.config)
    client = hub_client(options, sleeps)
    with client.open_blob("library/busybox", digest) as (stream, _):
        assert read_all(stream) == image.config
    cdn_requests = calls_to(rsps, CDN)
    assert [r.url for r in cdn_requests] == [f"{CDN}/first", f"{CDN}/second"]
    for request in cdn_requests:
        assert "Authorization" not in request.headers


def test_same_host_redirect_keeps_authorization(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    image = busybox_musl_amd64
    hub = FakeHub(rsps, image)
    digest = Digest.of(image.config)
    moved = f"{HUB}/v2/library/busybox/blobs/storage/{digest.hex}"
    hub.redirects[str(digest)] = f"/v2/library/busybox/blobs/storage/{digest.hex}"  # relative
    rsps.get(
        moved,
        match=[matchers.header_matcher({"Authorization": "Bearer tok-1"})],
        body=image.config,
    )
    client = hub_client(options, sleeps)
    with client.open_blob("library/busybox", digest) as (stream, _):
        assert read_all(stream) == image.config
    (moved_request,) = calls_to(rsps, moved)
    assert moved_request.headers["Authorization"] == "Bearer tok-1"


def test_redirect_to_plain_http_on_the_same_host_drops_authorization(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    # Same host name, but http: the credentials would cross the network in clear text.
    rsps.get(f"{REG}/v2/", status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
    digest = Digest.of(b"blob bytes")
    rsps.get(
        f"{REG}/v2/a/blobs/{digest}",
        status=307,
        headers={"Location": f"http://registry.example.com/storage/{digest.hex}"},
    )
    rsps.get(f"http://registry.example.com/storage/{digest.hex}", body=b"blob bytes")
    client = RegistryClient(
        "registry.example.com",
        options=options,
        credentials=Credentials("alice", "pw"),
        sleep=sleeps,
    )
    with client.open_blob("a", digest) as (stream, _):
        assert read_all(stream) == b"blob bytes"
    (registry_request,) = calls_to(rsps, f"{REG}/v2/a/")
    assert registry_request.headers["Authorization"] == _basic("alice", "pw")
    (insecure_request,) = calls_to(rsps, "http://registry.example.com/")
    assert "Authorization" not in insecure_request.headers


def test_redirect_loop_is_a_registry_error(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    digest = Digest.of(b"x")
    rsps.get(f"{REG}/v2/a/blobs/{digest}", status=307, headers={"Location": f"{CDN}/loop"})
    rsps.get(f"{CDN}/loop", status=302, headers={"Location": f"{CDN}/loop"})
    client = plain_client(options, sleeps)
    with (
        pytest.raises(RegistryError, match="too many redirects") as info,
        client.open_blob("a", digest),
    ):
        pass
    assert str(digest) in str(info.value)
    assert len(calls_to(rsps, CDN)) == MAX_REDIRECTS
    assert len(calls_to(rsps, f"{REG}/v2/a/")) == 1


def test_redirect_without_location_is_a_registry_error(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    digest = Digest.of(b"x")
    rsps.get(f"{REG}/v2/a/blobs/{digest}", status=307)
    client = plain_client(options, sleeps)
    with pytest.raises(RegistryError, match="HTTP 307") as info, client.open_blob("a", digest):
        pass
    assert info.value.status == 307


# --- ranges --------------------------------------------------------------------------------------


BLOB = bytes(range(256)) * 40


def test_range_answered_206(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    digest = Digest.of(BLOB)
    url = f"{REG}/v2/a/blobs/{digest}"
    rsps.get(
        url,
        status=206,
        body=BLOB[1000:],
        headers={"Content-Range": f"bytes 1000-{len(BLOB) - 1}/{len(BLOB)}"},
    )
    client = plain_client(options, sleeps)
    with client.open_blob("a", digest, offset=1000) as (stream, start):
        assert start == 1000
        assert read_all(stream, 333) == BLOB[1000:]
    (request,) = calls_to(rsps, url)
    assert request.headers["Range"] == "bytes=1000-"


def test_range_ignored_answered_200(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    digest = Digest.of(BLOB)
    rsps.get(f"{REG}/v2/a/blobs/{digest}", status=200, body=BLOB)
    client = plain_client(options, sleeps)
    with client.open_blob("a", digest, offset=1000) as (stream, start):
        assert start == 0  # the caller must start over
        assert read_all(stream, 4096) == BLOB


def test_no_range_header_without_offset(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    digest = Digest.of(BLOB)
    url = f"{REG}/v2/a/blobs/{digest}"
    rsps.get(url, body=BLOB)
    client = plain_client(options, sleeps)
    with client.open_blob("a", digest) as (stream, start):
        assert (read_all(stream, 1 << 20), start) == (BLOB, 0)
    (request,) = calls_to(rsps, url)
    assert "Range" not in request.headers


def test_206_without_asking_for_a_range_is_refused(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    digest = Digest.of(BLOB)
    rsps.get(f"{REG}/v2/a/blobs/{digest}", status=206, body=BLOB[5:])
    client = plain_client(options, sleeps)
    with pytest.raises(RegistryError, match="HTTP 206"), client.open_blob("a", digest):
        pass


def test_range_survives_a_cdn_redirect(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    digest = Digest.of(BLOB)
    rsps.get(f"{REG}/v2/a/blobs/{digest}", status=307, headers={"Location": f"{CDN}/blob"})
    rsps.get(f"{CDN}/blob", status=206, body=BLOB[10:])
    client = plain_client(options, sleeps)
    with client.open_blob("a", digest, offset=10) as (stream, start):
        assert (read_all(stream, 999), start) == (BLOB[10:], 10)
    (cdn_request,) = calls_to(rsps, CDN)
    assert cdn_request.headers["Range"] == "bytes=10-"


# --- manifest size limit -------------------------------------------------------------------------


def _big_manifest(size: int) -> bytes:
    head = b'{"schemaVersion": 2, "layers": [], "x": "'
    return head + b"a" * (size - len(head) - 2) + b'"}'


def test_manifest_over_4_mib_by_content_length(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    url = f"{REG}/v2/library/busybox/manifests/1.38.0"
    rsps.get(f"{REG}/v2/", status=200)
    # Refused on the declared length alone, before a byte of the body is read.
    rsps.get(
        url,
        body=b"{}",
        content_type=mt.OCI_MANIFEST,
        headers={"Content-Length": str(MAX_MANIFEST_BYTES + 1)},
    )
    with pytest.raises(ManifestInvalidError) as info:
        plain_client(options, sleeps).get_manifest(Reference.parse(REF))
    assert str(MAX_MANIFEST_BYTES + 1) in str(info.value)
    assert info.value.exit_code == 7


def test_manifest_over_4_mib_with_true_content_length(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    rsps.get(
        f"{REG}/v2/library/busybox/manifests/1.38.0",
        body=_big_manifest(MAX_MANIFEST_BYTES + 1),
        content_type=mt.OCI_MANIFEST,
        auto_calculate_content_length=True,
    )
    with pytest.raises(ManifestInvalidError, match="over the limit"):
        plain_client(options, sleeps).get_manifest(Reference.parse(REF))


def test_manifest_over_4_mib_streamed(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    url = f"{REG}/v2/library/busybox/manifests/1.38.0"
    rsps.get(f"{REG}/v2/", status=200)
    rsps.get(url, body=_big_manifest(MAX_MANIFEST_BYTES + 1), content_type=mt.OCI_MANIFEST)
    client = plain_client(options, sleeps)
    with pytest.raises(ManifestInvalidError, match=f"over the {MAX_MANIFEST_BYTES}-byte limit"):
        client.get_manifest(Reference.parse(REF))
    # No Content-Length was sent, so only counting the streamed bytes could catch it.
    (call,) = [c for c in rsps.calls if c.request.url == url]
    assert isinstance(call.response, requests.Response)
    assert "Content-Length" not in call.response.headers


def test_manifest_of_exactly_4_mib_is_accepted(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    body = _big_manifest(MAX_MANIFEST_BYTES)
    assert len(body) == MAX_MANIFEST_BYTES
    rsps.get(f"{REG}/v2/", status=200)
    rsps.get(f"{REG}/v2/library/busybox/manifests/1.38.0", body=body, content_type=mt.OCI_MANIFEST)
    fetched = plain_client(options, sleeps).get_manifest(Reference.parse(REF))
    assert fetched.data == body


# --- scheme per host -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "insecure", "expected"),
    [
        ("127.0.0.1:5000", (), True),
        ("127.0.0.1", (), True),
        ("127.0.0.2:5000", (), True),
        ("localhost", (), True),
        ("localhost:5000", (), True),
        ("[::1]:5000", (), True),
        ("ghcr.io", (), False),
        ("registry-1.docker.io", (), False),
        ("registry.example.com:5000", (), False),
        ("localhost.example.com", (), False),
        ("127.0.0.1.nip.io:5000", (), False),
        ("192.168.1.10:5000", (), False),
        ("registry.example.com:5000", ("registry.example.com:5000",), True),
        ("192.168.1.10:5000", ("192.168.1.10:5000",), True),
        # Insecure means that exact host[:port], not the same name on another port.
        ("registry.example.com", ("registry.example.com:5000",), False),
    ],
)
def test_which_hosts_are_insecure(host: str, insecure: tuple[str, ...], expected: bool) -> None:
    assert is_insecure(host, TransportOptions(insecure_registries=frozenset(insecure))) is expected


@pytest.mark.parametrize(
    ("host", "insecure", "ping_url"),
    [
        ("127.0.0.1:5000", (), "http://127.0.0.1:5000/v2/"),
        ("localhost", (), "http://localhost/v2/"),
        (
            "registry.example.com:5000",
            ("registry.example.com:5000",),
            "http://registry.example.com:5000/v2/",
        ),
        ("registry.example.com:5000", (), "https://registry.example.com:5000/v2/"),
    ],
)
def test_requests_go_to_the_chosen_scheme(
    rsps: responses.RequestsMock,
    tmp_path: Path,
    isolated_env: Path,
    host: str,
    insecure: tuple[str, ...],
    ping_url: str,
) -> None:
    rsps.get(ping_url, status=200)
    rsps.get(re.compile(re.escape(ping_url) + "a/manifests/.*"), status=404)
    options = TransportOptions(
        insecure_registries=frozenset(insecure), certs_dir=str(tmp_path / "certs.d")
    )
    client = RegistryClient(host, options=options, use_docker_config=False, sleep=SleepRecorder())
    with pytest.raises(ManifestNotFoundError):
        client.get_manifest(Reference.parse(f"{host}/a:1"))
    urls = [c.request.url for c in rsps.calls]
    if ping_url.startswith("http:"):
        # Docker's rule for insecure hosts: HTTPS is tried first; it is not there (the mock
        # refuses the connection), so plain HTTP it is.
        assert urls[0] == f"https://{host}/v2/"
        urls = urls[1:]
    assert urls == [ping_url, f"{ping_url}a/manifests/1"]


def test_insecure_host_that_speaks_https_stays_on_https(
    rsps: responses.RequestsMock, tmp_path: Path, isolated_env: Path
) -> None:
    rsps.get("https://127.0.0.1:5000/v2/", status=200)
    rsps.get("https://127.0.0.1:5000/v2/a/manifests/1", status=404)
    options = TransportOptions(certs_dir=str(tmp_path / "certs.d"))
    client = RegistryClient("127.0.0.1:5000", options=options, use_docker_config=False)
    with pytest.raises(ManifestNotFoundError):
        client.get_manifest(Reference.parse("127.0.0.1:5000/a:1"))
    assert all(str(c.request.url).startswith("https://") for c in rsps.calls)


def test_insecure_registry_may_use_a_plain_http_token_realm(
    rsps: responses.RequestsMock, tmp_path: Path, isolated_env: Path
) -> None:
    rsps.get(
        "http://127.0.0.1:5000/v2/",
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="http://127.0.0.1:5001/token",service="local"'},
    )
    rsps.get("http://127.0.0.1:5001/token", json={"token": "local-token"})
    rsps.get(
        "http://127.0.0.1:5000/v2/a/manifests/1",
        match=[matchers.header_matcher({"Authorization": "Bearer local-token"})],
        status=404,
    )
    options = TransportOptions(certs_dir=str(tmp_path / "certs.d"))
    client = RegistryClient("127.0.0.1:5000", options=options, use_docker_config=False)
    with pytest.raises(ManifestNotFoundError):
        client.get_manifest(Reference.parse("127.0.0.1:5000/a:1"))


# --- broken streams and encodings ----------------------------------------------------------------


class _BreaksAfter(io.RawIOBase):
    """A socket-like raw stream that resets the connection after ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int) -> None:
        self._data = data
        self._limit = limit
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._limit:
            raise ConnectionResetError(104, "Connection reset by peer")
        n = min(len(buffer), self._limit - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def _breaking_body(data: bytes, limit: int) -> io.BufferedReader:
    return io.BufferedReader(_BreaksAfter(data, limit), buffer_size=64)


def test_blob_stream_breaking_midway_is_a_network_error(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    rsps.get(f"{REG}/v2/", status=200)
    digest = Digest.of(BLOB)
    rsps.get(f"{REG}/v2/a/blobs/{digest}", body=_breaking_body(BLOB, 1000))
    client = plain_client(options, sleeps)
    received = bytearray()
    with (
        client.open_blob("a", digest) as (stream, _),
        pytest.raises(NetworkError, match="connection broke while reading blob") as info,
    ):
        while chunk := stream.read(100):
            received += chunk
    assert bytes(received) == BLOB[: len(received)] and len(received) <= 1000
    assert str(digest) in str(info.value)
    assert info.value.exit_code == 5


def test_manifest_stream_breaking_midway_is_a_network_error(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    url = _busybox_registry(rsps, busybox_musl_amd64)
    rsps.get(url, body=_breaking_body(busybox_musl_amd64.index, 100), content_type=mt.OCI_INDEX)
    with pytest.raises(NetworkError, match="connection broke reading manifest"):
        plain_client(options, sleeps).get_manifest(Reference.parse(REF))


def test_blob_bytes_are_never_content_decoded(
    rsps: responses.RequestsMock, options: TransportOptions, sleeps: SleepRecorder
) -> None:
    # A gzip layer stored on S3 with "Content-Encoding: gzip": the digest is of the
    # compressed bytes, so the client must hand those over, not a decompressed view.
    layer = gzip.compress(BLOB, mtime=0)
    digest = Digest.of(layer)
    rsps.get(f"{REG}/v2/", status=200)
    rsps.get(f"{REG}/v2/a/blobs/{digest}", status=307, headers={"Location": f"{CDN}/layer"})
    rsps.get(f"{CDN}/layer", body=layer, headers={"Content-Encoding": "gzip"})
    client = plain_client(options, sleeps)
    with client.open_blob("a", digest) as (stream, _):
        reader = VerifyingReader(stream, digest, len(layer))
        assert read_all(reader, 500) == layer
    assert reader.verified


def test_tampered_blob_is_caught_by_the_verifying_reader(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    image = busybox_musl_amd64
    hub = FakeHub(rsps, image)
    digest = Digest.of(image.config)
    hub.blobs[str(digest)] = image.config.replace(b"amd64", b"arm64")
    client = hub_client(options, sleeps)
    with client.open_blob("library/busybox", digest) as (stream, _):
        reader = VerifyingReader(stream, digest, len(image.config))
        with pytest.raises(DigestMismatchError):
            read_all(reader)


def test_tls_failure_is_not_retried_and_says_where_the_ca_goes(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    url = f"{HUB}/v2/"
    rsps.get(url, body=requests.exceptions.SSLError("certificate verify failed"))
    client = hub_client(options, sleeps)
    with pytest.raises(NetworkError) as info:
        client.get_manifest(Reference.parse("busybox:1.38.0"))
    assert "ca.crt" in str(info.value) and "registry-1.docker.io" in str(info.value)
    assert sleeps.calls == []
    assert len(calls_to(rsps, url)) == 1


def test_token_service_503_is_retried_like_the_registry(
    rsps: responses.RequestsMock,
    options: TransportOptions,
    sleeps: SleepRecorder,
    busybox_musl_amd64: BusyboxImage,
) -> None:
    FakeHub(rsps, busybox_musl_amd64)
    client = hub_client(options, sleeps)
    # FakeHub answers the token request normally; a failing first answer is put ahead of it.
    token_url = "https://auth.docker.io/token"
    rsps.add(responses.GET, token_url, status=503)
    rsps.registered().insert(0, rsps.registered().pop())
    fetched = client.get_manifest(Reference.parse("busybox:1.38.0"))
    assert fetched.data == busybox_musl_amd64.index
    assert len(sleeps.calls) == 1
    statuses = [status_of(c) for c in rsps.calls if str(c.request.url).startswith(token_url)]
    assert statuses == [503, 200]
