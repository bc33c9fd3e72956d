"""snapshots: a sandbox's writable layer kept under a name, with a manifest that pins
its base image (a later issue adds memory and device state).

Who uses it: sandboxes (restore is the writable-layer step of creation), the Jupyter and
Ray front doors, and ``vmr snapshot``. Modules: ``names`` (valid names), ``manifest``
(schema 1, canonical JSON and its digest), ``seal`` (the layer in chunks; the content
digest that skips holes), ``store`` (the local store: whole snapshots or none),
``capture`` (a sandbox's layer, frozen, into the store), ``restore`` (a new sandbox's
layer as a copy-on-write overlay of a snapshot's), ``sandbox`` (the public
``Sandbox``/``AsyncSandbox`` with ``snapshot()`` and ``create(from_snapshot=)``),
``archive`` (one-file export and checked import), ``remote`` (the shared store on any
fsspec URL: push and checked pull), ``remote_images`` (a snapshot's base image pushed
with it and fetched back by digest), ``ensure`` (a local name or a store URL made ready
to restore on this machine, base image included), ``commands`` (``vmr snapshot``).
Formats: docs/snapshots.md.
"""

from vmruntime.snapshots.archive import ExportResult, export_snapshot, import_snapshot
from vmruntime.snapshots.ensure import ensure_local
from vmruntime.snapshots.manifest import CHUNK_SIZE, LayerInfo, Seal, SnapshotManifest
from vmruntime.snapshots.names import check_name
from vmruntime.snapshots.remote import PushResult, pull, push
from vmruntime.snapshots.restore import SnapshotLayer
from vmruntime.snapshots.sandbox import AsyncSandbox, Sandbox
from vmruntime.snapshots.seal import content_digest, iter_chunks
from vmruntime.snapshots.store import Snapshot, SnapshotStore

__all__ = [
    "CHUNK_SIZE",
    "AsyncSandbox",
    "ExportResult",
    "LayerInfo",
    "PushResult",
    "Sandbox",
    "Seal",
    "Snapshot",
    "SnapshotLayer",
    "SnapshotManifest",
    "SnapshotStore",
    "check_name",
    "content_digest",
    "ensure_local",
    "export_snapshot",
    "import_snapshot",
    "iter_chunks",
    "pull",
    "push",
]
