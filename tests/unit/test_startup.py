"""Start-up cost guards: what the quick commands import, and the CLI's partial parsers.

``--help``, ``--version``, ``images`` and ``create`` run in tens of milliseconds, most of
which is importing modules; these tests fail when a change makes them load the HTTP stack,
the unpacker, OpenSSL and the like again. Each runs the command in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ocistore import cli

_PROBE = """
import contextlib, io, sys
from ocistore import cli
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        rc = cli.main(sys.argv[1:])
    except SystemExit as exc:
        rc = exc.code
modules = sorted(sys.modules)
import json  # only now: it is one of the modules looked for
print(json.dumps({"rc": rc, "modules": modules, "out": out.getvalue()}))
"""

#: Never needed by a command that does not talk to a registry or unpack a layer.
_HEAVY = (
    "requests",
    "urllib3",
    "ocistore.pull",
    "ocistore.registry.client",
    "ocistore.ingest",
    "ocistore.unpack",
    "_hashlib",  # OpenSSL: milliseconds to load
)


def _run(*args: str) -> tuple[object, set[str], str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True
    )
    result = json.loads(proc.stdout)
    return result["rc"], set(result["modules"]), result["out"]


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_help_and_version_import_no_store_modules(args: list[str]) -> None:
    rc, modules, _ = _run(*args)
    assert rc == 0
    loaded = modules & {*_HEAVY, "tarfile", "sqlite3", "json", "dataclasses", "ocistore.api"}
    assert not loaded


def test_images_imports_neither_http_nor_tar(tmp_path: Path) -> None:
    root = tmp_path / "store"
    from ocistore.api import Store

    Store(str(root)).metadata  # noqa: B018 - creates the store
    rc, modules, out = _run("--root", str(root), "images")
    assert rc == 0
    assert out.startswith("REFERENCE")
    loaded = modules & {*_HEAVY, "tarfile", "subprocess", "ocistore.whiteouts"}
    assert not loaded


def test_create_imports_no_http_nor_what_only_other_commands_use(tmp_path: Path) -> None:
    from ocistore.api import Store
    from ocistore.store.metadata import ImageRecord

    root = tmp_path / "store"
    store = Store(str(root))
    digest = "sha256:" + "0" * 64
    store.metadata.put_image(
        ImageRecord("docker.io/library/empty:latest", digest, "m", 2, None, digest, "l/a", 0.0),
        [],
    )
    store.close()
    # As root this creates an overlay container (an image without layers needs no
    # mount to prepare); otherwise the overlay driver is refused (exit 8) after the same
    # imports.
    rc, modules, _ = _run("--root", str(root), "create", "--driver", "overlay", "empty")
    assert rc in (0, 8)
    unused = {"ocistore.snapshots.copy", "ocistore.snapshots.changes", "ocistore.volumes"}
    unused |= {"ocistore.digest"}  # no digest to parse: the reference has none
    # export's tar writer, the records images/inspect/df/rmi return, and tempfile (its
    # `random` alone is milliseconds): create writes its files without them.
    unused |= {"tarfile", "ocistore.export", "ocistore.results", "tempfile", "random"}
    # dataclasses imports inspect, ast and dis (~13 ms) and builds each class with exec
    # (~1 ms apiece): the records create reads and writes are NamedTuples.
    unused |= {"dataclasses", "inspect"}
    loaded = modules & {*_HEAVY, *unused, "subprocess", "ocistore.registry.options"}
    assert not loaded


@pytest.mark.parametrize(
    ("argv", "only"),
    [
        (["images"], "images"),
        (["--root", "/r", "create", "x"], "create"),
        (["--root=/r", "--debug", "ps", "-a"], "ps"),
        (["--ro", "/r", "--insecure", "h", "--cert", "d", "volume", "ls"], "volume"),
        (["--version"], ""),
        (["--debug", "--version"], ""),
        (["--root", "--version"], None),  # --version is --root's value
        ([], None),
        (["--debug"], None),
        (["-h"], None),
        (["--he"], None),
        (["--root", "/r", "--help", "images"], None),
        (["bogus"], None),
        (["--bogus", "images"], None),
        (["--", "images"], None),
        (["-", "images"], None),
    ],
)
def test_only_parser(argv: list[str], only: str | None) -> None:
    assert cli._only_parser(argv) == only


@pytest.mark.parametrize(
    "argv",
    [
        ["images", "--json"],
        ["--root", "/r", "--insecure-registry", "a", "--insecure-registry=b", "pull", "x"],
        ["--certs-dir", "/c", "pull", "-q", "--jobs", "5", "--platform", "linux/arm64", "x"],
        ["--debug", "create", "--name", "n", "--driver", "copy", "-v", "v:/d:ro", "x"],
        ["layers", "--overlay", "x"],
        ["ls", "-l", "x", "/etc"],
        ["rm", "-f", "a", "b"],
        ["ps", "-a", "-s"],
        ["volume", "rm", "a", "b"],
        ["volume", "ls"],
        ["fsck", "--repair"],
        ["prune"],
        ["--r", "/r", "--deb", "export", "x", "-o", "f"],
    ],
)
def test_partial_parser_parses_as_the_full_one(argv: list[str]) -> None:
    only = cli._only_parser(argv)
    assert only == next(a for a in argv if a in cli._COMMANDS)
    assert cli._parser(only).parse_args(argv) == cli._parser().parse_args(argv)


def test_pull_defines_its_records_without_dataclasses(tmp_path: Path) -> None:
    # Nothing listens on port 1: the pull fails at its first request (exit 5), after
    # every module it needs to talk to a registry and unpack is loaded.
    rc, modules, _ = _run("--root", str(tmp_path / "store"), "pull", "-q", "127.0.0.1:1/a/b:c")
    assert rc == 5
    assert {"requests", "ocistore.pull", "ocistore.ingest", "ocistore.unpack"} <= modules
    # dataclasses costs ~9 ms to import (inspect, ast, dis) and ~1 ms per class it
    # builds; the 14 records on the pull path are NamedTuples (about 20 ms per pull).
    assert not modules & {"dataclasses", "inspect"}


_GC_PROBE = """
import gc, sys
from ocistore import cli
states = []
open_store, list_images = cli._store, cli._images
cli._store = lambda args: (states.append(gc.isenabled()), open_store(args))[1]
cli._images = lambda store, args: (states.append(gc.isenabled()), list_images(store, args))[1]
sys.argv = ["ocistore", "--root", sys.argv[1], "images"]
try:
    cli.run()
except SystemExit as exc:
    print(states, exc.code, gc.isenabled())
"""


def test_console_script_collects_no_garbage_during_start_up_only(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _GC_PROBE, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Off while the store and the command's modules load, back on for the command.
    assert out.strip().endswith("[False, True] 0 True"), out
