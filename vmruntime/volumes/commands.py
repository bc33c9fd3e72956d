"""``vmr volume create|ls|inspect|rm``: named volumes on the command line.

Who calls it: :mod:`vmruntime.cli` registers these commands. What it promises:
exit status 0 on success, 1 when a volume operation fails (the message names the
volume and the reason), 2 for a malformed command line; ``rm`` removes what it
can, reports each failure and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from vmruntime.errors import VolumeError, VolumeNotFoundError
from vmruntime.volumes.store import Volume, VolumeStore, parse_size


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    volume = commands.add_parser("volume", help="manage named volumes")
    sub = volume.add_subparsers(title="volume commands")

    create = sub.add_parser(
        "create",
        help="create a volume: a directory shared live between sandboxes, or with --disk an"
        " ext4 disk image (one writer at a time)",
    )
    create.add_argument("name")
    create.add_argument("--disk", metavar="SIZE", type=_disk_size,
                        help="make an ext4 disk volume of SIZE (e.g. 512M, 1G; whole MiB,"
                        " at least 16M); it takes host space only as it fills")  # fmt: skip
    create.set_defaults(handler=_create)

    ls = sub.add_parser("ls", help="list volumes")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=_ls)

    inspect = sub.add_parser("inspect", help="show a volume's record, path and holders")
    inspect.add_argument("name")
    inspect.set_defaults(handler=_inspect)

    rm = sub.add_parser("rm", help="remove volumes and their data (never one in use)")
    rm.add_argument("-f", "--force", action="store_true",
                    help="do not complain about volumes that do not exist")  # fmt: skip
    rm.add_argument("names", nargs="+")
    rm.set_defaults(handler=_rm)

    volume.set_defaults(handler=lambda _args: volume.print_help() or 2)


def _disk_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _create(args: argparse.Namespace) -> int:
    volume = VolumeStore().create(args.name, disk_size=args.disk)
    print(volume.name)
    return 0


def _ls(args: argparse.Namespace) -> int:
    volumes = VolumeStore().list()
    if args.json:
        print(json.dumps([v.to_dict() for v in volumes], indent=1))
        return 0
    print(f"{'NAME':<32} {'KIND':<9} {'SIZE':>10} {'IN USE':<6}  CREATED")
    for v in volumes:
        size = _human(v.size) if v.size is not None else "-"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created))
        in_use = "yes" if v.in_use() else "no"
        print(f"{v.name:<32} {v.kind:<9} {size:>10} {in_use:<6}  {created}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    volume: Volume = VolumeStore().get(args.name)
    doc = volume.to_dict()
    doc["holders"] = volume.holders()
    print(json.dumps(doc, indent=2))
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = VolumeStore()
    status = 0
    for name in args.names:
        try:
            store.remove(name)
        except VolumeError as exc:
            if args.force and isinstance(exc, VolumeNotFoundError):
                continue
            print(f"vmr: error: {exc}", file=sys.stderr)
            status = 1
        else:
            print(name)
    return status


def _human(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{nbytes} B"
