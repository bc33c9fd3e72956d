"""``vmr snapshot create|ls|inspect|rm|verify``: local snapshots on the command line.

Who calls it: :mod:`vmruntime.cli` registers these commands (and hands ``vmr run``
:func:`vmruntime.snapshots.restore.restore_source` for ``--snapshot``). What it promises:
exit status 0 on success, 1 when a snapshot operation fails (the message names the
snapshot and the reason), 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from vmruntime.errors import SnapshotError
from vmruntime.snapshots.capture import capture_running, capture_stopped
from vmruntime.snapshots.store import Snapshot, SnapshotStore
from vmruntime.vm import AsyncSandbox, state


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    snapshot = commands.add_parser("snapshot", help="manage snapshots of sandboxes' disks")
    sub = snapshot.add_subparsers(title="snapshot commands")

    create = sub.add_parser("create", help="keep a sandbox's writable layer as a snapshot (a"
                            " running sandbox is frozen for the copy; a stopped one must have"
                            " been kept)")  # fmt: skip
    create.add_argument("sandbox", help="id, id prefix or name")
    create.add_argument("name")
    create.add_argument("--seal", action="store_true", help="record a digest of the content")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    create.set_defaults(handler=_create)

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

    snapshot.set_defaults(handler=lambda _args: snapshot.print_help() or 2)


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
    snapshot = asyncio.run(_capture(record, args.name, args.seal, labels))
    print(snapshot.name)
    return 0


async def _capture(record: state.SandboxRecord, name: str, seal: bool,
                   labels: dict[str, str]) -> Snapshot:  # fmt: skip
    if not record.vm_running:
        return await capture_stopped(record, name, seal=seal, labels=labels)
    # Only one host connection at a time: a sandbox whose owner is connected refuses us.
    sandbox = await AsyncSandbox.attach(record.id)
    try:
        return await capture_running(sandbox, name, seal=seal, labels=labels)
    finally:
        await sandbox.detach()


def _ls(args: argparse.Namespace) -> int:
    snapshots = SnapshotStore().list()
    if args.json:
        print(json.dumps([{**s.manifest.to_dict(), "digest": s.digest, "path": str(s.path)}
                          for s in snapshots], indent=1))  # fmt: skip
        return 0
    print(f"{'NAME':<28} {'CREATED':<21} {'SIZE':>9} {'SEALED':<6}  IMAGE")
    for s in snapshots:
        m = s.manifest
        print(f"{s.name:<28} {m.created_at:<21} {_human(m.layer.allocated_size):>9} "
              f"{'yes' if m.seal else 'no':<6}  {m.image}")  # fmt: skip
    return 0


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _inspect(args: argparse.Namespace) -> int:
    snapshot = SnapshotStore().get(args.name)
    doc = {**snapshot.manifest.to_dict(), "digest": snapshot.digest, "path": str(snapshot.path),
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
        print(f"{name}: ok ({what}, {time.monotonic() - started:.1f} s)")
    return 0
