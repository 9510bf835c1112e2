"""The CLI's image-filesystem, container and volume commands (split from cli.py, which
keeps parsing, pull and the error/exit-code mapping)."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocistore.api import Store
    from ocistore.compose import Node


def dispatch(store: Store, args: argparse.Namespace) -> int:
    command = args.command
    if command == "rootfs":
        store.rootfs(args.reference, args.dest)
        return 0
    if command == "export":
        if args.output:
            with open(args.output, "wb") as out:
                store.export(args.reference, out)
        else:
            if sys.stdout.isatty():
                from ocistore.errors import UsageError

                raise UsageError("refusing to write a tar stream to a terminal; use -o FILE")
            store.export(args.reference, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        return 0
    if command == "ls":
        return _ls(store, args)
    if command == "cat":
        with store.tree(args.reference).open(args.path) as f:
            while chunk := f.read(1 << 20):
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        return 0
    if command == "layers":
        return _layers(store, args)
    containers = store.containers
    if command == "create":
        record = containers.create(
            args.reference, name=args.name, driver=args.driver, volume_specs=args.volume
        )
        print(record.id)
        return 0
    if command == "mount":
        print(containers.mount(args.name))
        return 0
    if command == "umount":
        containers.umount(args.name)
        return 0
    if command == "diff":
        for change in containers.diff(args.name):
            print(f"{change.kind} {change.path}")
        return 0
    if command == "commit":
        image = containers.commit(args.name, args.new_reference)
        print(f"{image.name} {image.manifest_digest}")
        return 0
    if command == "rm":
        for name in args.name:
            print(containers.rm(name, force=args.force).name)
        return 0
    if command == "ps":
        return _ps(store, args)
    if command == "df":
        return _df(store, args)
    if command == "volume":
        return _volume(store, args)
    raise AssertionError(command)


def _mode_string(mode: int) -> str:
    return stat.filemode(mode)


def _ls(store: Store, args: argparse.Namespace) -> int:
    tree = store.tree(args.reference)
    node = tree.lookup(args.path)
    nodes: list[Node] = tree.listdir(node.path) if stat.S_ISDIR(node.stat.st_mode) else [node]
    out = sys.stdout
    for entry in nodes:
        name = os.path.basename(entry.path) if stat.S_ISDIR(node.stat.st_mode) else args.path
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        if not args.long:
            print(shown, file=out)
            continue
        st = entry.stat
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(st.st_mtime))
        line = (
            f"{_mode_string(st.st_mode)} {st.st_uid:>5} {st.st_gid:>5} {st.st_size:>10} "
            f"{when} {shown}"
        )
        if stat.S_ISLNK(st.st_mode):
            line += f" -> {os.readlink(entry.source)}"
        print(line, file=out)
    return 0


def _layers(store: Store, args: argparse.Namespace) -> int:
    if args.overlay:
        from ocistore.compose import lowerdir_option

        print(":".join(lowerdir_option(store.layer_views(args.reference))))
        return 0
    if args.json:
        import json

        info = store.inspect(args.reference)
        json.dump(
            [
                {
                    "diff_id": layer.diff_id,
                    "digest": layer.digest,
                    "directory": layer.directory,
                    "size": layer.unpacked_size,
                }
                for layer in info.layers
            ],
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
        return 0
    for view in store.layer_views(args.reference):
        print(view.path)
    return 0


def _human(n: int) -> str:
    from ocistore.cli import _human as human

    return human(n)


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _ps(store: Store, args: argparse.Namespace) -> int:
    items = store.containers.ps(all=args.all, sizes=args.size)
    if args.json:
        import json

        json.dump([i._asdict() for i in items], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    header: tuple[str, ...] = ("CONTAINER ID", "NAME", "IMAGE", "DRIVER", "STATUS", "CREATED")
    if args.size:
        header = (*header, "SIZE")
    rows: list[tuple[str, ...]] = [header]
    for c in items:
        row: tuple[str, ...] = (
            c.id[:12],
            c.name,
            c.image,
            c.driver,
            "mounted" if c.mounted else "created",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.created)),
        )
        if args.size:
            row = (*row, f"{_human(c.size or 0)} (virtual {_human(c.virtual_size or 0)})")
        rows.append(row)
    _table(rows)
    return 0


def _df(store: Store, args: argparse.Namespace) -> int:
    usage = store.df()
    if args.json:
        import json
        from dataclasses import asdict

        json.dump(asdict(usage), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    image_total = usage.layers_total
    unique = sum(i.unique for i in usage.images)
    rows: list[tuple[str, ...]] = [("TYPE", "COUNT", "SIZE", "SHARED", "UNIQUE")]
    rows.append(
        (
            "Images",
            str(len(usage.images)),
            _human(image_total),
            _human(usage.layers_shared),
            _human(unique),
        )
    )
    rows.append(("Layer blobs", str(usage.blobs_count), _human(usage.blobs_total), "", ""))
    rows.append(
        (
            "Containers",
            str(len(usage.containers)),
            _human(sum(s for _, s in usage.containers)),
            "",
            "",
        )
    )
    rows.append(
        ("Volumes", str(len(usage.volumes)), _human(sum(s for _, s in usage.volumes)), "", "")
    )
    _table(rows)
    if usage.images:
        print()
        _table(
            [("IMAGE", "SIZE", "SHARED", "UNIQUE")]
            + [
                (i.reference, _human(i.size), _human(i.shared), _human(i.unique))
                for i in usage.images
            ]
        )
    return 0


def _volume(store: Store, args: argparse.Namespace) -> int:
    containers = store.containers
    sub = args.volume_command
    if sub == "create":
        containers.volume_create(args.name)
        print(args.name)
    elif sub == "ls":
        rows = [("VOLUME NAME", "MOUNTPOINT")]
        rows += [(name, path) for name, _, path in containers.volume_ls()]
        _table(rows)
    elif sub == "inspect":
        import json

        json.dump(containers.volume_inspect(args.name), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif sub == "rm":
        for name in args.name:
            containers.volume_rm(name)
            print(name)
    return 0
