"""``vmr snapshot …``: snapshots on the command line.

Who calls it: :mod:`vmruntime.cli` registers these commands. What it promises: exit
status 0 on success, 1 when a snapshot operation fails (the message names the snapshot
or file and the reason), 2 for a malformed command line. Each subcommand is added by its
own small function, so the commands of capture, restore, export and the shared store
can be written side by side.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vmruntime.errors import SnapshotStoreError
from vmruntime.snapshots.archive import export_snapshot, import_snapshot
from vmruntime.snapshots.store import SnapshotStore

_SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]


def add_commands(commands: _SubParsers) -> None:
    snapshot = commands.add_parser("snapshot", help="manage disk snapshots of sandboxes")
    sub = snapshot.add_subparsers(title="snapshot commands")
    add_export_command(sub)
    add_import_command(sub)
    add_push_command(sub)
    add_pull_command(sub)
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


# --- the shared store: push and pull -------------------------------------------------------


def add_push_command(sub: _SubParsers) -> None:
    push = sub.add_parser(
        "push",
        help="send a snapshot to a shared store on any fsspec URL (s3://, gs://, file://...);"
        " only chunks the store lacks are sent",
    )
    push.add_argument("name", help="the local snapshot")
    push.add_argument("url", help="the store's URL; the snapshot goes under its name there")
    _add_store_options(push)
    push.set_defaults(handler=_push)


def add_pull_command(sub: _SubParsers) -> None:
    pull = sub.add_parser(
        "pull",
        help="fetch a snapshot from a shared store, checking every chunk (and the seal)",
    )
    pull.add_argument("url", help="<store URL>/<snapshot name>, as `vmr snapshot push` prints")
    pull.add_argument("name", nargs="?", help="the local name (default: the name in the store)")
    _add_store_options(pull)
    pull.set_defaults(handler=_pull)


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="an S3-compatible server for s3:// URLs (MinIO, Ceph...); also"
        " read from $AWS_ENDPOINT_URL or $FSSPEC_S3_ENDPOINT_URL",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (none when stderr is no terminal)",
    )


def _push(args: argparse.Namespace) -> int:
    from vmruntime.snapshots.remote import push

    snapshot = SnapshotStore().get(args.name)
    result = push(snapshot, args.url, **_store_options(args))
    print(result.url)
    print(
        f"{result.name}: {result.index_digest}; sent {result.chunks_sent} of "
        f"{result.chunks} chunks ({result.bytes_sent} bytes compressed)",
        file=sys.stderr,
    )
    return 0


def _pull(args: argparse.Namespace) -> int:
    from vmruntime.snapshots.remote import pull

    snapshot = pull(args.url, args.name, **_store_options(args))
    print(snapshot.name)
    return 0


def _store_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"progress": False if args.no_progress else None}
    if args.endpoint_url:
        if not args.url.startswith(("s3://", "s3a://")):
            raise SnapshotStoreError(args.url, "--endpoint-url is for s3:// URLs")
        options["storage_options"] = {"endpoint_url": args.endpoint_url}
    return options
