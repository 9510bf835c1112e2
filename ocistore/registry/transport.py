"""HTTP sessions per registry host: scheme, TLS trust, proxies and timeouts.

Loopback hosts and those the caller names insecure may use plain HTTP, or HTTPS without
verification, as with Docker (the client probes which); every other host is HTTPS only.
HTTPS trusts the system CAs plus ``CERTS_DIR/HOST[:PORT]/*.crt`` (Docker's
``/etc/docker/certs.d`` layout), with an optional client certificate pair from the same
folder. Proxies come from the environment (requests' ``trust_env``).
"""

from __future__ import annotations

import glob
import os
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from ocistore.registry.options import (
    DEFAULT_CERTS_DIR,
    DEFAULT_TIMEOUT,
    TransportOptions,
    is_insecure,
    is_loopback,
)

__all__ = [
    "DEFAULT_CERTS_DIR",
    "DEFAULT_TIMEOUT",
    "TransportOptions",
    "is_insecure",
    "is_loopback",
    "make_session",
    "refuses_tls",
]


class _TrustAdapter(HTTPAdapter):
    """An adapter whose TLS context trusts extra CA files as well as the system's."""

    def __init__(self, ca_files: list[str]) -> None:
        self._context = ssl.create_default_context()
        for path in ca_files:
            self._context.load_verify_locations(cafile=path)
        super().__init__(pool_connections=4, pool_maxsize=16)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def build_connection_pool_key_attributes(
        self, request: Any, verify: Any, cert: Any = None
    ) -> tuple[Any, Any]:
        # requests >= 2.32 builds pools from these; without our context it would trust
        # certifi alone. urllib3 adds any ca_certs it is given to our context, not instead.
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        pool_kwargs.pop("ca_certs", None)
        pool_kwargs.pop("ca_cert_dir", None)
        pool_kwargs["ssl_context"] = self._context
        return host_params, pool_kwargs


def make_session(host: str, options: TransportOptions) -> tuple[requests.Session, str]:
    """A session for ``host`` and the base URL to start with (HTTPS; the client may fall
    back for an insecure host)."""
    session = requests.Session()
    session.headers["User-Agent"] = options.user_agent
    scheme = "https"
    host_dir = os.path.join(options.certs_dir, host)
    ca_files = sorted(glob.glob(os.path.join(host_dir, "*.crt")))
    if ca_files:
        session.mount(f"https://{host}", _TrustAdapter(ca_files))
    cert = os.path.join(host_dir, "client.cert")
    key = os.path.join(host_dir, "client.key")
    if os.path.exists(cert) and os.path.exists(key):
        session.cert = (cert, key)
    return session, f"{scheme}://{host}"


def refuses_tls(host: str, timeout: tuple[float, float]) -> bool:
    """True when ``host`` answers a TLS handshake with something that is not TLS: a
    plain-HTTP registry. Asked directly (only when no proxy is configured for it) with a
    bare context, so telling a plain-HTTP registry apart costs no CA bundle load. False
    whenever it cannot tell (no connection, a proxy in the way, a handshake that worked):
    the caller then probes with a real HTTPS request."""
    url = f"https://{host}/v2/"
    if requests.utils.get_environ_proxies(url):
        return False
    parts = urlsplit(url)
    if parts.hostname is None:
        return False
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a probe: nothing is sent, nothing trusted
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout[0]) as sock:
            sock.settimeout(timeout[1])
            with context.wrap_socket(sock):
                return False
    except ssl.SSLError:
        return True
    except OSError:
        return False
