"""How to reach registries: options and the insecure-host rule. No I/O and no HTTP library,
so that commands which never talk to a registry do not pay for importing one."""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_CERTS_DIR = "/etc/docker/certs.d"
# (connect, read): read is per socket read, not for the whole body, so big blobs are fine.
DEFAULT_TIMEOUT = (15.0, 60.0)


class TransportOptions(NamedTuple):
    insecure_registries: frozenset[str] = frozenset()
    certs_dir: str = DEFAULT_CERTS_DIR
    timeout: tuple[float, float] = DEFAULT_TIMEOUT
    user_agent: str = "ocistore/0.1"


def is_loopback(host: str) -> bool:
    name = host
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    import ipaddress  # here: only talking to a registry needs it

    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_insecure(host: str, options: TransportOptions) -> bool:
    return is_loopback(host) or host in options.insecure_registries
