"""The ``ocistore`` command: argument parsing, progress display and exit codes.

A thin layer over ``ocistore.api.Store``; every error the library raises becomes one line
on stderr and the error's exit code (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ocistore.api import Store
    from ocistore.progress import PullEvent

EXIT_CODES = """\
exit codes:
  0    success
  1    other error
  2    bad usage (unknown option, malformed reference, digest or platform)
  3    not found (no such image, tag, blob or platform)
  4    authentication failed or access denied
  5    network failure (cannot reach the registry, connection broke, HTTP 5xx)
  6    integrity failure (content does not match its digest, size or diffID)
  7    content refused (unsupported media type, malformed manifest, unsafe layer)
  8    local store failure (disk full, permissions, store in use)
  130  interrupted (Ctrl-C)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ocistore",
        description="A daemonless container-image store: pull OCI images into a "
        "content-addressed store, each layer unpacked once.",
        epilog=EXIT_CODES
        + "\nstore root: --root, else $OCISTORE_ROOT, else /var/lib/ocistore (root) or "
        "$XDG_DATA_HOME/ocistore (~/.local/share/ocistore).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", help="the store's root directory")
    parser.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="talk plain HTTP to this registry (loopback hosts always are); repeatable",
    )
    parser.add_argument(
        "--certs-dir",
        default=os.environ.get("OCISTORE_CERTS_DIR", "/etc/docker/certs.d"),
        help="per-registry CA certificates, as HOST[:PORT]/ca.crt (default: %(default)s)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pull", help="pull an image from a registry")
    p.add_argument("reference", metavar="REF", help="e.g. ubuntu:22.04, ghcr.io/OWNER/IMG:TAG")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="default: this machine's")
    p.add_argument("--jobs", type=int, default=3, metavar="N", help="layers fetched at once")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final line")

    p = sub.add_parser("images", help="list the images in the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("inspect", help="show an image's manifest, config and layers (JSON)")
    p.add_argument("reference", metavar="REF")

    p = sub.add_parser("rmi", help="remove an image and what only it used")
    p.add_argument("-f", "--force", action="store_true", help="even if a container uses it")
    p.add_argument("reference", metavar="REF", nargs="+")

    p = sub.add_parser("rootfs", help="materialise an image's filesystem into a directory")
    p.add_argument("reference", metavar="REF")
    p.add_argument("dest", metavar="DEST", help="a new or empty directory")

    p = sub.add_parser("export", help="an image's filesystem as one tar stream")
    p.add_argument("reference", metavar="REF")
    p.add_argument("-o", "--output", metavar="FILE", help="default: standard output")

    p = sub.add_parser("ls", help="list a directory inside an image")
    p.add_argument("reference", metavar="REF")
    p.add_argument("path", metavar="PATH", nargs="?", default="/")
    p.add_argument("-l", dest="long", action="store_true", help="long listing")

    p = sub.add_parser("cat", help="print a file inside an image")
    p.add_argument("reference", metavar="REF")
    p.add_argument("path", metavar="PATH")

    p = sub.add_parser("layers", help="an image's layer directories, base first")
    p.add_argument("reference", metavar="REF")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="with diffIDs and sizes")
    g.add_argument("--overlay", action="store_true", help="an overlayfs lowerdir= value")

    p = sub.add_parser("create", help="create a container (a writable layer on an image)")
    p.add_argument("reference", metavar="REF")
    p.add_argument("--name", help="default: the id's first 12 characters")
    p.add_argument("--driver", choices=("overlay", "copy"), help="default: overlay if possible")
    p.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="VOL:/PATH[:ro]",
        help="mount a volume (created if needed); repeatable",
    )

    p = sub.add_parser("mount", help="mount a container's rootfs and print its path")
    p.add_argument("name", metavar="NAME")
    p = sub.add_parser("umount", help="unmount a container's rootfs")
    p.add_argument("name", metavar="NAME")
    p = sub.add_parser("diff", help="changes against the image (A added, C changed, D deleted)")
    p.add_argument("name", metavar="NAME")
    p = sub.add_parser("commit", help="make a new image from a container's changes")
    p.add_argument("name", metavar="NAME")
    p.add_argument("new_reference", metavar="NEWREF")
    p = sub.add_parser("rm", help="remove containers and their writable layers")
    p.add_argument("-f", "--force", action="store_true", help="unmount first if needed")
    p.add_argument("name", metavar="NAME", nargs="+")
    p = sub.add_parser("ps", help="list containers")
    p.add_argument("-a", "--all", action="store_true", help="also those not mounted")
    p.add_argument("-s", "--size", action="store_true", help="writable and virtual sizes")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("df", help="space used by images, layers, containers and volumes")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("prune", help="remove blobs, layers and leftovers nothing references")
    p = sub.add_parser("fsck", help="verify every blob, layer and record of the store")
    p.add_argument("--repair", action="store_true", help="remove what is broken")

    p = sub.add_parser("volume", help="manage volumes")
    vsub = p.add_subparsers(dest="volume_command", metavar="COMMAND", required=True)
    v = vsub.add_parser("create", help="create a volume")
    v.add_argument("name", metavar="NAME")
    vsub.add_parser("ls", help="list volumes")
    v = vsub.add_parser("inspect", help="show a volume (JSON)")
    v.add_argument("name", metavar="NAME")
    v = vsub.add_parser("rm", help="remove volumes that no container uses")
    v.add_argument("name", metavar="NAME", nargs="+")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from ocistore.errors import Interrupted, OcistoreError

    try:
        return _dispatch(args)
    except OcistoreError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"ocistore: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ocistore: interrupted", file=sys.stderr)
        return Interrupted.exit_code
    except OSError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"ocistore: {exc.strerror or exc}{where}", file=sys.stderr)
        return 8
    except sqlite3.Error as exc:
        # The metadata database failed where the library did not translate it (opening a
        # store on a full disk: "database or disk is full"): a store failure, exit 8, one
        # line, not a traceback.
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"ocistore: the store's metadata database failed: {exc}", file=sys.stderr)
        return 8


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _store(args: argparse.Namespace) -> Store:
    from ocistore.api import Store
    from ocistore.registry.options import TransportOptions

    return Store(
        args.root,
        transport=TransportOptions(
            insecure_registries=frozenset(args.insecure_registry), certs_dir=args.certs_dir
        ),
    )


