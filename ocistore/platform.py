"""Platforms (``os/arch[/variant]``): parsing, normalisation and choosing from an index."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ocistore.errors import InvalidPlatformError

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "i386": "386",
    "i686": "386",
}


class Platform(NamedTuple):
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidPlatformError(
                f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64"
            )
        return cls(*parts).normalized()

    @classmethod
    def from_descriptor(cls, platform: Mapping[str, Any]) -> Platform:
        return cls(
            str(platform.get("os", "")),
            str(platform.get("architecture", "")),
            str(platform.get("variant", "") or ""),
        ).normalized()

    @classmethod
    def host(cls) -> Platform:
        # os.uname() is what the platform module reads too, without its 1.6 ms import.
        host = os.uname()
        machine = host.machine.lower()
        variant = ""
        if machine.startswith("armv"):
            variant, machine = machine[3:5], "arm"  # "armv7l" -> arm/v7
        return cls(host.sysname.lower() or "linux", machine, variant).normalized()

    def normalized(self) -> Platform:
        arch = _ARCH_ALIASES.get(self.architecture, self.architecture)
        variant = self.variant
        if arch == "arm64" and variant in ("v8", "8"):
            variant = ""  # arm64 is v8 unless said otherwise; an index may say either.
        elif arch == "arm" and not variant:
            variant = "v7"
        elif variant and not variant.startswith("v") and variant.isdigit():
            variant = f"v{variant}"
        return Platform(self.os, arch, variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _arm_rank(variant: str) -> int:
    try:
        return int(variant.removeprefix("v"))
    except ValueError:
        return -1


def choose(wanted: Platform, candidates: Iterable[Platform]) -> int | None:
    """Index of the best candidate for ``wanted``, or None.

    An exact (normalised) match wins; for 32-bit arm an older variant runs on a newer CPU,
    so arm/v7 falls back to v6, then v5, as containerd does.
    """
    best: tuple[int, int] | None = None
    for i, cand in enumerate(candidates):
        if cand.os != wanted.os or cand.architecture != wanted.architecture:
            continue
        if cand.variant == wanted.variant:
            return i
        if wanted.architecture == "arm":
            rank = _arm_rank(cand.variant)
            if 0 <= rank < _arm_rank(wanted.variant) and (best is None or rank > best[0]):
                best = (rank, i)
    return best[1] if best else None
