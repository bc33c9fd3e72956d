"""The ``vmr`` command line (also ``python -m vmruntime``).

Each package declares its own commands (``images/commands.py``, ``vm/commands.py``,
``snapshots/commands.py``, ``pools/commands.py``, ``volumes/commands.py``,
``doctor/commands.py``); this module
puts them together and hands the image commands what the images package must not know
itself: how a layer becomes a filesystem, what else a prune may delete, and which images
snapshots pin; and ``vmr run`` how a snapshot is restored (``--snapshot``), which vm must
not know.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vmruntime.doctor.commands import add_commands as add_doctor_commands
from vmruntime.errors import VmruntimeError
from vmruntime.guest.assets import prune_guest_assets
from vmruntime.images.catalog import Referenced
from vmruntime.images.commands import add_commands as add_image_commands
from vmruntime.images.store import ImageStore, PruneResult
from vmruntime.pools.commands import add_commands as add_pool_commands
from vmruntime.rootfs.layers import ErofsLayers
from vmruntime.rootfs.writable import prune_templates
from vmruntime.snapshots.commands import add_commands as add_snapshot_commands
from vmruntime.snapshots.restore import restore_source
from vmruntime.snapshots.store import SnapshotStore
from vmruntime.vm.commands import add_commands as add_sandbox_commands
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
    add_image_commands(commands, layers=ErofsLayers, pruners=_PRUNERS, pins=_snapshot_pins)
    add_sandbox_commands(commands, restore=restore_source)
    add_volume_commands(commands)
    add_snapshot_commands(commands)
    add_pool_commands(commands)
    add_doctor_commands(commands)
    return parser


def _prune_layer_images(store: ImageStore, referenced: Referenced) -> PruneResult:
    return ErofsLayers(store).prune(referenced.diff_ids)


def _prune_templates(store: ImageStore, referenced: Referenced) -> PruneResult:
    return prune_templates(store.root)


def _prune_guest_assets(store: ImageStore, referenced: Referenced) -> PruneResult:
    return prune_guest_assets(store.root)


_PRUNERS = (_prune_layer_images, _prune_templates, _prune_guest_assets)


def _snapshot_pins() -> dict[str, list[str]]:
    """Base image manifest digest -> the snapshots that need it (prune keeps those)."""
    pins: dict[str, list[str]] = {}
    for snapshot in SnapshotStore().list():
        pins.setdefault(snapshot.manifest.image_manifest_digest, []).append(snapshot.name)
    return pins
