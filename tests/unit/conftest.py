"""Shared helpers for the unit tests: the recorded registry fixtures and a sleep recorder.

The recorded data lives beside the checkout in ``../shared/fixtures`` (read-only, never
copied into the project); tests that need it are skipped with a clear reason if it is absent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

FIXTURES_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
BUSYBOX_DIR = FIXTURES_DIR / "busybox-1.38.0"
UBUNTU_JSON = FIXTURES_DIR / "ubuntu-22.04.json"


def _busybox_dirs() -> list[Path]:
    if not BUSYBOX_DIR.is_dir():
        return []
    return sorted(p.parent for p in BUSYBOX_DIR.glob("*/*/index.json"))


# Collected at import time so tests can be parametrised per platform; an empty list makes
# the parametrised tests skip (pytest reports "got empty parameter set").
BUSYBOX_PLATFORM_DIRS = _busybox_dirs()
BUSYBOX_IDS = [f"{p.parent.name}-{p.name}" for p in BUSYBOX_PLATFORM_DIRS]


@dataclass(frozen=True)
class BusyboxImage:
    """One platform of the busybox fixture, as a registry would serve it."""

    name: str
    index: bytes
    manifest: bytes
    config: bytes

    @property
    def index_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.index)
        return doc

    @property
    def manifest_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.manifest)
        return doc

    @property
    def config_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.config)
        return doc


def load_busybox(directory: Path) -> BusyboxImage:
    return BusyboxImage(
        name=f"{directory.parent.name}/{directory.name}",
        index=(directory / "index.json").read_bytes(),
        manifest=(directory / "image-manifest.json").read_bytes(),
        config=(directory / "image-config.json").read_bytes(),
    )


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"recorded registry fixtures not found at {FIXTURES_DIR}")
    return FIXTURES_DIR


@pytest.fixture
def busybox_dirs(fixtures_dir: Path) -> list[Path]:
    if not BUSYBOX_PLATFORM_DIRS:
        pytest.skip(f"busybox fixtures not found under {BUSYBOX_DIR}")
    return BUSYBOX_PLATFORM_DIRS


@pytest.fixture
def busybox_musl_amd64(fixtures_dir: Path) -> BusyboxImage:
    directory = BUSYBOX_DIR / "musl" / "amd64"
    if not (directory / "index.json").is_file():
        pytest.skip(f"busybox musl/amd64 fixture not found at {directory}")
    return load_busybox(directory)


@pytest.fixture
def ubuntu_listing(fixtures_dir: Path) -> dict[str, Any]:
    if not UBUNTU_JSON.is_file():
        pytest.skip(f"ubuntu fixture not found at {UBUNTU_JSON}")
    doc: dict[str, Any] = json.loads(UBUNTU_JSON.read_bytes())
    return doc


class SleepRecorder:
    """Stands in for ``time.sleep``: records each requested delay and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No real Docker config, netrc or proxy can leak into a test."""
    config = tmp_path / "docker-config"
    config.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    yield config
