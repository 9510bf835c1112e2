"""Registry auth: challenges, Docker's config and helpers, tokens, and secrecy."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from responses import matchers

from ocistore.errors import AuthError, NetworkError, OcistoreError, RegistryError
from ocistore.registry.auth import (
    Authenticator,
    Challenge,
    Credentials,
    load_docker_credentials,
    parse_challenge,
)
from tests.unit.conftest import FakeClock

HUB_CHALLENGE = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'
REALM = "https://auth.docker.io/token"
SCOPE = "repository:library/busybox:pull"
PASSWORD = "s3cr3t-PASSWORD-value"
TOKEN = "tok-SECRET-abcdef"


# --- WWW-Authenticate ----------------------------------------------------------------------------


def test_parse_docker_hub_challenge() -> None:
    assert parse_challenge(HUB_CHALLENGE) == Challenge(
        "bearer", {"realm": REALM, "service": "registry.docker.io"}
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://ghcr.io/token",service="ghcr.io",'
            'scope="repository:o/i:pull,push"',
            Challenge(
                "bearer",
                {
                    "realm": "https://ghcr.io/token",
                    "service": "ghcr.io",
                    "scope": "repository:o/i:pull,push",
                },
            ),
        ),
        (
            'Bearer realm="https://r/t", scope="repository:a:pull repository:b:pull",'
            ' error="insufficient_scope"',
            Challenge(
                "bearer",
                {
                    "realm": "https://r/t",
                    "scope": "repository:a:pull repository:b:pull",
                    "error": "insufficient_scope",
                },
            ),
        ),
        (
            r'Bearer realm="https://r/t",service="a \"quoted\" name",x="back\\slash"',
            Challenge(
                "bearer",
                {"realm": "https://r/t", "service": 'a "quoted" name', "x": "back\\slash"},
            ),
        ),
        (
            "Bearer realm=https://r/t,service=reg",
            Challenge("bearer", {"realm": "https://r/t", "service": "reg"}),
        ),
        ('Basic realm="Registry Realm"', Challenge("basic", {"realm": "Registry Realm"})),
        ("Basic", Challenge("basic", {})),
        ('BEARER Realm="https://r/t"', Challenge("bearer", {"realm": "https://r/t"})),
        ('  Bearer   realm = "https://r/t" ,  service="s"  ', None),
    ],
)
def test_parse_challenge_variants(header: str, expected: Challenge | None) -> None:
    challenge = parse_challenge(header)
    if expected is None:
        # Loose whitespace around '=' and ',' must still give the realm and service.
        assert challenge is not None and challenge.scheme == "bearer"
        assert challenge.params["realm"] == "https://r/t"
        assert challenge.params["service"] == "s"
    else:
        assert challenge == expected


@pytest.mark.parametrize("header", ["", "   "])
def test_parse_empty_challenge(header: str) -> None:
    assert parse_challenge(header) is None


def test_set_challenge_ignores_unknown_schemes() -> None:
    auth = _authenticator()
    auth.set_challenge('Negotiate realm="x"')
    auth.set_challenge(None)
    assert auth.challenge is None
    assert auth.headers(SCOPE) == {}


# --- Docker's config.json ------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _write_config(config_dir: Path, doc: dict[str, Any]) -> None:
    (config_dir / "config.json").write_text(json.dumps(doc))


def test_auths_base64_entry(isolated_env: Path) -> None:
    _write_config(isolated_env, {"auths": {"ghcr.io": {"auth": _b64(f"alice:{PASSWORD}")}}})
    assert load_docker_credentials("ghcr.io") == Credentials("alice", PASSWORD)
    # Not handed to any other registry, even one whose name starts the same way.
    assert load_docker_credentials("ghcr.io.evil.example") is None
    assert load_docker_credentials("docker.io") is None


def test_password_may_contain_colons(isolated_env: Path) -> None:
    _write_config(isolated_env, {"auths": {"ghcr.io": {"auth": _b64("alice:a:b:c")}}})
    assert load_docker_credentials("ghcr.io") == Credentials("alice", "a:b:c")


def test_docker_hub_legacy_key_is_used_for_docker_io(isolated_env: Path) -> None:
    _write_config(
        isolated_env,
        {
            "auths": {
                "ghcr.io": {"auth": _b64("someone:else")},
                "https://index.docker.io/v1/": {"auth": _b64(f"hubuser:{PASSWORD}")},
            }
        },
    )
    assert load_docker_credentials("docker.io") == Credentials("hubuser", PASSWORD)


@pytest.mark.parametrize(
    ("key", "registry"),
    [
        ("registry.example.com:5000", "registry.example.com:5000"),
        ("https://registry.example.com:5000", "registry.example.com:5000"),
        ("https://registry.example.com/v2/", "registry.example.com"),
        ("http://localhost:5000", "localhost:5000"),
        ("ghcr.io/some-org", "ghcr.io"),
    ],
)
def test_host_only_and_url_keys(isolated_env: Path, key: str, registry: str) -> None:
    _write_config(isolated_env, {"auths": {key: {"auth": _b64("u:p")}}})
    assert load_docker_credentials(registry) == Credentials("u", "p")
    # The port is part of the host: no match without it.
    assert load_docker_credentials("other.example.com") is None


def test_username_password_fields(isolated_env: Path) -> None:
    _write_config(isolated_env, {"auths": {"quay.io": {"username": "bob", "password": PASSWORD}}})
    assert load_docker_credentials("quay.io") == Credentials("bob", PASSWORD)


def test_identity_token(isolated_env: Path) -> None:
    _write_config(isolated_env, {"auths": {"myacr.example.io": {"identitytoken": TOKEN}}})
    assert load_docker_credentials("myacr.example.io") == Credentials("<token>", TOKEN)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"auths": []}',
        '{"auths": {"ghcr.io": "x"}}',
        '{"auths": {"ghcr.io": {"auth": "!!!not base64"}}}',
        '{"auths": {"ghcr.io": {"auth": "' + _b64("no-colon") + '"}}}',
        '{"auths": {"ghcr.io": {}}}',
    ],
)
def test_broken_or_empty_config_gives_no_credentials(isolated_env: Path, content: str) -> None:
    (isolated_env / "config.json").write_text(content)
    assert load_docker_credentials("ghcr.io") is None


def test_missing_config(isolated_env: Path) -> None:
    assert load_docker_credentials("ghcr.io") is None


def test_config_dir_defaults_to_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".docker").mkdir()
    _write_config(tmp_path / ".docker", {"auths": {"ghcr.io": {"auth": _b64("h:p")}}})
    assert load_docker_credentials("ghcr.io") == Credentials("h", "p")


def test_explicit_config_dir_wins(isolated_env: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    _write_config(isolated_env, {"auths": {"ghcr.io": {"auth": _b64("env:p")}}})
    _write_config(other, {"auths": {"ghcr.io": {"auth": _b64("arg:p")}}})
    assert load_docker_credentials("ghcr.io", str(other)) == Credentials("arg", "p")


# --- credential helpers --------------------------------------------------------------------------


def _install_helper(
    bin_dir: Path, name: str, log: Path, *, user: str, secret: str, fail: bool = False
) -> None:
    """A fake docker-credential-NAME: logs its argv and stdin, answers like a real helper."""
    script = bin_dir / f"docker-credential-{name}"
    body = f'#!/bin/sh\necho "$1 $(cat)" >> "{log}"\n' + (
        'echo "credentials not found in native keychain"; exit 1\n'
        if fail
        else f"printf '%s' '{json.dumps({'Username': user, 'Secret': secret})}'\n"
    )
    script.write_text(body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def helper_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bin_dir


def test_cred_helper_for_one_registry(isolated_env: Path, helper_bin: Path, tmp_path: Path) -> None:
    log = tmp_path / "helper.log"
    _install_helper(helper_bin, "fake", log, user="helperuser", secret=PASSWORD)
    _write_config(
        isolated_env,
        {
            "credHelpers": {"ghcr.io": "fake"},
            # The helper wins over a stale auths entry for the same host.
            "auths": {"ghcr.io": {"auth": _b64("stale:stale")}},
        },
    )
    assert load_docker_credentials("ghcr.io") == Credentials("helperuser", PASSWORD)
    assert log.read_text().split() == ["get", "ghcr.io"]


def test_creds_store_asks_with_docker_hubs_server_url(
    isolated_env: Path, helper_bin: Path, tmp_path: Path
) -> None:
    log = tmp_path / "helper.log"
    _install_helper(helper_bin, "store", log, user="hubuser", secret=PASSWORD)
    _write_config(isolated_env, {"credsStore": "store"})
    assert load_docker_credentials("docker.io") == Credentials("hubuser", PASSWORD)
    assert log.read_text().split() == ["get", "https://index.docker.io/v1/"]


def test_cred_helper_failure_or_absence_gives_none(
    isolated_env: Path, helper_bin: Path, tmp_path: Path
) -> None:
    log = tmp_path / "helper.log"
    _install_helper(helper_bin, "broken", log, user="", secret="", fail=True)
    _write_config(isolated_env, {"credHelpers": {"ghcr.io": "broken", "quay.io": "absent"}})
    assert load_docker_credentials("ghcr.io") is None
    assert log.read_text().split() == ["get", "ghcr.io"]
    assert load_docker_credentials("quay.io") is None


def test_cred_helper_with_empty_secret_gives_none(
    isolated_env: Path, helper_bin: Path, tmp_path: Path
) -> None:
    _install_helper(helper_bin, "empty", tmp_path / "log", user="u", secret="")
    _write_config(isolated_env, {"credsStore": "empty"})
    assert load_docker_credentials("ghcr.io") is None


# --- Credentials ---------------------------------------------------------------------------------


def test_credentials_repr_hides_the_password() -> None:
    creds = Credentials("alice", PASSWORD)
    for text in (repr(creds), str(creds), f"{creds}", repr([creds]), repr({"c": creds})):
        assert PASSWORD not in text
        assert "alice" in text


# --- tokens --------------------------------------------------------------------------------------


def _authenticator(
    credentials: Credentials | None = None,
    *,
    insecure: bool = False,
    clock: FakeClock | None = None,
    challenge: str | None = None,
) -> Authenticator:
    auth = Authenticator(
        "registry-1.docker.io",
        credentials,
        session=requests.Session(),
        insecure=insecure,
        timeout=(1.0, 1.0),
        clock=clock or FakeClock(),
    )
    if challenge:
        auth.set_challenge(challenge)
    return auth


class TokenServer:
    """Hands out tok-1, tok-2, ... and remembers each request."""

    def __init__(self, rsps: responses.RequestsMock, url: str = REALM, **doc: Any) -> None:
        self.requests: list[requests.PreparedRequest] = []
        self.doc = doc
        rsps.add_callback(responses.GET, url, callback=self._answer)

    def _answer(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        self.requests.append(request)
        body = {"token": f"tok-{len(self.requests)}", **self.doc}
        return 200, {"Content-Type": "application/json"}, json.dumps(body)


@responses.activate
def test_anonymous_token_fetch_sends_scope_and_service() -> None:
    responses.get(
        REALM,
        match=[matchers.query_param_matcher({"scope": SCOPE, "service": "registry.docker.io"})],
        json={"token": TOKEN, "expires_in": 300},
    )
    auth = _authenticator(challenge=HUB_CHALLENGE)
    assert auth.headers(SCOPE) == {"Authorization": f"Bearer {TOKEN}"}
    assert "Authorization" not in responses.calls[0].request.headers


@responses.activate
def test_token_fetch_with_credentials_uses_basic_auth_at_the_realm() -> None:
    responses.get(REALM, json={"token": TOKEN})
    auth = _authenticator(Credentials("alice", PASSWORD), challenge=HUB_CHALLENGE)
    auth.headers(SCOPE)
    sent = responses.calls[0].request.headers["Authorization"]
    assert sent == "Basic " + _b64(f"alice:{PASSWORD}")


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"token": "from-token"}, "from-token"),
        ({"access_token": "from-access-token"}, "from-access-token"),
        ({"token": "both-token", "access_token": "both-access"}, "both-token"),
        ({"token": "", "access_token": "fallback"}, "fallback"),
    ],
)
@responses.activate
def test_token_or_access_token(doc: dict[str, str], expected: str) -> None:
    responses.get(REALM, json=doc)
    auth = _authenticator(challenge=HUB_CHALLENGE)
    assert auth.headers(SCOPE)["Authorization"] == f"Bearer {expected}"


def test_expires_in_is_honoured_with_the_injected_clock() -> None:
    clock = FakeClock(1000.0)
    with responses.RequestsMock() as rsps:
        server = TokenServer(rsps, expires_in=300)
        auth = _authenticator(clock=clock, challenge=HUB_CHALLENGE)
        assert auth.headers(SCOPE)["Authorization"] == "Bearer tok-1"
        clock.advance(200)
        assert auth.headers(SCOPE)["Authorization"] == "Bearer tok-1"
        clock.advance(89)  # 289 s: still more than the 10 s safety margin left
        assert auth.headers(SCOPE)["Authorization"] == "Bearer tok-1"
        assert len(server.requests) == 1
        clock.advance(2)  # 291 s: inside the margin, so refresh before it runs out
        assert auth.headers(SCOPE)["Authorization"] == "Bearer tok-2"
        assert auth.headers(SCOPE)["Authorization"] == "Bearer tok-2"
        assert len(server.requests) == 2


def test_default_lifetime_when_expires_in_is_absent() -> None:
    clock = FakeClock(0.0)
    with responses.RequestsMock() as rsps:
        server = TokenServer(rsps)
        auth = _authenticator(clock=clock, challenge=HUB_CHALLENGE)
        auth.headers(SCOPE)
        clock.advance(49)
        auth.headers(SCOPE)
        assert len(server.requests) == 1
        clock.advance(2)  # 51 s: a 60 s token minus the 10 s margin
        assert auth.headers(SCOPE)["Authorization"] == "Bearer tok-2"
        assert len(server.requests) == 2


@pytest.mark.parametrize("expires_in", [0, -5, "300", None])
def test_nonsense_expires_in_falls_back_to_the_default(expires_in: Any) -> None:
    clock = FakeClock(0.0)
    with responses.RequestsMock() as rsps:
        server = TokenServer(rsps, expires_in=expires_in)
        auth = _authenticator(clock=clock, challenge=HUB_CHALLENGE)
        auth.headers(SCOPE)
        clock.advance(45)
        auth.headers(SCOPE)
        assert len(server.requests) == 1


def test_tokens_are_per_scope_and_can_be_invalidated() -> None:
    with responses.RequestsMock() as rsps:
        server = TokenServer(rsps, expires_in=300)
        auth = _authenticator(challenge=HUB_CHALLENGE)
        assert auth.headers(SCOPE)["Authorization"] == "Bearer tok-1"
        other = "repository:library/ubuntu:pull"
        assert auth.headers(other)["Authorization"] == "Bearer tok-2"
        assert auth.headers(SCOPE)["Authorization"] == "Bearer tok-1"
        auth.invalidate(SCOPE)
        assert auth.headers(SCOPE)["Authorization"] == "Bearer tok-3"
        assert str(server.requests[1].url).endswith(
            "scope=repository%3Alibrary%2Fubuntu%3Apull&service=registry.docker.io"
        )


def test_plain_http_realm_is_refused_for_a_secure_registry() -> None:
    with responses.RequestsMock() as rsps:  # any request at all would fail the test
        auth = _authenticator(
            Credentials("alice", PASSWORD),
            challenge='Bearer realm="http://auth.example.com/token",service="s"',
        )
        with pytest.raises(AuthError, match="plain-http realm") as info:
            auth.headers(SCOPE)
        assert "auth.example.com" in str(info.value)
        assert len(rsps.calls) == 0


def test_plain_http_realm_is_allowed_for_an_insecure_registry() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get("http://127.0.0.1:5001/token", json={"token": TOKEN})
        auth = _authenticator(insecure=True, challenge='Bearer realm="http://127.0.0.1:5001/token"')
        assert auth.headers(SCOPE)["Authorization"] == f"Bearer {TOKEN}"
        # No service in the challenge: none is sent.
        assert "service=" not in str(rsps.calls[0].request.url)


@pytest.mark.parametrize(
    "realm", ['realm="ftp://x/token"', 'realm="/relative/token"', 'realm=""', 'service="s"']
)
def test_unusable_realm(realm: str) -> None:
    auth = _authenticator(challenge=f"Bearer {realm}")
    with pytest.raises(AuthError, match="unusable token realm"):
        auth.headers(SCOPE)


def test_basic_challenge() -> None:
    auth = _authenticator(Credentials("alice", PASSWORD), challenge='Basic realm="Registry"')
    assert auth.headers(SCOPE) == {"Authorization": "Basic " + _b64(f"alice:{PASSWORD}")}
    anonymous = _authenticator(challenge='Basic realm="Registry"')
    with pytest.raises(AuthError, match="requires a login"):
        anonymous.headers(SCOPE)


# --- no secret in any error ----------------------------------------------------------------------


def _token_failure(kind: str, rsps: responses.RequestsMock) -> None:
    if kind == "401":
        rsps.get(REALM, status=401, body=f"bad password {PASSWORD}")
    elif kind == "403":
        rsps.get(REALM, status=403, json={"details": "denied"})
    elif kind == "500":
        rsps.get(REALM, status=500, body="oops")
    elif kind == "not-json":
        rsps.get(REALM, body=f"<html>{TOKEN}</html>")
    elif kind == "no-token":
        rsps.get(REALM, json={"tokne": TOKEN, "password": PASSWORD})
    elif kind == "connection":
        # Even if a transport error's text carried the secret, it must not be echoed.
        rsps.get(
            REALM,
            body=requests.ConnectionError(
                f"refused; Authorization: Basic {_b64('alice:' + PASSWORD)} {PASSWORD}"
            ),
        )
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("401", AuthError),
        ("403", AuthError),
        ("500", RegistryError),
        ("not-json", AuthError),
        ("no-token", AuthError),
        ("connection", NetworkError),
    ],
)
def test_no_auth_error_contains_the_password(kind: str, error: type[OcistoreError]) -> None:
    with responses.RequestsMock() as rsps:
        _token_failure(kind, rsps)
        auth = _authenticator(Credentials("alice", PASSWORD), challenge=HUB_CHALLENGE)
        with pytest.raises(error) as info:
            auth.headers(SCOPE)
    exc = info.value
    texts = [str(exc), repr(exc), exc.message, *map(str, exc.args)]
    for secret in (PASSWORD, _b64(f"alice:{PASSWORD}"), TOKEN):
        assert all(secret not in t for t in texts), (kind, texts)
    assert "registry-1.docker.io" in str(exc)
    # The original exception is not chained into tracebacks either.
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def test_refusal_message_says_whether_credentials_were_used() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(REALM, status=401)
        with pytest.raises(AuthError, match="anonymous access") as anon:
            _authenticator(challenge=HUB_CHALLENGE).headers(SCOPE)
        with pytest.raises(AuthError, match="the given credentials") as cred:
            _authenticator(Credentials("a", PASSWORD), challenge=HUB_CHALLENGE).headers(SCOPE)
    assert anon.value.exit_code == cred.value.exit_code == 4


@pytest.mark.parametrize(
    "challenge",
    [
        'Bearer realm="http://auth.example.com/token"',
        'Bearer realm="ftp://auth.example.com/token"',
        'Basic realm="r"',
    ],
)
def test_refusals_before_any_request_do_not_contain_secrets(challenge: str) -> None:
    creds = Credentials("alice", PASSWORD) if "Bearer" in challenge else None
    auth = _authenticator(creds, challenge=challenge)
    with pytest.raises(AuthError) as info:
        auth.headers(SCOPE)
    assert PASSWORD not in str(info.value)
    assert _b64(f"alice:{PASSWORD}") not in str(info.value)


def test_short_lived_tokens_are_kept_for_the_default_lifetime() -> None:
    # Docker's rule: a token valid for less than 60 s is treated as a 60 s one, so a 5 s
    # token is not fetched again for every single request.
    clock = FakeClock(0.0)
    with responses.RequestsMock() as rsps:
        server = TokenServer(rsps, expires_in=5)
        auth = _authenticator(clock=clock, challenge=HUB_CHALLENGE)
        auth.headers(SCOPE)
        clock.advance(30)
        auth.headers(SCOPE)
        assert len(server.requests) == 1
        clock.advance(21)
        assert auth.headers(SCOPE)["Authorization"] == "Bearer tok-2"


def test_creds_store_wins_over_a_stale_auths_entry(
    isolated_env: Path, helper_bin: Path, tmp_path: Path
) -> None:
    _install_helper(helper_bin, "store", tmp_path / "log", user="storeuser", secret=PASSWORD)
    _write_config(
        isolated_env,
        {"credsStore": "store", "auths": {"ghcr.io": {"auth": _b64("stale:stale")}}},
    )
    assert load_docker_credentials("ghcr.io") == Credentials("storeuser", PASSWORD)
