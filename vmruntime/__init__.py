"""vmruntime: run untrusted code in microVMs booted from OCI images.

The public API is what this module re-exports; everything else is private.
``pull``, ``load`` and ``resolve`` give bootable images (each layer's filesystem image
made too): :mod:`vmruntime.rootfs.bootable`.
Names are imported on first use, which keeps helper processes and the CLI quick
to start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmruntime._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "VmruntimeError": "vmruntime.errors",
    "AsyncSandbox": "vmruntime.snapshots",
    "ExecResult": "vmruntime.vm",
    "Mount": "vmruntime.vm",
    "Sandbox": "vmruntime.snapshots",
    "Snapshot": "vmruntime.snapshots",
    "SnapshotStore": "vmruntime.snapshots",
    "SandboxConfig": "vmruntime.vm",
    "ImageRecord": "vmruntime.images",
    "ImageStore": "vmruntime.images",
    "Reference": "vmruntime.images",
    "load": "vmruntime.rootfs",
    "parse_reference": "vmruntime.images",
    "pull": "vmruntime.rootfs",
    "resolve": "vmruntime.rootfs",
}

__all__ = [
    "AsyncSandbox",
    "ExecResult",
    "ImageRecord",
    "ImageStore",
    "Mount",
    "Reference",
    "Sandbox",
    "SandboxConfig",
    "Snapshot",
    "SnapshotStore",
    "VmruntimeError",
    "__version__",
    "load",
    "parse_reference",
    "pull",
    "resolve",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from vmruntime.errors import VmruntimeError
    from vmruntime.images import ImageRecord, ImageStore, Reference, parse_reference
    from vmruntime.rootfs import load, pull, resolve
    from vmruntime.snapshots import AsyncSandbox, Sandbox, Snapshot, SnapshotStore
    from vmruntime.vm import ExecResult, Mount, SandboxConfig
