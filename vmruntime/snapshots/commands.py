"""``vmr snapshot …``: snapshots on the command line.

Who calls it: :mod:`vmruntime.cli` registers these commands. What it promises: exit
status 0 on success, 1 when a snapshot operation fails (the message names the snapshot
or file and the reason), 2 for a malformed command line. Each subcommand is added by its
own small function, so the commands of capture, restore, export and the shared store
can be written side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from vmruntime.errors import SandboxError, SnapshotError, SnapshotStoreError
from vmruntime.images.commands import size_text
from vmruntime.snapshots.archive import export_snapshot, import_snapshot
from vmruntime.snapshots.capture import capture_memory, capture_running, capture_stopped
from vmruntime.snapshots.manifest import SnapshotManifest
from vmruntime.snapshots.store import Snapshot, SnapshotStore
from vmruntime.vm import AsyncSandbox, state

_SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]


def add_commands(commands: _SubParsers) -> None:
    snapshot = commands.add_parser("snapshot", help="manage disk snapshots of sandboxes")
    sub = snapshot.add_subparsers(title="snapshot commands")
    add_create_command(sub)
    add_local_commands(sub)
    add_export_command(sub)
    add_import_command(sub)
    add_push_command(sub)
    add_pull_command(sub)
    snapshot.set_defaults(handler=lambda _args: snapshot.print_help() or 2)


# --- capture and the local store (docs/snapshots.md, "Capture") ----------------------------


def add_create_command(sub: _SubParsers) -> None:
    create = sub.add_parser("create", help="keep a sandbox's writable layer as a snapshot (a"
                            " running sandbox is frozen for the copy; a stopped one must have"
                            " been kept)")  # fmt: skip
    create.add_argument("sandbox", help="id, id prefix or name")
    create.add_argument("name")
    create.add_argument("--seal", action="store_true", help="record a digest of the content")
    create.add_argument("--memory", action="store_true",
                        help="keep the running machine too (RAM and devices): sandboxes made "
                        "from it resume where it was")  # fmt: skip
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    create.set_defaults(handler=_create)


def add_local_commands(sub: _SubParsers) -> None:
    """ls, inspect, rm, verify."""
    ls = sub.add_parser("ls", help="list snapshots")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=_ls)

    inspect = sub.add_parser("inspect", help="print a snapshot's manifest, digest and path")
    inspect.add_argument("name")
    inspect.set_defaults(handler=_inspect)

    rm = sub.add_parser("rm", help="remove snapshots")
    rm.add_argument("-f", "--force", action="store_true",
                    help="also when a sandbox's layer stands on it")  # fmt: skip
    rm.add_argument("names", nargs="+")
    rm.set_defaults(handler=_rm)

    verify = sub.add_parser("verify", help="check a snapshot's layer (sizes, and the seal)")
    verify.add_argument("names", nargs="+")
    verify.set_defaults(handler=_verify)


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SnapshotError(f"bad --label {pair!r}: want KEY=VALUE")
        labels[key] = value
    return labels


def _create(args: argparse.Namespace) -> int:
    labels = _labels(args.label)
    record = state.find_record(args.sandbox)
    snapshot = asyncio.run(_capture(record, args.name, args.seal, labels, args.memory))
    print(snapshot.name)
    return 0


async def _capture(record: state.SandboxRecord, name: str, seal: bool,
                   labels: dict[str, str], memory: bool = False) -> Snapshot:  # fmt: skip
    if not record.vm_running:
        if memory:
            raise SandboxError(record.id, f"is {record.status}: --memory needs a running sandbox")
        return await capture_stopped(record, name, seal=seal, labels=labels)
    # Only one host connection at a time: a sandbox whose owner is connected refuses us.
    sandbox = await AsyncSandbox.attach(record.id)
    capture = capture_memory if memory else capture_running
    try:
        return await capture(sandbox, name, seal=seal, labels=labels)
    finally:
        await sandbox.detach()


def _ls(args: argparse.Namespace) -> int:
    snapshots = SnapshotStore().list()
    if args.json:
        print(json.dumps([{**s.manifest.to_dict(), "digest": s.digest, "path": str(s.path),
                           "kind": _kind(s.manifest)} for s in snapshots], indent=1))  # fmt: skip
        return 0
    print(f"{'NAME':<28} {'KIND':<6} {'CREATED':<21} {'SIZE':>9} {'MEMORY':>9} {'SEALED':<6}"
          "  IMAGE")  # fmt: skip
    for s in snapshots:
        m = s.manifest
        memory = "-" if m.memory is None else size_text(m.memory.memory_mib << 20)
        print(f"{s.name:<28} {_kind(m):<6} {m.created_at:<21} "
              f"{size_text(_allocated(s.path, m.files)):>9} {memory:>9} "
              f"{'yes' if m.seal else 'no':<6}  {m.image}")  # fmt: skip
    return 0


def _kind(manifest: SnapshotManifest) -> str:
    """The kind shown: "disk" (a writable layer) or "memory" (a layer, RAM and devices)."""
    return "disk" if manifest.memory is None else "memory"


def _allocated(directory: Path, files: tuple[str, ...]) -> int:
    """Bytes on disk of a snapshot's data files (they are sparse: less than their sizes)."""
    total = 0
    for file in files:
        with contextlib.suppress(OSError):  # a damaged snapshot still lists; verify says why
            total += (directory / file).stat().st_blocks * 512
    return total


