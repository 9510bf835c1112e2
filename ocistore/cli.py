"""The ``ocistore`` command: argument parsing, progress display and exit codes.

A thin layer over ``ocistore.api.Store``; every error the library raises becomes one line
on stderr and the error's exit code (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

# json, sqlite3 and threading are imported where they are used: --help and --version need
# none of them, and most commands need only some.

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


def _pull_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF", help="e.g. ubuntu:22.04, ghcr.io/OWNER/IMG:TAG")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="default: this machine's")
    p.add_argument("--jobs", type=int, default=3, metavar="N", help="layers fetched at once")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final line")


def _json_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _ref_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF")


def _rmi_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--force", action="store_true", help="even if a container uses it")
    p.add_argument("reference", metavar="REF", nargs="+")


def _rootfs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF")
    p.add_argument("dest", metavar="DEST", help="a new or empty directory")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF")
    p.add_argument("-o", "--output", metavar="FILE", help="default: standard output")


def _ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF")
    p.add_argument("path", metavar="PATH", nargs="?", default="/")
    p.add_argument("-l", dest="long", action="store_true", help="long listing")


def _cat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF")
    p.add_argument("path", metavar="PATH")


def _layers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="with diffIDs and sizes")
    g.add_argument("--overlay", action="store_true", help="an overlayfs lowerdir= value")


def _create_args(p: argparse.ArgumentParser) -> None:
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


def _name_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")


def _commit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("new_reference", metavar="NEWREF")


def _rm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--force", action="store_true", help="unmount first if needed")
    p.add_argument("name", metavar="NAME", nargs="+")


def _ps_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--all", action="store_true", help="also those not mounted")
    p.add_argument("-s", "--size", action="store_true", help="writable and virtual sizes")
    p.add_argument("--json", action="store_true")


def _df_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


def _fsck_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repair", action="store_true", help="remove what is broken")


def _volume_args(p: argparse.ArgumentParser) -> None:
    vsub = p.add_subparsers(dest="volume_command", metavar="COMMAND", required=True)
    v = vsub.add_parser("create", help="create a volume")
    v.add_argument("name", metavar="NAME")
    vsub.add_parser("ls", help="list volumes")
    v = vsub.add_parser("inspect", help="show a volume (JSON)")
    v.add_argument("name", metavar="NAME")
    v = vsub.add_parser("rm", help="remove volumes that no container uses")
    v.add_argument("name", metavar="NAME", nargs="+")


#: The sub-commands in the order ``--help`` lists them: (help, adds its arguments).
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "pull": ("pull an image from a registry", _pull_args),
    "images": ("list the images in the store", _json_args),
    "inspect": ("show an image's manifest, config and layers (JSON)", _ref_args),
    "rmi": ("remove an image and what only it used", _rmi_args),
    "rootfs": ("materialise an image's filesystem into a directory", _rootfs_args),
    "export": ("an image's filesystem as one tar stream", _export_args),
    "ls": ("list a directory inside an image", _ls_args),
    "cat": ("print a file inside an image", _cat_args),
    "layers": ("an image's layer directories, base first", _layers_args),
    "create": ("create a container (a writable layer on an image)", _create_args),
    "mount": ("mount a container's rootfs and print its path", _name_args),
    "umount": ("unmount a container's rootfs", _name_args),
    "diff": ("changes against the image (A added, C changed, D deleted)", _name_args),
    "commit": ("make a new image from a container's changes", _commit_args),
    "rm": ("remove containers and their writable layers", _rm_args),
    "ps": ("list containers", _ps_args),
    "df": ("space used by images, layers, containers and volumes", _df_args),
    "prune": ("remove blobs, layers and leftovers nothing references", _no_args),
    "fsck": ("verify every blob, layer and record of the store", _fsck_args),
    "volume": ("manage volumes", _volume_args),
}

#: The global options, and whether each takes a value.
_GLOBAL_OPTIONS = {
    "--root": True,
    "--insecure-registry": True,
    "--certs-dir": True,
    "--debug": False,
    "--version": False,
    "--help": False,
}


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line parser; with ``only``, it holds that one sub-command's parser
    (``""``: none) instead of all of them.

    Building every sub-parser costs more than most commands' own work (each one is an
    ArgumentParser, its help option asks the terminal for its width and gettext for its
    strings), and a parse uses one of them: main() builds all only when argparse may have
    to show the list of commands (``--help``, no or an unknown command).
    """
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
    for name, (help_text, add_arguments) in _COMMANDS.items():
        if only is None or name == only:
            add_arguments(sub.add_parser(name, help=help_text))
    return parser