def _dispatch(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        if args.command == "pull":
            return _pull(store, args)
        if args.command == "images":
            return _images(store, args)
        if args.command == "inspect":
            info = store.inspect(args.reference)
            json.dump(info.to_json(), sys.stdout, indent=2)
            sys.stdout.write("\n")
            return 0
        if args.command == "rmi":
            for reference in args.reference:
                removed = store.rmi(reference, force=args.force)
                print(f"Untagged: {removed.reference}")
                for digest in removed.blobs:
                    print(f"Deleted: {digest}")
            return 0
        if args.command == "prune":
            report = store.prune()
            for kind, items in (
                ("blob", report.blobs),
                ("layer", report.layers),
                ("temporary", report.temporary),
                ("container directory", report.containers),
            ):
                for item in items:
                    print(f"Deleted {kind}: {item}")
            print(f"Total reclaimed space: {_human(report.bytes_freed)}")
            return 0
        if args.command == "fsck":
            fsck = store.fsck(repair=args.repair)
            for problem in fsck.problems:
                print(problem)
            for fixed in fsck.repaired:
                print(f"repaired: {fixed}")
            state = "clean" if fsck.clean else f"{len(fsck.problems)} problem(s)"
            print(
                f"checked {fsck.blobs_checked} blobs, {fsck.layers_checked} layers: {state}",
                file=sys.stderr,
            )
            return 0 if fsck.clean or args.repair else 6
        from ocistore import cli_containers

        return cli_containers.dispatch(store, args)
    finally:
        store.close()
    raise AssertionError(args.command)


def _pull(store: Store, args: argparse.Namespace) -> int:
    from ocistore.errors import UsageError

    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    view: _Progress | None = None
    if not args.quiet:
        view = _TtyProgress(sys.stderr) if sys.stderr.isatty() else _LogProgress(sys.stderr)
    cancel = threading.Event()
    try:
        result = store.pull(
            args.reference,
            platform=args.platform,
            jobs=args.jobs,
            progress=view.event if view else None,
            cancel=cancel,
        )
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        if view:
            view.close()
    if view:
        fetched = (
            f"{result.layers_fetched} layer(s), {_human(result.bytes_fetched)} downloaded"
            if result.layers_fetched
            else "image is up to date"
        )
        print(f"{fetched}; platform {result.platform}", file=sys.stderr)
    print(f"{result.name} {result.manifest_digest}")
    return 0


def _images(store: Store, args: argparse.Namespace) -> int:
    images = store.images()
    if args.json:
        from dataclasses import asdict

        json.dump([asdict(i) for i in images], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = [("REFERENCE", "DIGEST", "PLATFORM", "CREATED", "SIZE")]
    for image in images:
        rows.append(
            (
                image.reference,
                image.manifest_digest[:19],
                image.platform,
                (image.created or "")[:19].replace("T", " "),
                _human(image.size),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} GB"


_LABELS = {
    "waiting": "Waiting",
    "downloading": "Downloading",
    "verifying": "Verifying",
    "unpacking": "Unpacking",
    "already-exists": "Already exists",
    "done": "Pull complete",
}


class _Progress:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = threading.Lock()

    def event(self, event: PullEvent) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _LogProgress(_Progress):
    """One line per phase change: for logs and pipes, where redrawing would be noise."""

    def __init__(self, out: TextIO) -> None:
        super().__init__(out)
        self.phases: dict[str, str] = {}

    def event(self, event: PullEvent) -> None:
        with self.lock:
            if event.layer is None:
                if event.phase == "resolving":
                    print(f"Resolving {event.message}", file=self.out, flush=True)
                elif event.phase == "resolved":
                    print(f"Manifest {event.message}", file=self.out, flush=True)
                return
            if self.phases.get(event.layer) == event.phase:
                return
            self.phases[event.layer] = event.phase
            detail = (
                f" ({_human(event.total)})" if event.phase == "downloading" and event.total else ""
            )
            print(
                f"{event.layer}: {_LABELS.get(event.phase, event.phase)}{detail}",
                file=self.out,
                flush=True,
            )


class _TtyProgress(_Progress):
    """Docker-style: a line per layer, redrawn in place."""

    def __init__(self, out: TextIO) -> None:
        super().__init__(out)
        self.header = ""
        self.lines: dict[str, str] = {}
        self.drawn = 0
        self.last_draw = 0.0

    def event(self, event: PullEvent) -> None:
        with self.lock:
            if event.layer is None:
                if event.phase == "resolving":
                    self.header = f"Resolving {event.message}"
                elif event.phase == "resolved":
                    self.header = f"Manifest {event.message}"
            else:
                label = _LABELS.get(event.phase, event.phase)
                if event.phase in ("downloading", "unpacking") and event.total:
                    done, total = _human(event.current), _human(event.total)
                    label += f" {_bar(event.current, event.total)} {done}/{total}"
                self.lines[event.layer] = label
            now = time.monotonic()
            if event.phase in ("downloading", "unpacking") and now - self.last_draw < 0.1:
                return
            self.last_draw = now
            self._draw()

    def _draw(self) -> None:
        text = [self.header] + [f"{layer}: {state}" for layer, state in self.lines.items()]
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F")
        for line in text:
            self.out.write("\x1b[2K" + line + "\n")
        self.drawn = len(text)
        self.out.flush()

    def close(self) -> None:
        with self.lock:
            self._draw()


def _bar(current: int, total: int, width: int = 20) -> str:
    filled = min(width, int(width * current / total)) if total else width
    return "[" + "=" * filled + ">" * (filled < width) + " " * (width - filled - 1) + "]"


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
