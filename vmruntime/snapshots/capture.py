"""Capture: a sandbox's writable layer copied, consistent, into a new local snapshot.

Who calls it: ``Sandbox.snapshot`` / ``AsyncSandbox.snapshot`` (:mod:`.sandbox`) and
``vmr snapshot create``. What it promises:

- a running sandbox's layer is copied while its guest holds it frozen
  (:meth:`~vmruntime.vm.AsyncSandbox.frozen`: synced, no write until the thaw), so the
  copy is a clean filesystem even while the guest writes; the sandbox goes on running;
  a stopped (``keep``) sandbox's layer is copied as it is (its agent synced and
  remounted it read-only at shutdown);
- the snapshot's layer is always a self-contained raw sparse image: a restored sandbox's
  layer (a qcow2 overlay over its snapshot's layer) is flattened into one
  (``qemu-img convert``), and the manifest records that snapshot as ``parent``. So a
  chain is never deeper than one: every restore stands on one raw layer, whatever its
  history (docs/snapshots.md, "Chains");
- the snapshot appears whole under its name or not at all (the store's temporary
  directory); its layer is then made read-only (0400): restored sandboxes stand on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from vmruntime import images
from vmruntime._blocking import in_thread
from vmruntime.errors import ImageNotFoundError, SandboxError, SnapshotError, VmruntimeError
from vmruntime.images.store import ImageStore
from vmruntime.rootfs.writable import sparse_copy
from vmruntime.snapshots.manifest import (
    MEMORY_SCHEMA_VERSION,
    LayerInfo,
    MemoryInfo,
    SavedFile,
    Seal,
    SnapshotManifest,
)
from vmruntime.snapshots.names import check_name
from vmruntime.snapshots.seal import content_digest
from vmruntime.snapshots.store import Snapshot, SnapshotStore
from vmruntime.vm import AsyncSandbox, MemoryImage, state
from vmruntime.vm.sandbox import DEFAULT_FREEZE_TIMEOUT

LAYER_FILE = "layer.img"
RAM_FILE = "memory.ram"
STATE_FILE = "machine.state"
READ_ONLY = 0o400


async def capture_memory(sandbox: AsyncSandbox, name: str, *, seal: bool = False,
                         labels: Mapping[str, str] | None = None,
                         store: SnapshotStore | None = None,
                         image_store: ImageStore | None = None) -> Snapshot:  # fmt: skip
    """Snapshot ``sandbox`` (running) as ``name`` with its whole machine: RAM and device
    state saved and the layer copied during one pause (:meth:`AsyncSandbox.save_machine`),
    so a sandbox restored from it resumes where this one was. The sandbox goes on running;
    its commands that were not started detached end (a resumed copy starts with a new
    agent connection, and so does the original)."""
    if not sandbox.running:
        raise SandboxError(sandbox.id, "is not running: a memory snapshot is taken of a "
                                       "running sandbox")  # fmt: skip
    check_name(name)
    store = store or SnapshotStore()
    record = sandbox.record
    layer_digests = await in_thread(_image_layer_digests, record, image_store)
    with store.create(name) as pending:
        dest = pending.path / LAYER_FILE
        saved = MemoryImage(pending.path / RAM_FILE, pending.path / STATE_FILE)

        async def copy_layer_while_paused() -> None:
            await in_thread(copy_layer, sandbox.writable_layer, record.writable_format, dest)

        await sandbox.save_machine(saved, during=copy_layer_while_paused)
        info = await in_thread(_layer_info, dest)
        memory = await in_thread(_memory_info, saved, sandbox)
        sealed = Seal(await in_thread(content_digest, dest)) if seal else None
        manifest = SnapshotManifest(
            name=name, image=record.image, image_manifest_digest=record.manifest_digest,
            image_layer_digests=layer_digests, layer=info,
            parent=record.layer_origin or None, labels=dict(labels or {}), seal=sealed,
            memory=memory, schema=MEMORY_SCHEMA_VERSION,
        )  # fmt: skip
        snapshot = await in_thread(pending.commit, manifest)
    os.chmod(snapshot.layer_path, READ_ONLY)  # restored sandboxes will stand on it
    return snapshot


def _memory_info(saved: MemoryImage, sandbox: AsyncSandbox) -> MemoryInfo:
    record = sandbox.record
    return MemoryInfo(ram=_saved_file(saved.ram), state=_saved_file(saved.state),
                      cpus=record.cpus, memory_mib=record.memory_mib,
                      accelerator=record.accelerator,
                      mounts=tuple(m.place for m in sandbox.mounts))  # fmt: skip


def _saved_file(path: Path) -> SavedFile:
    return SavedFile(path.name, path.stat().st_size, content_digest(path))


async def capture_running(sandbox: AsyncSandbox, name: str, *, seal: bool = False,
                          labels: Mapping[str, str] | None = None,
                          store: SnapshotStore | None = None,
                          image_store: ImageStore | None = None,
                          freeze_timeout: float = DEFAULT_FREEZE_TIMEOUT) -> Snapshot:  # fmt: skip
    """Snapshot ``sandbox`` (running) as ``name``: its layer is copied while frozen."""
    if not sandbox.running:
        raise SandboxError(sandbox.id, "is not running: snapshot a stopped sandbox by its id "
                                       "(it must have been kept: `vmr run --keep`)")  # fmt: skip
    return await _capture(sandbox.record, sandbox.writable_layer, name, seal=seal,
                          labels=labels, store=store, image_store=image_store,
                          hold=lambda: sandbox.frozen(freeze_timeout))  # fmt: skip


async def capture_stopped(record: state.SandboxRecord, name: str, *, seal: bool = False,
                          labels: Mapping[str, str] | None = None,
                          store: SnapshotStore | None = None,
                          image_store: ImageStore | None = None) -> Snapshot:  # fmt: skip
    """Snapshot the stopped sandbox ``record`` names (its layer was kept) as ``name``."""
    if record.status != "stopped":
        raise SandboxError(record.id, f"is {record.status}: a running sandbox is captured "
                                      "through its agent (attach to it)")  # fmt: skip
    layer = state.SandboxPaths(record.id).writable
    if not layer.is_file():
        raise SandboxError(record.id, f"has no writable layer ({layer}): it was not kept")
    return await _capture(record, layer, name, seal=seal, labels=labels, store=store,
                          image_store=image_store, hold=_nothing_to_hold)  # fmt: skip


@asynccontextmanager
async def _nothing_to_hold() -> AsyncIterator[None]:
    yield  # a stopped sandbox's layer does not change


async def _capture(record: state.SandboxRecord, layer: Path, name: str, *, seal: bool,
                   labels: Mapping[str, str] | None, store: SnapshotStore | None,
                   image_store: ImageStore | None,
                   hold: Callable[[], AbstractAsyncContextManager[None]]) -> Snapshot:  # fmt: skip
    check_name(name)
    store = store or SnapshotStore()
    # Before anything is frozen or copied: the manifest pins the image by its digests.
    layer_digests = await in_thread(_image_layer_digests, record, image_store)
    with store.create(name) as pending:
        dest = pending.path / LAYER_FILE
        async with hold():
            await in_thread(copy_layer, layer, record.writable_format, dest)
        info = await in_thread(_layer_info, dest)
        sealed = Seal(await in_thread(content_digest, dest)) if seal else None
        manifest = SnapshotManifest(
            name=name, image=record.image, image_manifest_digest=record.manifest_digest,
            image_layer_digests=layer_digests, layer=info,
            parent=record.layer_origin or None, labels=dict(labels or {}), seal=sealed,
        )  # fmt: skip
        snapshot = await in_thread(pending.commit, manifest)
    os.chmod(snapshot.layer_path, READ_ONLY)  # restored sandboxes will stand on it
    return snapshot


def _image_layer_digests(record: state.SandboxRecord,
                         image_store: ImageStore | None) -> tuple[str, ...]:  # fmt: skip
    try:
        image = images.resolve(record.manifest_digest, image_store or ImageStore())
    except ImageNotFoundError:
        raise SnapshotError(
            f"sandbox {record.id}: its image {record.image} ({record.manifest_digest}) is no "
            "longer in the cache; the snapshot must pin it: pull it again "
            f"(vmr image pull {pull_reference(record.image, record.manifest_digest)})"
        ) from None
    return tuple(layer.digest for layer in image.manifest.layers)


def pull_reference(reference: str, digest: str) -> str:
    """``REPOSITORY@DIGEST``: what ``vmr image pull`` takes to fetch exactly that image."""
    try:
        return f"{images.parse_reference(reference).name}@{digest}"
    except VmruntimeError:
        return f"{reference}@{digest}"


def copy_layer(source: Path, source_format: str, dest: Path) -> None:
    """``dest``: a raw sparse copy of the layer ``source`` (raw, or a qcow2 overlay, which is
    flattened with its backing file)."""
    if source_format == "raw":
        try:
            sparse_copy(source, dest)
        except VmruntimeError as exc:
            raise SnapshotError(f"copying the writable layer {source}: {exc}") from exc
        return
    if source_format != "qcow2":
        raise SnapshotError(f"writable layer {source}: unknown format {source_format!r}")
    # -U: the running QEMU holds the image's write lock; the guest's freeze (or its
    # shutdown) is what makes reading it safe. -S 4k: zero runs become holes again.
    _run_tool(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", "-S", "4k",
               str(source), str(dest)])  # fmt: skip
    with open(dest, "rb+") as file:
        os.fsync(file.fileno())


def _run_tool(argv: list[str]) -> None:
    if shutil.which(argv[0]) is None:
        raise SnapshotError(f"{argv[0]} is not on PATH (apt-get install qemu-utils)")
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SnapshotError(f"{' '.join(argv[:2])} failed: {result.stderr.strip()[-2000:]}")


def _layer_info(path: Path) -> LayerInfo:
    status = path.stat()
    return LayerInfo(apparent_size=status.st_size, allocated_size=status.st_blocks * 512,
                     file=path.name, format="raw")  # fmt: skip
