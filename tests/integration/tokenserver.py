"""A small Docker-Hub-like token server for distribution's ``auth: token``.

``GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]`` answers
``{"token", "access_token", "expires_in", "issued_at"}`` with an ES256 JWT.

How distribution 2.8 checks the JWT (registry/auth/token/token.go):

* header ``x5c``: the signing certificate chain, verified against the
  certificates in the registry's ``rootcertbundle``; the leaf's public key
  checks the signature (libtrust: ES256 = raw 32-byte r || 32-byte s);
* ``iss`` must equal the configured ``issuer`` and ``aud`` (a string in 2.8,
  not a list) the configured ``service``;
* ``exp`` and ``nbf`` are checked with a fixed 60-second leeway, so a token
  is only rejected once it is more than 60 s past ``exp``;
* ``access`` lists ``{type, name, actions}`` granted.

Policy: anonymous requests get ``pull`` only; a request with Basic
credentials of a known user gets every action it asks for (``pull``, ``push``,
``delete``, ``*``) and ``registry:catalog:*``; wrong credentials get 401.
Every request is recorded (with whether it carried an Authorization header)
so tests can count token fetches and check where credentials were sent.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

LEEWAY = 60  # distribution's token.Leeway


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, without verifying it."""
    header, claims, _sig = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    time: float
    method: str
    path: str
    query: dict[str, list[str]]
    service: str | None
    scopes: tuple[str, ...]
    has_authorization: bool  # any Authorization header at all
    authorization_scheme: str | None  # "Basic", "Bearer", ...
    username: str | None  # from valid-looking Basic credentials
    authenticated: bool  # Basic credentials of a known user
    status: int
    granted: tuple[dict[str, Any], ...] = ()
    token: str | None = field(default=None, repr=False)


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``repository:name:pull,push`` -> (type, name, actions); names may hold ':'."""
    rtype, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not rtype or not name:
        return None
    return rtype, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Token server on 127.0.0.1 in a daemon thread. Thread-safe counters/records."""

    def __init__(
        self,
        workdir: Path,
        *,
        service: str = "ocistore-test-registry",
        issuer: str = "ocistore-test-token-server",
        users: dict[str, str] | None = None,
        expires_in: int = 300,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.service = service
        self.issuer = issuer
        self.users = dict(users or {"pusher": "push-secret"})
        self.default_expires_in = expires_in
        self.expires_in = expires_in
        self.anonymous_pull = True  # set False to require credentials for pulls too
        self.fail_status: int | None = None  # answer every request with this status
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._issued = 0
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._self_signed_cert()
        self.cert_path = workdir / "token-signer.crt"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------

    def start(self) -> TokenServer:
        server = self

        class Handler(_Handler):
            token_server = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="ocistore-test-token-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "token server not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    # -- records -------------------------------------------------------

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return self._issued

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        """Forget recorded requests, zero the counter, restore default settings."""
        with self._lock:
            self._requests.clear()
            self._issued = 0
            self.expires_in = self.default_expires_in
            self.anonymous_pull = True
            self.fail_status = None

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self._requests.append(req)
            if req.token is not None:
                self._issued += 1

    # -- tokens --------------------------------------------------------

    def _self_signed_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ocistore test token signer")])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    def make_token(
        self,
        access: list[dict[str, Any]],
        *,
        subject: str = "",
        expires_in: int | None = None,
        issued_at: float | None = None,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> str:
        """Sign a JWT the registry accepts (or, with odd arguments, rejects).

        ``issued_at`` in the past makes an expired token: the registry
        rejects it once ``now > exp + 60 s``.
        """
        now = int(issued_at if issued_at is not None else time.time())
        lifetime = self.expires_in if expires_in is None else expires_in
        header = {"typ": "JWT", "alg": "ES256", "x5c": self._x5c}
        claims = {
            "iss": issuer if issuer is not None else self.issuer,
            "sub": subject,
            "aud": audience if audience is not None else self.service,
            "exp": now + lifetime,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def grant(self, scopes: list[str], authenticated: bool) -> list[dict[str, Any]]:
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            rtype, name, actions = parsed
            if authenticated:
                allowed = [a for a in actions if a in ("pull", "push", "delete", "*")]
            elif rtype == "repository" and self.anonymous_pull:
                allowed = [a for a in actions if a == "pull"]
            else:
                allowed = []
            if allowed:
                access.append({"type": rtype, "name": name, "actions": allowed})
        return access


class _Handler(BaseHTTPRequestHandler):
    token_server: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in TokenServer.requests instead

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        self._answer("GET", url.path, urllib.parse.parse_qs(url.query))

    def do_POST(self) -> None:
        # OAuth2-style form (docker's "identity token" flow): grant_type=password
        # with username/password, or any form when credentials come as Basic.
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        query = urllib.parse.parse_qs(url.query)
        for k, v in form.items():
            query.setdefault(k, []).extend(v)
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        query["scope"] = scopes
        self._answer("POST", url.path, query)

    def _answer(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        ts = self.token_server
        auth = self.headers.get("Authorization")
        scheme = auth.split(" ", 1)[0] if auth else None
        username: str | None = None
        password: str | None = None
        if scheme and scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(auth.split(" ", 1)[1]).decode()  # type: ignore[union-attr]
                username, _, password = decoded.partition(":")
            except Exception:
                username = None
        elif method == "POST" and query.get("grant_type") == ["password"]:
            username = next(iter(query.get("username", [])), None)
            password = next(iter(query.get("password", [])), None)
        authenticated = username is not None and ts.users.get(username) == password
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        service = next(iter(query.get("service", [])), None)

        def record(status: int, granted: list[dict[str, Any]], token: str | None) -> None:
            ts._record(
                TokenRequest(
                    time=time.time(),
                    method=method,
                    path=path,
                    query=query,
                    service=service,
                    scopes=tuple(scopes),
                    has_authorization=auth is not None,
                    authorization_scheme=scheme,
                    username=username,
                    authenticated=authenticated,
                    status=status,
                    granted=tuple(granted),
                    token=token,
                )
            )

        if path != "/token":
            record(404, [], None)
            self._send_json(404, {"error": "not found"}, {})
            return
        if ts.fail_status is not None:
            record(ts.fail_status, [], None)
            self._send_json(ts.fail_status, {"error": "configured failure"}, {})
            return
        if username is not None and not authenticated:
            record(401, [], None)
            self._send_json(
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "incorrect username or password"}]},
                {"WWW-Authenticate": f'Basic realm="{ts.realm}"'},
            )
            return
        if service is not None and service != ts.service:
            record(400, [], None)
            self._send_json(400, {"error": f"unknown service {service!r}"}, {})
            return
        granted = ts.grant(scopes, authenticated)
        expires_in = ts.expires_in
        now = time.time()
        token = ts.make_token(
            granted,
            subject=(username or "") if authenticated else "",
            expires_in=expires_in,
            issued_at=now,
        )
        record(200, granted, token)
        issued_at = dt.datetime.fromtimestamp(int(now), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": issued_at,
        }
        if method == "POST":
            body["scope"] = " ".join(scopes)
        self._send_json(200, body, {})
