"""``vmr snapshot …``: snapshots on the command line.

Who calls it: :mod:`vmruntime.cli` registers these commands. What it promises: exit
status 0 on success, 1 when a snapshot operation fails (the message names the snapshot
or file and the reason), 2 for a malformed command line. Each subcommand is added by its
own small function, so the commands of capture, restore, export and the shared store
can be written side by side.
"""

from __future__ import annotations

import argparse

from vmruntime.snapshots.archive import export_snapshot, import_snapshot
from vmruntime.snapshots.store import SnapshotStore

_SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]


def add_commands(commands: _SubParsers) -> None:
    snapshot = commands.add_parser("snapshot", help="manage disk snapshots of sandboxes")
    sub = snapshot.add_subparsers(title="snapshot commands")
    add_export_command(sub)
    add_import_command(sub)
    snapshot.set_defaults(handler=lambda _args: snapshot.print_help() or 2)


# --- export / import (docs/snapshots.md, "Export archive") ------------------------------


def add_export_command(sub: _SubParsers) -> None:
    export = sub.add_parser(
        "export",
        help="write a snapshot to one compressed file (holes are not stored)",
        description="Write snapshot NAME to PATH as one archive file (0600). It prints the"
        " manifest digest, which `vmr snapshot import --digest` can pin.",
    )
    export.add_argument("name")
    export.add_argument("path")
    export.set_defaults(handler=_export)


def add_import_command(sub: _SubParsers) -> None:
    imp = sub.add_parser(
        "import",
        help="check an exported snapshot file completely, then add it to the local store",
        description="Import the archive at PATH under NAME (default: the name it was exported"
        " under). Every byte and the seal, if any, is checked first; a bad file imports nothing.",
    )
    imp.add_argument("path")
    imp.add_argument("name", nargs="?")
    imp.add_argument("--digest", metavar="sha256:HEX",
                     help="refuse the file unless its manifest has this digest (as printed by"
                     " `vmr snapshot export`)")  # fmt: skip
    imp.set_defaults(handler=_import)


def _export(args: argparse.Namespace) -> int:
    snapshot = SnapshotStore().get(args.name)
    result = export_snapshot(snapshot, args.path)
    print(f"exported {snapshot.name} to {result.path}: {result.chunks} chunks,"
          f" {result.size} bytes, manifest {result.manifest_digest}")  # fmt: skip
    return 0


def _import(args: argparse.Namespace) -> int:
    snapshot = import_snapshot(args.path, SnapshotStore(), args.name, expected_digest=args.digest)
    print(snapshot.name)
    return 0
