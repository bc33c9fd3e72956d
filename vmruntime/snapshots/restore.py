"""Restore: a new sandbox whose writable layer starts as a snapshot's.

Who calls it: ``Sandbox.create(from_snapshot=…)`` (:mod:`.sandbox`) and
``vmr run --snapshot``. What it promises:

- restoring costs the same whatever the snapshot holds: the new sandbox's layer is a
  qcow2 overlay (a quarter MiB, written from a cached template) whose backing file is
  the snapshot's layer, written by nobody (made 0400; QEMU opens a backing file
  read-only); the sandbox's writes go to its own overlay, so any number of restored
  sandboxes are independent of each other and of the snapshot;
- the base image must be in the cache with the manifest's exact digest; if it is not,
  :class:`~vmruntime.errors.SnapshotBaseImageError` says how to get it by digest
  (``vmr image pull REPOSITORY@DIGEST``) before anything is made;
- the layer's size is the snapshot's (the sandbox's ``writable_size`` does not apply);
- a memory snapshot resumes its saved machine (:class:`~vmruntime.vm.Resume`): the RAM
  file mapped copy-on-write (shared by every sandbox resumed from it), the device state
  checked against its digest first; its cpus and memory are the saved machine's.

The seam with :mod:`vmruntime.vm` (which must not import snapshots): :class:`SnapshotLayer`
is a :class:`~vmruntime.vm.WritableLayerSource` passed in a
:class:`~vmruntime.vm.CreationPlan`, and the config names the image by its digest.
"""

from __future__ import annotations

import os
import secrets
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmruntime import _paths, images
from vmruntime._durable import fsync_dir
from vmruntime.errors import (
    ImageNotFoundError,
    SnapshotBaseImageError,
    SnapshotCorruptError,
    SnapshotError,
)
from vmruntime.images.store import ImageStore
from vmruntime.rootfs.writable import templates_dir
from vmruntime.snapshots.capture import READ_ONLY, pull_reference
from vmruntime.snapshots.seal import content_digest
from vmruntime.snapshots.store import Snapshot, SnapshotStore
from vmruntime.vm import MadeLayer, MemoryImage, RestorePlan, Resume, SandboxConfig
from vmruntime.vm.accel import choose_accelerator


@dataclass(frozen=True)
class SnapshotLayer:
    """A :class:`~vmruntime.vm.WritableLayerSource`: a qcow2 overlay over ``snapshot``'s
    layer, which stays read-only."""

    snapshot: Snapshot

    def make(self, dest: Path, config: SandboxConfig, cache_root: Path) -> MadeLayer:
        backing = self.snapshot.layer_path.resolve()
        check_layer(self.snapshot)
        os.chmod(backing, READ_ONLY)
        temp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            make_overlay(backing, temp, cache_root)
            os.replace(temp, dest)
            fsync_dir(dest.parent)
        finally:
            temp.unlink(missing_ok=True)
        return MadeLayer(format="qcow2", origin=self.snapshot.digest)


# QEMU reads at most this many bytes of a backing file name.
_MAX_BACKING_NAME = 1023
_overlay_templates: dict[int, bytes] = {}


def make_overlay(backing: Path, dest: Path, cache_root: Path | None = None) -> None:
    """``dest``: an empty qcow2 overlay over the raw file ``backing`` (by absolute path).

    Written from a template (an empty overlay of that size with a placeholder backing
    name, made once by ``qemu-img create -u``) with the real name patched into its
    header: no process is started, so a restore costs a quarter-MiB write.
    """
    name = os.fsencode(backing)
    if len(name) > _MAX_BACKING_NAME:
        raise SnapshotError(f"{backing}: a backing file path of over {_MAX_BACKING_NAME} "
                            "bytes cannot be written into a qcow2 header")  # fmt: skip
    image = bytearray(_overlay_template(backing.stat().st_size, cache_root))
    offset, length = struct.unpack_from(">QI", image, 8)  # backing_file_offset, _size
    image[offset : offset + length] = name.ljust(length, b"\0")
    struct.pack_into(">I", image, 16, len(name))
    descriptor = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(image)
        file.flush()
        os.fsync(file.fileno())


def _overlay_template(size: int, cache_root: Path | None) -> bytes:
    """The empty overlay of ``size`` with a placeholder name: in memory, else in the
    cache's templates directory, else made by qemu-img (and kept in both)."""
    if (template := _overlay_templates.get(size)) is not None:
        return template
    path = templates_dir(cache_root) / f"qcow2-overlay-{size}.img"
    try:
        template = path.read_bytes()
    except FileNotFoundError:
        template = _new_overlay_template(size, path, cache_root)
    if template[:4] != b"QFI\xfb" or struct.unpack_from(">QI", template, 8)[1] != (
            _MAX_BACKING_NAME):  # fmt: skip
        raise SnapshotError(f"{path}: not an overlay template; remove it and try again")
    _overlay_templates[size] = template
    return template


