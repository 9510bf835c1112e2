"""Registry authentication the way Docker does it.

A ``/v2/`` ping or any 401 gives a ``WWW-Authenticate`` challenge: ``Basic`` means send the
credentials with every request; ``Bearer realm=..,service=..,scope=..`` means trade them (or
nothing, anonymously) at the realm for a short-lived token scoped to the repository. Tokens
expire (Docker Hub's after a few minutes), so each is kept with its expiry and refreshed
before it runs out or when the registry says 401 again. Credentials come from
``$DOCKER_CONFIG/config.json`` (``~/.docker/config.json``), including credential helpers.
Nothing here ever puts a credential or token into an exception message.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import requests

from ocistore.errors import AuthError, NetworkError, RegistryError

_DOCKER_HUB_KEYS = (
    "https://index.docker.io/v1/",
    "index.docker.io",
    "docker.io",
    "registry-1.docker.io",
    "https://registry-1.docker.io",
)
# Refresh a little before expiry: the token must still be valid when the request lands.
_EXPIRY_MARGIN = 10.0
_DEFAULT_TOKEN_LIFETIME = 60.0  # the distribution spec's default when expires_in is absent


class Credentials(NamedTuple):
    username: str
    password: str

    def __repr__(self) -> str:  # never show the secret, even in a debugger or traceback
        return f"Credentials(username={self.username!r}, password=***)"


class Challenge(NamedTuple):
    scheme: str  # lower-case: "basic" or "bearer"
    params: dict[str, str]


_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


def parse_challenge(header: str) -> Challenge | None:
    """Parse the first challenge of a ``WWW-Authenticate`` header."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else (m.group(3) or "")
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


def _config_dir() -> str:
    return os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")


def _host_of(key: str) -> str:
    if "://" in key:
        return urlsplit(key).netloc
    return key.split("/", 1)[0]


def load_docker_credentials(registry: str, config_dir: str | None = None) -> Credentials | None:
    """Credentials for ``registry`` (as users name it: ``docker.io``, ``ghcr.io``) from the
    Docker client's config, or None. A broken config file is ignored like Docker ignores a
    missing one, since anonymous access may still work."""
    path = os.path.join(config_dir or _config_dir(), "config.json")
    try:
        with open(path, "rb") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    keys = _DOCKER_HUB_KEYS if registry == "docker.io" else (registry,)
    helpers = config.get("credHelpers") or {}
    for key in keys:
        helper = helpers.get(key) if isinstance(helpers, dict) else None
        if isinstance(helper, str) and helper:
            return _from_helper(helper, key)
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        # With a store configured, Docker keeps secrets there and "auths" only names hosts.
        creds = _from_helper(store, keys[0])
        if creds is not None:
            return creds
    auths = config.get("auths") or {}
    if isinstance(auths, dict):
        for key, entry in auths.items():
            if key in keys or _host_of(key) in keys:
                creds = _from_auth_entry(entry)
                if creds:
                    return creds
    return None


def _from_auth_entry(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"])).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return Credentials(user, password) if sep else None
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]))
    if entry.get("identitytoken"):
        # An identity token is a refresh token; Docker sends it with this sentinel user.
        return Credentials("<token>", str(entry["identitytoken"]))
    return None


def _from_helper(helper: str, server: str) -> Credentials | None:
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        return None
    import subprocess  # only here: most pulls have no credential helper (2 ms at start-up)

    try:
        out = subprocess.run(
            [exe, "get"], input=server.encode(), capture_output=True, timeout=30, check=True
        ).stdout
        doc = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    user, secret = doc.get("Username"), doc.get("Secret")
    if isinstance(user, str) and isinstance(secret, str) and secret:
        return Credentials(user, secret)
    return None


class _Token(NamedTuple):
    value: str
    expires_at: float


class Authenticator:
    """Holds the auth state of one registry host; safe to share between threads."""

    def __init__(
        self,
        registry: str,
        credentials: Credentials | None,
        *,
        session: requests.Session,
        insecure: bool,
        timeout: tuple[float, float],
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[str, dict[str, str], tuple[str, str] | None], requests.Response]
        | None = None,
    ) -> None:
        self.registry = registry
        self.credentials = credentials
        self._session = session
        self._insecure = insecure
        self._timeout = timeout
        self._clock = clock
        self._fetch = fetch or self._plain_fetch
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[str, _Token] = {}

    @property
    def challenge(self) -> Challenge | None:
        return self._challenge

    def set_challenge(self, header: str | None) -> None:
        challenge = parse_challenge(header or "")
        if challenge is not None and challenge.scheme in ("basic", "bearer"):
            with self._lock:
                self._challenge = challenge

    def headers(self, scope: str) -> dict[str, str]:
        """Authorization header for a request needing ``scope`` (empty if none is needed)."""
        challenge = self._challenge
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            if self.credentials is None:
                raise AuthError(f"{self.registry} requires a login (basic auth)")
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {"Authorization": "Bearer " + self._token(scope).value}

    def invalidate(self, scope: str) -> None:
        with self._lock:
            self._tokens.pop(scope, None)

    def _token(self, scope: str) -> _Token:
        with self._lock:
            token = self._tokens.get(scope)
            if token is not None and token.expires_at - _EXPIRY_MARGIN > self._clock():
                return token
            token = self._fetch_token(scope)
            self._tokens[scope] = token
            return token

    def _fetch_token(self, scope: str) -> _Token:
        assert self._challenge is not None
        params = self._challenge.params
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AuthError(f"{self.registry} sent an unusable token realm {realm!r}")
        if parts.scheme != "https" and not self._insecure:
            raise AuthError(
                f"{self.registry} asks for credentials to be sent to a plain-http realm "
                f"({parts.netloc}); refusing"
            )
        query = {"scope": scope}
        if "service" in params:
            query["service"] = params["service"]
        auth = None
        if self.credentials is not None:
            auth = (self.credentials.username, self.credentials.password)
        started = self._clock()
        resp = self._fetch(realm, query, auth)
        resp.close()
        if resp.status_code in (401, 403):
            who = "the given credentials" if self.credentials else "anonymous access"
            raise AuthError(
                f"{self.registry} token service refused {who} (HTTP {resp.status_code})"
            )
        if resp.status_code == 429 or resp.status_code >= 500:
            raise RegistryError(
                f"the token service of {self.registry} at {parts.netloc} answered HTTP "
                f"{resp.status_code}",
                status=resp.status_code,
            )
        if resp.status_code != 200:
            raise AuthError(f"{self.registry} token service answered HTTP {resp.status_code}")
        try:
            doc = resp.json()
        except ValueError:
            raise AuthError(f"{self.registry} token service sent no JSON") from None
        value = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value:
            raise AuthError(f"{self.registry} token service sent no token")
        lifetime = doc.get("expires_in")
        if not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = _DEFAULT_TOKEN_LIFETIME
        # Like Docker, treat anything shorter than the default as the default: otherwise
        # a token shorter than the refresh margin would be fetched again for every request.
        lifetime = max(float(lifetime), _DEFAULT_TOKEN_LIFETIME)
        return _Token(value, started + lifetime)

    def _plain_fetch(
        self, url: str, params: dict[str, str], auth: tuple[str, str] | None
    ) -> requests.Response:
        try:
            return self._session.get(
                url, params=params, auth=auth, timeout=self._timeout, allow_redirects=True
            )
        except requests.RequestException as exc:
            raise NetworkError(
                f"cannot reach the token service of {self.registry} at {urlsplit(url).netloc}: "
                f"{type(exc).__name__}"
            ) from None
