"""Integration-test fixtures: real ``docker-registry`` processes on 127.0.0.1,
filled by skopeo with images that umoci/GNU tar/dpkg-deb built (never ocistore).

Session fixtures (see README.md in this directory):

* ``test_images`` -> images.BuiltImages: the OCI layouts (``multi``,
  ``multiarch``) and skopeo ``dir:`` conversions (``multi_v2s2_dir``,
  ``multi_zstd_dir``), private copies for this session.
* ``registry_plain``, ``registry_basic``, ``registry_token``, ``registry_tls``
  -> registryd.Registry, each already holding ``.images``
  (images.StandardImages: ``multi``, ``multi_v2s2``, ``multi_zstd``,
  ``multiarch``, each an images.PushedImage).
* ``registry_factory`` -> start more (empty) registries: ``.start("plain")``.

Function fixtures: ``token_server`` (the token registry's TokenServer, records
and settings reset before and after the test) and ``any_registry``
(parametrized over the four registries).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .images import BuiltImages, ImageBuildError, MissingDebsError, build_images, find_debs
from .registryd import (
    KINDS,
    Registry,
    RegistryFactory,
    RegistryStartError,
    push_standard_images,
)
from .tokenserver import TokenServer

# tool -> Debian package
REQUIRED_TOOLS = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "dpkg-deb": "dpkg",
    "tar": "tar",
}

_HERE = Path(__file__).resolve().parent
_TIMINGS: dict[str, float] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _TIMINGS:
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in _TIMINGS.items())
        terminalreporter.write_line(f"integration fixture setup: {parts}")


@pytest.fixture(scope="session")
def integration_tools() -> None:
    missing = [
        f"{tool} (apt-get install {pkg})"
        for tool, pkg in REQUIRED_TOOLS.items()
        if shutil.which(tool) is None
    ]
    if missing:
        pytest.fail("integration tests need: " + ", ".join(missing), pytrace=False)


@pytest.fixture(scope="session")
def test_debs(integration_tools: None) -> dict[str, Path]:
    try:
        return find_debs()
    except MissingDebsError as e:
        message = str(e)
    pytest.fail(message, pytrace=False)  # outside except: no chained traceback


@pytest.fixture(scope="session")
def test_images(
    test_debs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> BuiltImages:
    try:
        built = build_images(tmp_path_factory.mktemp("images"), test_debs)
    except ImageBuildError as e:
        message = f"building the test images failed: {e}"
    else:
        message = ""
    if message:
        pytest.fail(message, pytrace=False)
    _TIMINGS["images" + (" (cached)" if built.from_cache else " (built)")] = built.build_seconds
    return built


@pytest.fixture(scope="session")
def registry_factory(
    integration_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryFactory]:
    factory = RegistryFactory(tmp_path_factory.mktemp("registries"))
    yield factory
    factory.stop_all()


def _filled_registry(factory: RegistryFactory, images: BuiltImages, kind: str) -> Registry:
    t0 = time.monotonic()
    try:
        reg = factory.start(kind)
    except RegistryStartError as e:
        message = str(e)
    else:
        message = ""
    if message:
        pytest.fail(message, pytrace=False)
    t1 = time.monotonic()
    try:
        reg.standard_images = push_standard_images(reg, images)
    except ImageBuildError as e:
        message = f"pushing the test images to the {kind} registry failed: {e}"
    else:
        message = ""
    if message:
        pytest.fail(message, pytrace=False)
    _TIMINGS[f"{kind} start"] = t1 - t0
    _TIMINGS[f"{kind} push"] = time.monotonic() - t1
    if reg.token_server is not None:
        reg.token_server.reset()  # tests see only their own token requests
    return reg


@pytest.fixture(scope="session")
def registry_plain(registry_factory: RegistryFactory, test_images: BuiltImages) -> Registry:
    """HTTP, no auth."""
    return _filled_registry(registry_factory, test_images, "plain")


@pytest.fixture(scope="session")
def registry_basic(registry_factory: RegistryFactory, test_images: BuiltImages) -> Registry:
    """HTTP with htpasswd basic auth: ``username``/``password``."""
    return _filled_registry(registry_factory, test_images, "basic")


@pytest.fixture(scope="session")
def registry_token(registry_factory: RegistryFactory, test_images: BuiltImages) -> Registry:
    """HTTP with Bearer tokens from ``token_server``; anonymous pull, push for
    ``username``/``password`` (sent as Basic to the token realm only)."""
    return _filled_registry(registry_factory, test_images, "token")


@pytest.fixture(scope="session")
def registry_tls(registry_factory: RegistryFactory, test_images: BuiltImages) -> Registry:
    """HTTPS, certificate from a test CA: ``ca_file``, ``certs_d``."""
    return _filled_registry(registry_factory, test_images, "tls")


@pytest.fixture
def token_server(registry_token: Registry) -> Iterator[TokenServer]:
    """The token registry's token server, reset (records, expires_in) around the test."""
    ts = registry_token.token_server
    assert ts is not None
    ts.reset()
    yield ts
    ts.reset()


@pytest.fixture(params=KINDS)
def any_registry(request: pytest.FixtureRequest) -> Registry:
    reg = request.getfixturevalue(f"registry_{request.param}")
    assert isinstance(reg, Registry)
    return reg