def _only_parser(argv: Sequence[str]) -> str | None:
    """Which sub-parser parsing ``argv`` needs (see :func:`_parser`): the command's name, or
    ``""`` for ``--version`` alone; None (all of them) whenever that is not plain.

    This reads the global options the way argparse does (``--opt VALUE``, ``--opt=VALUE``,
    unambiguous prefixes) up to the first positional argument, the command. Anything else
    (``-h``, ``--help``, an unknown or ambiguous option, ``--``, no command) answers None,
    and argparse then sees the full parser: its result and messages never depend on this.
    """
    version = False
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-"):
            return arg if arg in _COMMANDS else None
        if not arg.startswith("--") or arg == "--":
            return None
        name, has_value, _ = arg.partition("=")
        matches = [o for o in _GLOBAL_OPTIONS if o == name] or [
            o for o in _GLOBAL_OPTIONS if o.startswith(name)
        ]
        if len(matches) != 1 or matches[0] == "--help":
            return None
        if matches[0] == "--version":
            version = True
        elif _GLOBAL_OPTIONS[matches[0]] and not has_value:
            next(args, None)
    return "" if version else None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    only = _only_parser(arguments)
    parser = _parser(only)
    args = parser.parse_args(arguments)
    if args.command is None:
        (parser if only is None else _parser()).print_help(sys.stderr)
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
    except Exception as exc:
        import sqlite3  # only now: --help and commands that do not fail need not load it

        if not isinstance(exc, sqlite3.Error):
            raise
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

    if args.command != "pull":  # the registry options matter to pull only
        return Store(args.root)
    from ocistore.registry.options import TransportOptions

    return Store(
        args.root,
        transport=TransportOptions(
            insecure_registries=frozenset(args.insecure_registry), certs_dir=args.certs_dir
        ),
    )


def _dispatch(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.command == "pull":
        _check_pull_args(args)  # a usage error first, before the store is created
        from ocistore.descriptors import prepare_for_unpacking

        prepare_for_unpacking()  # before the first thread starts
        _open_while_importing(store)
    _resume_gc()
    try:
        if args.command == "pull":
            return _pull(store, args)
        if args.command == "images":
            return _images(store, args)
        if args.command == "inspect":
            import json

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


def _check_pull_args(args: argparse.Namespace) -> None:
    from ocistore.errors import UsageError
    from ocistore.platform import Platform
    from ocistore.reference import Reference

    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    Reference.parse(args.reference)
    if args.platform is not None:
        Platform.parse(args.platform)


def _open_while_importing(store: Store) -> None:
    """Open (or create) the store on a helper thread while this one imports the HTTP
    stack: creating a store waits on fsyncs and sqlite (GIL released) for ~15 ms that
    the ~100 ms of imports can use. Any error is raised here, as if opened in line."""
    import threading

    failure: list[BaseException] = []

    def open_store() -> None:
        try:
            store.unpack_options  # noqa: B018 - opens the metadata on the way
        except BaseException as exc:  # handed over to the main thread
            failure.append(exc)

    opener = threading.Thread(target=open_store, name="ocistore-open", daemon=True)
    opener.start()
    # A Ctrl-C here propagates at once: opening may wait on another process's lock, and
    # the opener is a daemon thread (a store left half-created is what a crash leaves,
    # which opening copes with).
    import ocistore.pull  # noqa: F401 - the HTTP stack, loaded while start-up lasts

    opener.join()  # before anything else touches the store
    if failure:
        raise failure[0]


def _pull(store: Store, args: argparse.Namespace) -> int:
    from ocistore.allocator import tune_for_streaming

    tune_for_streaming()
    view: _Progress | None = None
    if not args.quiet:
        view = _TtyProgress(sys.stderr) if sys.stderr.isatty() else _LogProgress(sys.stderr)
    import threading

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
        import json
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
        import threading

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


_gc_paused = False


def run() -> None:
    """The console script and ``python -m ocistore``: the CLI in a process of its own.

    Start-up makes tens of thousands of objects (modules, functions, classes) and no
    garbage cycles worth collecting, yet the cycle collector ran 58 times during a pull's
    imports (10-13 ms) and 11-20 times for --help, images or create (2-6 ms). It is off
    until the command's modules are loaded (_resume_gc); main() called from elsewhere
    leaves the caller's collector alone."""
    global _gc_paused
    import gc

    gc.disable()
    _gc_paused = True
    try:
        code = main()
    finally:
        _resume_gc()  # also where no command ran (--version, a usage error)
    sys.exit(code)


def _resume_gc() -> None:
    global _gc_paused
    if _gc_paused:
        import gc

        gc.freeze()  # start-up's objects live to the end: no collection need walk them again
        gc.enable()
        _gc_paused = False


if __name__ == "__main__":
    run()
