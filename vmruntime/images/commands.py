"""``vmr image …``: the image half of the CLI.

Who calls it: :mod:`vmruntime.cli`, which registers these commands and hands in what
this package must not know itself: the layer handler that makes each pulled or
loaded layer bootable, and the pruners of what else the cache holds (layer images,
guest assets, writable-layer templates).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from vmruntime.errors import ImageError
from vmruntime.images import catalog
from vmruntime.images.default_image import ensure_default_image
from vmruntime.images.ingest import LayerHandler
from vmruntime.images.load import load
from vmruntime.images.progress import terminal_progress
from vmruntime.images.pull import pull
from vmruntime.images.store import ImageStore, PruneResult

LayerFactory = Callable[[ImageStore], LayerHandler]
StorePruner = Callable[[ImageStore, catalog.Referenced], PruneResult]
# Manifest digest -> the names of what pins it (snapshots); the images package does not
# know snapshots, so the CLI hands this in.
Pins = Callable[[], Mapping[str, Sequence[str]]]


def add_commands(commands: argparse._SubParsersAction, *,  # type: ignore[type-arg]
                 layers: LayerFactory | None = None,
                 pruners: Sequence[StorePruner] = (),
                 pins: Pins | None = None) -> None:  # fmt: skip
    image = commands.add_parser("image", help="manage OCI images in the local cache")
    sub = image.add_subparsers(title="image commands")
    wiring = _Wiring(layers, tuple(pruners), pins or dict)

    pull_ = sub.add_parser("pull", help="pull an image from a registry")
    pull_.add_argument("reference")
    pull_.add_argument("--platform", default="linux/amd64")
    pull_.set_defaults(handler=wiring.pull)

    load_ = sub.add_parser("load", help="load an OCI layout, OCI archive or docker-save tar")
    load_.add_argument("path")
    load_.add_argument("--tag", help="the reference to store the image under")
    load_.add_argument("--platform", default="linux/amd64")
    load_.set_defaults(handler=wiring.load)

    ls = sub.add_parser("ls", help="list cached images")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=_ls)

    inspect = sub.add_parser("inspect", help="show an image's manifest, config, layers")
    inspect.add_argument("reference")
    inspect.set_defaults(handler=wiring.inspect)

    rm = sub.add_parser("rm", help="remove an image reference (prune frees space)")
    rm.add_argument("references", nargs="+")
    rm.add_argument("--force", action="store_true",
                    help="remove it even if snapshots pin it (they cannot be restored then)")
    rm.set_defaults(handler=wiring.rm)

    prune = sub.add_parser("prune", help="delete what no image reference needs")
    prune.set_defaults(handler=wiring.prune)

    build = sub.add_parser("build-default", help="build the built-in default image")
    build.add_argument("--force", action="store_true", help="rebuild even if current")
    build.set_defaults(handler=wiring.build_default)
    image.set_defaults(handler=lambda _args: image.print_help() or 2)


class _Wiring:
    """The commands that use what the CLI handed in."""

    def __init__(self, layers: LayerFactory | None, pruners: tuple[StorePruner, ...],
                 pins: Pins) -> None:  # fmt: skip
        self._pins = pins
        self._layers = layers
        self._pruners = pruners

    def _handler(self, store: ImageStore) -> LayerHandler | None:
        return self._layers(store) if self._layers is not None else None

    def pull(self, args: argparse.Namespace) -> int:
        store = ImageStore()
        record = pull(args.reference, store=store, platform=args.platform,
                      progress=terminal_progress(), layers=self._handler(store))  # fmt: skip
        report = record.report
        if report is not None:
            print(
                f"pulled {record.reference} ({record.manifest_digest}): "
                f"{len(report.fetched)} blobs fetched ({size_text(report.bytes_fetched)}), "
                f"{len(report.reused)} already cached, in {report.seconds:.1f}s"
            )
        return 0

    def load(self, args: argparse.Namespace) -> int:
        store = ImageStore()
        record = load(args.path, args.tag, store=store, platform=args.platform,
                      progress=terminal_progress(), layers=self._handler(store))  # fmt: skip
        print(f"loaded {record.reference} ({record.manifest_digest})")
        return 0

    def inspect(self, args: argparse.Namespace) -> int:
        store = ImageStore()
        handler = self._handler(store)
        files = None if handler is None else partial(_existing, handler)
        print(json.dumps(catalog.inspect(args.reference, store, files), indent=2))
        return 0

    def prune(self, args: argparse.Namespace) -> int:
        store = ImageStore()
        also = [partial(pruner, store) for pruner in self._pruners]
        result = catalog.prune(store, also=also, pinned=self._pins().keys())
        print(f"removed {len(result.removed)} entries, freed {size_text(result.freed_bytes)}")
        return 0

    def rm(self, args: argparse.Namespace) -> int:
        store = ImageStore()
        pins = self._pins()
        for reference in args.references:
            pinned_by = pins.get(catalog.resolve(reference, store).manifest_digest, ())
            if pinned_by and not args.force:
                raise ImageError(f"image {reference} is the base of snapshots "
                                 f"{', '.join(sorted(pinned_by))}; remove them first, or pass "
                                 "--force (they cannot be restored until it is pulled again)")
        for reference in args.references:
            print(f"untagged {catalog.remove(reference, store)}")
        return 0

    def build_default(self, args: argparse.Namespace) -> int:
        store = ImageStore()
        into_cache = partial(load, store=store, layers=self._handler(store))
        reference = ensure_default_image(force=args.force, load=into_cache)
        print(f"default image ready: {reference}")
        return 0


def _existing(handler: LayerHandler, diff_id: str) -> str | None:
    path = handler.path(diff_id)
    return str(path) if path.exists() else None


def _ls(args: argparse.Namespace) -> int:
    rows = catalog.list_images()
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=1))
        return 0
    print(f"{'REFERENCE':<50} {'MANIFEST':<19} {'LAYERS':>6} {'SIZE':>10}  CREATED")
    for row in rows:
        print(
            f"{row.reference:<50} {row.manifest_digest[:19]:<19} {row.layers:>6} "
            f"{size_text(row.size):>10}  {row.created or '-'}"
        )
    return 0




def size_text(nbytes: int) -> str:
    """``nbytes`` for people: B, KiB, MiB or GiB."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"