def _new_overlay_template(size: int, path: Path, cache_root: Path | None) -> bytes:
    if shutil.which("qemu-img") is None:
        raise SnapshotError("qemu-img is not on PATH (apt-get install qemu-utils)")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _paths.cache_temp(path.name, cache_root)
    placeholder = "/" + "x" * (_MAX_BACKING_NAME - 1)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", placeholder,
            str(temp), str(size)]  # fmt: skip
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SnapshotError(f"qemu-img create: {result.stderr.strip()[-2000:]}")
        template = temp.read_bytes()
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return template


def check_layer(snapshot: Snapshot) -> None:
    """The layer is there with the manifest's size (a stat: restore never reads the data;
    ``verify`` checks the seal)."""
    try:
        size = snapshot.layer_path.stat().st_size
    except FileNotFoundError:
        raise SnapshotCorruptError(snapshot.name, f"{snapshot.layer_path} is missing") from None
    if size != snapshot.manifest.layer.apparent_size or snapshot.manifest.layer.format != "raw":
        raise SnapshotCorruptError(snapshot.name, f"its layer holds {size} bytes, the manifest "
                                   f"says {snapshot.manifest.layer.apparent_size}")  # fmt: skip


def base_image(snapshot: Snapshot, image_store: ImageStore | None = None) -> str:
    """The reference to create the restored sandbox from: the snapshot's image if it still
    names the pinned digest, else that digest (any reference to it will do)."""
    manifest = snapshot.manifest
    store = image_store or ImageStore()
    try:
        if images.resolve(manifest.image, store).manifest_digest == manifest.image_manifest_digest:
            return manifest.image
    except (ImageNotFoundError, ValueError):
        pass  # the reference is gone or moved on: the digest may still be cached
    try:
        images.resolve(manifest.image_manifest_digest, store)
    except ImageNotFoundError:
        hint = pull_reference(manifest.image, manifest.image_manifest_digest)
        raise SnapshotBaseImageError(snapshot.name, manifest.image,
                                     manifest.image_manifest_digest, hint) from None  # fmt: skip
    return manifest.image_manifest_digest


def restore_source(name: str, *, store: SnapshotStore | None = None,
                   image_store: ImageStore | None = None) -> RestorePlan:  # fmt: skip
    """How to make a sandbox restored from snapshot ``name``: its image, layer source and,
    for a memory snapshot, the saved machine to resume and its shape (blocking: reads the
    manifest, the image cache and the device state). Fails before anything is made when
    the snapshot is damaged or its base image is missing."""
    snapshot = (store or SnapshotStore()).get(name)
    check_layer(snapshot)
    image, layer = base_image(snapshot, image_store), SnapshotLayer(snapshot)
    memory = snapshot.manifest.memory
    if memory is None:
        return RestorePlan(image, layer)
    check_machine(snapshot)
    saved = MemoryImage(snapshot.path / memory.ram.file, snapshot.path / memory.state.file)
    return RestorePlan(image, layer, Resume(saved), cpus=memory.cpus, memory_mib=memory.memory_mib,
                       shares=memory.mounts)  # fmt: skip


def check_machine(snapshot: Snapshot) -> None:
    """A memory snapshot's saved machine can be resumed here: same accelerator, the RAM
    file of the manifest's size (and digest, if sealed), and the device state (which QEMU
    parses: a crafted one is an attack on it) exactly the one captured (its digest, read
    each time: ~200 KB)."""
    memory = snapshot.manifest.memory
    assert memory is not None
    here = choose_accelerator().name
    if memory.accelerator != here:
        raise SnapshotError(f"snapshot {snapshot.name!r}: its machine ran under "
                            f"{memory.accelerator}, this host runs VMs under {here}; a "
                            "memory snapshot resumes only under the same accelerator")  # fmt: skip
    # The RAM's digest costs a read of it (~0.2 s per 100 MB): checked on every resume
    # only when the snapshot was sealed; `verify`, import and pull always check it.
    sealed = snapshot.manifest.seal is not None
    for saved, check_digest in ((memory.ram, sealed), (memory.state, True)):
        path = snapshot.path / saved.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise SnapshotCorruptError(snapshot.name, f"{path} is missing") from None
        if size != saved.size:
            raise SnapshotCorruptError(snapshot.name, f"{path} holds {size} bytes, the "
                                       f"manifest says {saved.size}")  # fmt: skip
        if check_digest and (actual := content_digest(path, size)) != saved.digest:
            raise SnapshotCorruptError(snapshot.name, f"{path} was changed: its digest is "
                                       f"{actual}, the manifest says {saved.digest}")  # fmt: skip
