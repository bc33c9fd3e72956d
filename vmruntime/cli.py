"""The ``vmr`` command line (also ``python -m vmruntime``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from vmruntime import images
from vmruntime.errors import VmruntimeError
from vmruntime.images.progress import terminal_progress
from vmruntime.vm.commands import add_commands
from vmruntime.volumes.commands import add_commands as add_volume_commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except VmruntimeError as exc:
        print(f"vmr: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vmr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vmr image inspect X | head` is not an error
        sys.stderr.close()
        return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmr", description="Run untrusted code in microVMs.")
    commands = parser.add_subparsers(title="commands")
    image = commands.add_parser("image", help="manage OCI images in the local cache")
    image_commands = image.add_subparsers(title="image commands")

    pull = image_commands.add_parser("pull", help="pull an image from a registry")
    pull.add_argument("reference")
    pull.add_argument("--platform", default="linux/amd64")
    pull.set_defaults(handler=_image_pull)

    load = image_commands.add_parser(
        "load", help="load an OCI layout, OCI archive or docker-save tar"
    )
    load.add_argument("path")
    load.add_argument("--tag", help="the reference to store the image under")
    load.add_argument("--platform", default="linux/amd64")
    load.set_defaults(handler=_image_load)

    ls = image_commands.add_parser("ls", help="list cached images")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=_image_ls)

    inspect = image_commands.add_parser("inspect", help="show an image's manifest, config, layers")
    inspect.add_argument("reference")
    inspect.set_defaults(handler=_image_inspect)

    rm = image_commands.add_parser("rm", help="remove an image reference (prune frees space)")
    rm.add_argument("references", nargs="+")
    rm.set_defaults(handler=_image_rm)

    prune = image_commands.add_parser("prune", help="delete blobs no image references")
    prune.set_defaults(handler=_image_prune)

    build = image_commands.add_parser("build-default", help="build the built-in default image")
    build.add_argument("--force", action="store_true", help="rebuild even if current")
    build.set_defaults(handler=_image_build_default)
    image.set_defaults(handler=lambda _args: _usage(image))
    add_commands(commands)
    add_volume_commands(commands)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _image_pull(args: argparse.Namespace) -> int:
    record = images.pull(args.reference, platform=args.platform, progress=terminal_progress())
    report = record.report
    if report is not None:
        print(
            f"pulled {record.reference} ({record.manifest_digest}): "
            f"{len(report.fetched)} blobs fetched ({_size(report.bytes_fetched)}), "
            f"{len(report.reused)} already cached, in {report.seconds:.1f}s"
        )
    return 0


def _image_load(args: argparse.Namespace) -> int:
    record = images.load(args.path, args.tag, platform=args.platform, progress=terminal_progress())
    print(f"loaded {record.reference} ({record.manifest_digest})")
    return 0


def _image_ls(args: argparse.Namespace) -> int:
    rows = images.list_images()
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=1))
        return 0
    print(f"{'REFERENCE':<50} {'MANIFEST':<19} {'LAYERS':>6} {'SIZE':>10}  CREATED")
    for row in rows:
        print(
            f"{row.reference:<50} {row.manifest_digest[:19]:<19} {row.layers:>6} "
            f"{_size(row.size):>10}  {row.created or '-'}"
        )
    return 0


def _image_inspect(args: argparse.Namespace) -> int:
    print(json.dumps(images.inspect(args.reference), indent=2))
    return 0


def _image_rm(args: argparse.Namespace) -> int:
    for reference in args.references:
        print(f"untagged {images.remove(reference)}")
    return 0


def _image_prune(args: argparse.Namespace) -> int:
    result = images.prune()
    print(f"removed {len(result.removed)} entries, freed {_size(result.freed_bytes)}")
    return 0


def _image_build_default(args: argparse.Namespace) -> int:
    from vmruntime.images.default_image import ensure_default_image

    reference = ensure_default_image(force=args.force)
    print(f"default image ready: {reference}")
    return 0


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"
