"""A client for one registry host speaking the OCI distribution protocol (pull side).

It fetches manifests and streams blobs; it stores nothing. Requests are retried on
connection errors, 429 and 5xx with exponential backoff, jitter and ``Retry-After``; a 401
with a fresh challenge re-authenticates once. Blob redirects (to a CDN, S3...) are followed
by hand so that ``Authorization`` is never sent to another host.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple, Protocol
from urllib.parse import urljoin, urlsplit

import requests

from ocistore import mediatypes as mt
from ocistore.digest import Digest
from ocistore.errors import (
    AuthError,
    BlobNotFoundError,
    DigestMismatchError,
    ManifestInvalidError,
    ManifestNotFoundError,
    NetworkError,
    RegistryError,
)
from ocistore.model import MAX_MANIFEST_BYTES
from ocistore.reference import Reference
from ocistore.registry.auth import Authenticator, Credentials, load_docker_credentials
from ocistore.registry.transport import (
    TransportOptions,
    is_insecure,
    make_session,
    refuses_tls,
)

MAX_REDIRECTS = 5
MAX_ATTEMPTS = 5
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_BACKOFF = 30.0


class FetchedManifest(NamedTuple):
    data: bytes
    content_type: str
    digest: Digest


class BlobStream(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class RegistryClient:
    def __init__(
        self,
        host: str,
        *,
        options: TransportOptions | None = None,
        credentials: Credentials | None = None,
        use_docker_config: bool = True,
        registry_name: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.host = host
        self.options = options or TransportOptions()
        self.session, self.base_url = make_session(host, self.options)
        name = registry_name or host
        if credentials is None and use_docker_config:
            credentials = load_docker_credentials(name)
        self.auth = Authenticator(
            host,
            credentials,
            session=self.session,
            fetch=self._fetch_token,
            insecure=is_insecure(host, self.options),
            timeout=self.options.timeout,
        )
        self._sleep = sleep
        self._insecure = is_insecure(host, self.options)
        self._pinged = False
        self._ping_lock = threading.Lock()

    @classmethod
    def for_reference(cls, ref: Reference, **kwargs: object) -> RegistryClient:
        return cls(ref.api_host, registry_name=ref.registry, **kwargs)  # type: ignore[arg-type]

    # --- requests ------------------------------------------------------------------------
    def ping(self) -> None:
        """GET /v2/ once, to learn how this registry wants us to authenticate."""
        with self._ping_lock:
            if self._pinged:
                return
            if self._insecure:
                self._probe_scheme()
            resp = self._send("GET", f"{self.base_url}/v2/", headers={}, stream=False)
            resp.close()
            if resp.status_code == 401:
                self.auth.set_challenge(resp.headers.get("WWW-Authenticate"))
            elif resp.status_code >= 400 and resp.status_code != 404:
                raise RegistryError(
                    f"{self.host} does not look like a registry (GET /v2/ answered "
                    f"HTTP {resp.status_code})",
                    status=resp.status_code,
                )
            self._pinged = True

    def _probe_scheme(self) -> None:
        """Docker's rule for loopback and --insecure-registry hosts: HTTPS if the host
        speaks it (without verification if its certificate is not trusted), else HTTP."""
        if refuses_tls(self.host, self.options.timeout):
            self.base_url = f"http://{self.host}"
            return
        url = f"https://{self.host}/v2/"
        try:
            self.session.get(url, timeout=self.options.timeout, allow_redirects=False).close()
            self.base_url = f"https://{self.host}"
            return
        except requests.exceptions.SSLError as exc:
            if "certificate verify failed" in str(exc).lower():
                import urllib3

                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
                self.session.verify = False
                self.base_url = f"https://{self.host}"
                return
        except requests.RequestException:
            pass
        self.base_url = f"http://{self.host}"

    def _send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        stream: bool,
        allow_redirects: bool = False,
        params: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> requests.Response:
        """One request with retries for transient failures; returns any final response."""
        attempt = 0
        where = urlsplit(url).netloc
        while True:
            attempt += 1
            try:
                resp = self.session.request(
                    method,
                    url,
                    headers=headers,
                    stream=stream,
                    timeout=self.options.timeout,
                    allow_redirects=allow_redirects,
                    params=params,
                    auth=auth,
                    # Explicit, or REQUESTS_CA_BUNDLE would override an unverified session.
                    verify=self.session.verify,
                )
            except requests.exceptions.SSLError as exc:
                # Not transient: retrying cannot make an untrusted certificate trusted.
                raise NetworkError(
                    f"TLS with {where} failed ({_describe(exc)}); if it uses a private CA, "
                    f"put it in {self.options.certs_dir}/{where}/ca.crt"
                ) from None
            except (
                requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema,
            ) as exc:
                raise RegistryError(f"unusable URL for {where}: {_describe(exc)}") from None
            except requests.RequestException as exc:
                if attempt >= MAX_ATTEMPTS or _no_such_host(exc):
                    raise NetworkError(
                        f"cannot reach {where} after {attempt} attempts: {_describe(exc)}"
                    ) from None
                self._sleep(_backoff(attempt, None))
                continue
            if resp.status_code in _RETRY_STATUS and attempt < MAX_ATTEMPTS:
                delay = _backoff(attempt, resp.headers.get("Retry-After"))
                resp.close()
                self._sleep(delay)
                continue
            return resp

    def _fetch_token(
        self, url: str, params: dict[str, str], auth: tuple[str, str] | None
    ) -> requests.Response:
        # Through _send, so a token service's 429/5xx and dropped connections are retried
        # like the registry's own.
        return self._send(
            "GET", url, headers={}, stream=False, allow_redirects=True, params=params, auth=auth
        )

    def _authorized(
        self, method: str, url: str, scope: str, headers: dict[str, str], *, stream: bool
    ) -> requests.Response:
        self.ping()
        refreshed = False
        while True:
            all_headers = {**headers, **self.auth.headers(scope)}
            resp = self._send(method, url, headers=all_headers, stream=stream)
            if resp.status_code != 401:
                return resp
            resp.close()
            challenge = resp.headers.get("WWW-Authenticate")
            if refreshed:
                who = "with the given credentials" if self.auth.credentials else "anonymously"
                raise AuthError(
                    f"{self.host} refused access {who} (HTTP 401 for {_scope_name(scope)})"
                )
            # A token may have expired early or the registry may want a new scope.
            self.auth.set_challenge(challenge)
            self.auth.invalidate(scope)
            refreshed = True

    # --- manifests -----------------------------------------------------------------------
    def get_manifest(self, ref: Reference, accept: str = mt.MANIFEST_ACCEPT) -> FetchedManifest:
        target = str(ref.digest) if ref.digest is not None else str(ref.tag)
        self.ping()  # first: it settles the scheme the URL is built with
        url = f"{self.base_url}/v2/{ref.repository}/manifests/{target}"
        scope = f"repository:{ref.repository}:pull"
        resp = self._authorized("GET", url, scope, {"Accept": accept}, stream=True)
        with resp:
            if resp.status_code == 404:
                raise ManifestNotFoundError(f"{ref} not found", reference=str(ref))
            if resp.status_code == 403:
                raise AuthError(
                    f"{self.host} denied access to {ref.repository}", reference=str(ref)
                )
            if resp.status_code != 200:
                raise RegistryError(
                    f"{self.host} answered HTTP {resp.status_code} for the manifest of {ref}",
                    status=resp.status_code,
                    reference=str(ref),
                )
            data = _read_capped(resp, MAX_MANIFEST_BYTES, str(ref))
            content_type = resp.headers.get("Content-Type", "")
            header_digest = resp.headers.get("Docker-Content-Digest")
        algorithm = ref.digest.algorithm if ref.digest is not None else "sha256"
        digest = Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
        if ref.digest is not None and digest != ref.digest:
            raise DigestMismatchError(
                f"{self.host} served a manifest whose digest is {digest}, not {ref.digest}",
                reference=str(ref),
            )
        if (
            header_digest
            and header_digest.startswith("sha256:")
            and algorithm == "sha256"
            and header_digest != str(digest)
        ):
            raise DigestMismatchError(
                f"{self.host} says the manifest of {ref} is {header_digest} but its bytes "
                f"hash to {digest}",
                reference=str(ref),
            )
        return FetchedManifest(data, content_type, digest)

    # --- blobs ---------------------------------------------------------------------------
    @contextmanager
    def open_blob(
        self, repository: str, digest: Digest, *, offset: int = 0
    ) -> Iterator[tuple[BlobStream, int]]:
        """Stream a blob; yields (raw byte stream, offset it starts at).

        With ``offset`` a Range is asked for; a registry that ignores it answers 200 and the
        stream starts at 0, which the yielded offset says. The caller verifies the bytes.
        """
        self.ping()  # first: it settles the scheme the URL is built with
        url = f"{self.base_url}/v2/{repository}/blobs/{digest}"
        scope = f"repository:{repository}:pull"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._authorized("GET", url, scope, headers, stream=True)
        registry = urlsplit(url)
        hops = 0
        while resp.is_redirect:
            hops += 1
            location = resp.headers.get("Location", "")
            resp.close()
            if hops > MAX_REDIRECTS or not location:
                raise RegistryError(f"too many redirects fetching {digest}", digest=str(digest))
            next_url = urljoin(url, location)
            # Credentials belong to the registry: a CDN gets only a signed URL. Compare with
            # the registry's own origin, not the previous hop's: otherwise a CDN redirecting
            # within itself (cdn/a -> cdn/b) was handed the registry's token on the second
            # hop. The scheme is part of the origin so an https -> http redirect on the same
            # host does not send the credentials in clear text.
            target = urlsplit(next_url)
            same_host = (target.scheme, target.netloc) == (registry.scheme, registry.netloc)
            hop_headers = dict(headers)
            if same_host:
                hop_headers.update(self.auth.headers(scope))
            url = next_url
            resp = self._send("GET", url, headers=hop_headers, stream=True)
        try:
            if resp.status_code == 404:
                raise BlobNotFoundError(
                    f"blob {digest} not found in {self.host}/{repository}", digest=str(digest)
                )
            if resp.status_code in (401, 403):
                raise AuthError(
                    f"{urlsplit(url).netloc} denied access to blob {digest}", digest=str(digest)
                )
            if resp.status_code == 206 and offset:
                start = _range_start(resp.headers.get("Content-Range"), offset)
            elif resp.status_code == 200:
                start = 0
            else:
                raise RegistryError(
                    f"{urlsplit(url).netloc} answered HTTP {resp.status_code} for blob {digest}",
                    status=resp.status_code,
                    digest=str(digest),
                )
            resp.raw.decode_content = False  # the blob's bytes, never a Content-Encoding view
            # The host read from goes into errors: a broken link must name the registry.
            yield _RawStream(resp, digest, urlsplit(url).netloc), start
        finally:
            resp.close()

    def close(self) -> None:
        self.session.close()


class _RawStream:
    """Adapts urllib3's raw stream: maps socket errors to NetworkError."""

    def __init__(self, resp: requests.Response, digest: Digest, where: str) -> None:
        self._raw = resp.raw
        self._digest = digest
        self._where = where

    def abort(self) -> None:
        """From another thread: make a blocked ``read`` return now (Ctrl-C while the
        registry stalls). urllib3 >= 2.3 shuts the socket down for reading; closing it
        would not wake the reader. Older urllib3: a no-op, the read timeout still ends it."""
        shutdown = getattr(self._raw, "shutdown", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()

    def read(self, n: int = -1, /) -> bytes:
        try:
            data: bytes = self._raw.read(None if n < 0 else n)
        except Exception as exc:  # urllib3 raises a zoo of types for a broken stream
            raise NetworkError(
                f"connection broke while reading blob {self._digest} from {self._where}: "
                f"{_describe(exc)}",
                digest=str(self._digest),
            ) from None
        return data


def _read_capped(resp: requests.Response, cap: int, what: str) -> bytes:
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise ManifestInvalidError(f"manifest of {what} is {declared} bytes, over the limit")
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in resp.iter_content(65536):
            total += len(chunk)
            if total > cap:
                raise ManifestInvalidError(f"manifest of {what} is over the {cap}-byte limit")
            chunks.append(chunk)
    except requests.RequestException as exc:
        raise NetworkError(
            f"connection broke reading manifest of {what}: {_describe(exc)}"
        ) from None
    return b"".join(chunks)


def _backoff(attempt: int, retry_after: str | None) -> float:
    if retry_after:
        delay = _parse_retry_after(retry_after)
        if delay is not None:
            return min(delay, _MAX_BACKOFF)
    base = min(_MAX_BACKOFF, 0.5 * 2.0 ** (attempt - 1))
    return base / 2 + random.uniform(0, base / 2)


def _parse_retry_after(value: str) -> float | None:
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, float(when.timestamp()) - time.time())


def _range_start(header: str | None, asked: int) -> int:
    """Where a 206 body starts: Content-Range's first byte (``bytes START-END/TOTAL``)."""
    if header and header.startswith("bytes "):
        first = header[6:].split("-", 1)[0]
        if first.isdigit():
            return int(first)
    return asked


def _no_such_host(exc: BaseException) -> bool:
    # A name that does not resolve will not resolve in a second either ("Temporary failure
    # in name resolution" is the transient kind, and is retried).
    return "Name or service not known" in str(exc) or "No address associated" in str(exc)


def _scope_name(scope: str) -> str:
    return scope.split(":")[1] if scope.count(":") >= 2 else scope


def _describe(exc: BaseException) -> str:
    # requests' messages embed full URLs and pool internals; the class name plus the
    # innermost reason is what a person needs, and never carries a header value.
    reason = exc
    while reason.__context__ is not None and reason.__context__ is not reason:
        reason = reason.__context__
    text = str(reason).split("\n")[0]
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
