"""Platforms: parsing, normalisation, and choosing from real indexes (busybox, ubuntu)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ocistore.errors import InvalidPlatformError
from ocistore.model import Index, parse_manifest
from ocistore.platform import Platform, choose


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/x86-64", "linux/amd64"),
        ("Linux/AMD64", "linux/amd64"),
        (" linux/amd64 ", "linux/amd64"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/arm64/8", "linux/arm64"),
        ("linux/aarch64/v8", "linux/arm64"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/armhf", "linux/arm/v7"),
        ("linux/arm/6", "linux/arm/v6"),
        ("linux/arm/v5", "linux/arm/v5"),
        ("linux/i386", "linux/386"),
        ("linux/i686", "linux/386"),
        ("linux/ppc64le", "linux/ppc64le"),
        ("windows/amd64", "windows/amd64"),
    ],
)
def test_parse_normalises(text: str, expected: str) -> None:
    assert str(Platform.parse(text)) == expected


def test_arm64_v8_equals_arm64_and_arm_defaults_to_v7() -> None:
    assert Platform.parse("linux/arm64/v8") == Platform.parse("linux/arm64")
    assert Platform.parse("linux/arm64") == Platform("linux", "arm64", "")
    assert Platform.parse("linux/arm") == Platform.parse("linux/arm/v7")
    assert Platform.parse("linux/arm") == Platform("linux", "arm", "v7")
    assert Platform.parse("linux/arm/v6") != Platform.parse("linux/arm")


@pytest.mark.parametrize("text", ["", "linux", "linux/", "/amd64", "linux//v7", "a/b/c/d"])
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidPlatformError, match="expected OS/ARCH") as info:
        Platform.parse(text)
    assert repr(text) in str(info.value)
    assert info.value.exit_code == 2


def test_from_descriptor_normalises_and_tolerates_missing_fields() -> None:
    assert Platform.from_descriptor(
        {"os": "linux", "architecture": "arm64", "variant": "v8"}
    ) == Platform("linux", "arm64")
    assert Platform.from_descriptor({"os": "linux", "architecture": "arm"}) == Platform(
        "linux", "arm", "v7"
    )
    assert Platform.from_descriptor(
        {"os": "linux", "architecture": "amd64", "variant": None}
    ) == Platform("linux", "amd64")
    assert Platform.from_descriptor({}) == Platform("", "")


@pytest.mark.parametrize(
    ("system", "machine", "expected"),
    [
        ("Linux", "x86_64", "linux/amd64"),
        ("Linux", "aarch64", "linux/arm64"),
        ("Linux", "armv7l", "linux/arm/v7"),
        ("Linux", "armv6l", "linux/arm/v6"),
        ("Linux", "s390x", "linux/s390x"),
        ("", "x86_64", "linux/amd64"),
    ],
)
def test_host_platform(
    monkeypatch: pytest.MonkeyPatch, system: str, machine: str, expected: str
) -> None:
    real = os.uname()
    fake = os.uname_result((system, real.nodename, real.release, real.version, machine))
    monkeypatch.setattr("ocistore.platform.os.uname", lambda: fake)
    assert str(Platform.host()) == expected


# --- choose() against the busybox fixture set ----------------------------------------------------


def _busybox_candidates(dirs: list[Path]) -> tuple[list[str], list[Platform]]:
    """Every per-platform entry of the busybox fixture, through the real index parser."""
    names: list[str] = []
    platforms: list[Platform] = []
    for directory in dirs:
        index = parse_manifest((directory / "index.json").read_bytes())
        assert isinstance(index, Index)
        for entry in index.manifests:
            assert entry.platform is not None
            names.append(f"{directory.parent.name}/{directory.name}")
            platforms.append(entry.platform)
    return names, platforms


def test_busybox_candidate_set_is_what_we_expect(busybox_dirs: list[Path]) -> None:
    names, platforms = _busybox_candidates(busybox_dirs)
    assert len(platforms) == 22
    assert {str(p) for p in platforms} == {
        "linux/amd64",
        "linux/arm/v5",
        "linux/arm/v6",
        "linux/arm/v7",
        "linux/arm64",  # the index says arm64/v8
        "linux/386",
        "linux/ppc64le",
        "linux/riscv64",
        "linux/s390x",
    }
    assert "musl/arm32v6" in names


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ("linux/amd64", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/arm64", "linux/arm64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/arm/v7", "linux/arm/v7"),
        ("linux/arm/v6", "linux/arm/v6"),
        ("linux/arm/v5", "linux/arm/v5"),
        ("linux/386", "linux/386"),
        ("linux/ppc64le", "linux/ppc64le"),
        ("linux/riscv64", "linux/riscv64"),
        ("linux/s390x", "linux/s390x"),
        ("linux/mips64le", None),
        ("windows/amd64", None),
        ("linux/arm/v4", None),
    ],
)
def test_choose_from_all_busybox_platforms(
    busybox_dirs: list[Path], wanted: str, expected: str | None
) -> None:
    _, platforms = _busybox_candidates(busybox_dirs)
    chosen = choose(Platform.parse(wanted), platforms)
    if expected is None:
        assert chosen is None
    else:
        assert chosen is not None
        assert str(platforms[chosen]) == expected
        # An exact match is the first one in the list.
        assert chosen == [str(p) for p in platforms].index(expected)


def test_choose_within_one_busybox_variant(busybox_dirs: list[Path]) -> None:
    by_variant: dict[str, list[Platform]] = {}
    for directory in busybox_dirs:
        _, platforms = _busybox_candidates([directory])
        by_variant.setdefault(directory.parent.name, []).extend(platforms)
    musl, glibc = by_variant["musl"], by_variant["glibc"]
    # musl has arm v6 and v7; a v5 CPU can run neither.
    assert choose(Platform.parse("linux/arm/v5"), musl) is None
    # glibc has v5 and v7 but no v6: a v6 CPU falls back to v5.
    chosen = choose(Platform.parse("linux/arm/v6"), glibc)
    assert chosen is not None and glibc[chosen] == Platform("linux", "arm", "v5")


def test_arm_v7_falls_back_to_the_newest_older_variant(busybox_dirs: list[Path]) -> None:
    _, platforms = _busybox_candidates(busybox_dirs)
    without_v7 = [p for p in platforms if p != Platform("linux", "arm", "v7")]
    chosen = choose(Platform.parse("linux/arm/v7"), without_v7)
    assert chosen is not None and without_v7[chosen].variant == "v6"
    only_v5 = [p for p in without_v7 if p.variant != "v6"]
    chosen = choose(Platform.parse("linux/arm"), only_v5)
    assert chosen is not None and only_v5[chosen].variant == "v5"


def test_arm_fallback_never_picks_a_newer_variant() -> None:
    candidates = [Platform("linux", "arm", "v7"), Platform("linux", "arm", "v8")]
    assert choose(Platform.parse("linux/arm/v6"), candidates) is None
    candidates = [Platform("linux", "arm", "v5"), Platform("linux", "arm", "v6")]
    assert choose(Platform.parse("linux/arm/v7"), candidates) == 1
    # Order does not matter for the fallback: the newest older variant wins.
    assert choose(Platform.parse("linux/arm/v7"), list(reversed(candidates))) == 0


def test_fallback_is_only_for_32_bit_arm() -> None:
    # amd64 has no variant ladder here: an amd64/v3 image is not picked for plain amd64.
    assert choose(Platform.parse("linux/amd64"), [Platform("linux", "amd64", "v3")]) is None
    assert choose(Platform.parse("linux/arm64"), [Platform("linux", "arm", "v7")]) is None


def test_choose_empty_candidates() -> None:
    assert choose(Platform.parse("linux/amd64"), []) is None


# --- choose() against the ubuntu:22.04 index shape -----------------------------------------------


def _ubuntu_index(listing: dict[str, Any]) -> Index:
    """Rebuild ubuntu:22.04's index shape (12 entries incl. attestations) from the listing."""
    entries = []
    for item in listing["platforms"]:
        os_, arch, *variant = item["platform"].split("/")
        plat: dict[str, str] = {"os": os_, "architecture": arch}
        if variant:
            plat["variant"] = variant[0]
        entry: dict[str, Any] = {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": item["manifest"],
            "size": 1,
            "platform": plat,
        }
        if "attests" in item:
            entry["annotations"] = {"vnd.docker.reference.type": "attestation-manifest"}
        entries.append(entry)
    doc = {
        "schemaVersion": 2,
        "mediaType": listing["index"]["mediaType"],
        "manifests": entries,
    }
    index = parse_manifest(json.dumps(doc).encode())
    assert isinstance(index, Index)
    assert len(index.manifests) == listing["index"]["entries"]
    return index


@pytest.mark.parametrize(
    ("wanted", "expected_platform"),
    [
        ("linux/amd64", "linux/amd64"),
        ("linux/arm64", "linux/arm64/v8"),
        ("linux/arm64/v8", "linux/arm64/v8"),
        ("linux/arm/v7", "linux/arm/v7"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/ppc64le", "linux/ppc64le"),
        ("linux/riscv64", "linux/riscv64"),
        ("linux/s390x", "linux/s390x"),
        ("linux/386", None),
        ("linux/arm/v6", None),
    ],
)
def test_choose_from_ubuntu_index_skips_attestations(
    ubuntu_listing: dict[str, Any], wanted: str, expected_platform: str | None
) -> None:
    index = _ubuntu_index(ubuntu_listing)
    platforms = [d.platform for d in index.manifests]
    assert Platform("unknown", "unknown") in platforms
    chosen = choose(Platform.parse(wanted), [p for p in platforms if p is not None])
    if expected_platform is None:
        assert chosen is None
        return
    assert chosen is not None
    listing_entry = ubuntu_listing["platforms"][chosen]
    assert listing_entry["platform"] == expected_platform
    assert "attests" not in listing_entry
    assert str(index.manifests[chosen].digest) == listing_entry["manifest"]