def _files_doc(snapshot: Snapshot) -> dict[str, dict[str, int]]:
    """Each data file's apparent and allocated size, for ``inspect``."""
    return {data_file.file: {"size": data_file.size,
                             "allocated": _allocated(snapshot.path, (data_file.file,))}
            for data_file in snapshot.manifest.data_files}  # fmt: skip


def _inspect(args: argparse.Namespace) -> int:
    snapshot = SnapshotStore().get(args.name)
    doc = {**snapshot.manifest.to_dict(), "digest": snapshot.digest, "path": str(snapshot.path),
           "kind": _kind(snapshot.manifest), "files": _files_doc(snapshot),
           "restored_by": [r.id for r in _standing_on(snapshot)]}  # fmt: skip
    print(json.dumps(doc, indent=2, sort_keys=True))
    return 0


def _standing_on(snapshot: Snapshot) -> list[state.SandboxRecord]:
    """The sandboxes (running or kept) whose writable layer is an overlay over it."""
    return [r for r in state.list_records() if r.layer_origin == snapshot.digest]


def _rm(args: argparse.Namespace) -> int:
    store = SnapshotStore()
    for name in args.names:
        snapshot = store.get(name)
        users = _standing_on(snapshot)
        if users and not args.force:
            ids = ", ".join(r.id for r in users)
            raise SnapshotError(f"snapshot {name!r}: the layers of sandboxes {ids} stand on it;"
                                " remove them first, or pass --force (a stopped one then"
                                " cannot be snapshotted)")  # fmt: skip
        store.remove(name)
        print(f"removed {name}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = SnapshotStore()
    for name in args.names:
        snapshot = store.get(name)
        started = time.monotonic()
        snapshot.verify()
        what = "sizes and seal" if snapshot.manifest.seal else "sizes (not sealed)"
        if snapshot.manifest.memory is not None:
            what += ", RAM and device state digests"
        print(f"{name}: ok ({what}, {time.monotonic() - started:.1f} s)")
    return 0


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
    push.add_argument("--with-image", action="store_true",
                      help="also send its base image's blobs (deduplicated like the layer's"
                      " chunks), for machines that cannot pull it from a registry")  # fmt: skip
    _add_store_options(push)
    push.set_defaults(handler=_push)


def add_pull_command(sub: _SubParsers) -> None:
    pull = sub.add_parser(
        "pull",
        help="fetch a snapshot from a shared store, checking every chunk (and the seal)",
    )
    pull.add_argument("url", help="<store URL>/<snapshot name>, as `vmr snapshot push` prints")
    pull.add_argument("name", nargs="?", help="the local name (default: the name in the store)")
    pull.add_argument("--with-image", action="store_true",
                      help="also bring its base image into the image cache by digest: from the"
                      " store if it was pushed with it, else from its registry")  # fmt: skip
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
    result = push(snapshot, args.url, with_image=args.with_image, **_store_options(args))
    print(result.url)
    print(
        f"{result.name}: {result.index_digest}; sent {result.chunks_sent} of "
        f"{result.chunks} chunks ({result.bytes_sent} bytes compressed)",
        file=sys.stderr,
    )
    if result.image is not None:
        image = result.image
        print(f"image {image.manifest_digest}: {image.blobs} blobs; sent {image.chunks_sent} of "
              f"{image.chunks} chunks ({image.bytes_sent} bytes compressed)",
              file=sys.stderr)  # fmt: skip
    return 0


def _pull(args: argparse.Namespace) -> int:
    from vmruntime.snapshots.remote import pull

    options = _store_options(args)
    snapshot = pull(args.url, args.name, **options)
    if args.with_image:
        _pull_image(snapshot, args.url, options)
    print(snapshot.name)
    return 0


def _pull_image(snapshot: Snapshot, url: str, options: dict[str, Any]) -> None:
    from vmruntime.images.store import ImageStore
    from vmruntime.snapshots.ensure import ensure_base_image
    from vmruntime.snapshots.remote import RemoteStore, split_snapshot_url

    remote = RemoteStore.open(split_snapshot_url(url)[0], options.get("storage_options"))
    found = ensure_base_image(snapshot.manifest, ImageStore(), remote,
                              progress=options["progress"] is not False)  # fmt: skip
    print(f"image {snapshot.manifest.image_manifest_digest}: from the {found}", file=sys.stderr)


def _store_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"progress": False if args.no_progress else None}
    if args.endpoint_url:
        if not args.url.startswith(("s3://", "s3a://")):
            raise SnapshotStoreError(args.url, "--endpoint-url is for s3:// URLs")
        options["storage_options"] = {"endpoint_url": args.endpoint_url}
    return options
