"""``vmr snapshot ...``: snapshots on the command line.

Who calls it: :mod:`vmruntime.cli` registers these commands. What it promises: exit
status 0 on success, 1 when a snapshot operation fails (the message names the snapshot,
URL, chunk or digest and the reason), 2 for a malformed command line. Each subcommand
is added by its own small function, so the groups of commands stay apart.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vmruntime.errors import SnapshotStoreError
from vmruntime.snapshots.store import SnapshotStore


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    snapshot = commands.add_parser("snapshot", help="manage disk snapshots of sandboxes")
    sub = snapshot.add_subparsers(title="snapshot commands")
    add_push_command(sub)
    add_pull_command(sub)
    snapshot.set_defaults(handler=lambda _args: snapshot.print_help() or 2)


# --- the shared store: push and pull -------------------------------------------------------


def add_push_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    push = sub.add_parser(
        "push",
        help="send a snapshot to a shared store on any fsspec URL (s3://, gs://, file://...);"
        " only chunks the store lacks are sent",
    )
    push.add_argument("name", help="the local snapshot")
    push.add_argument("url", help="the store's URL; the snapshot goes under its name there")
    _add_store_options(push)
    push.set_defaults(handler=_push)


def add_pull_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
