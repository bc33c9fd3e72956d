"""Named volumes on the host: ``<state>/volumes/<name>/``.

Who calls it: the ``vmr volume`` commands and :mod:`vmruntime.vm.sandbox`
(resolving ``--volume NAME:GUEST``). What it promises:

- a volume is a directory (``data/``, served live to every sandbox that mounts
  it by the virtio-fs broker) or a sparse ext4 image (``disk.img``, attached as
  a block device, one writer at a time), described by a versioned
  ``volume.json`` (see docs/volumes.md);
- creation is atomic: everything is built in a dot-named temporary directory
  next to the volumes and renamed into place, so a volume either exists
  complete or not at all; a failure (disk full, mkfs.ext4 missing) leaves
  nothing and raises :class:`~vmruntime.errors.VolumeError` with the reason;
- a volume attached by a sandbox is never removed (see
  :mod:`vmruntime.volumes.attach`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmruntime import _paths
from vmruntime._durable import fsync_dir
from vmruntime._ext4 import MIN_SIZE, make_ext4, size_problem
from vmruntime.errors import DiskImageError, VolumeError, VolumeNotFoundError
from vmruntime.volumes.attach import (
    HOLDERS_DIR,
    LOCK_NAME,
    Attachment,
    attach_volume,
    exclusive_volume_lock,
    lock_held,
    volume_holders,
    volume_in_use,
)

RECORD_VERSION = 1
RECORD = "volume.json"
DATA_DIR = "data"
DISK_IMAGE = "disk.img"
DISK_FORMAT = "ext4"
MIN_DISK_SIZE = MIN_SIZE
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
_SIZE = re.compile(r"(\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# A temporary creation directory whose creator holds no lock and which is older
# than this was left by a creator killed before it could take the lock.
_STALE_TEMP_AGE = 600.0


def default_root() -> Path:
    """``<state>/volumes``, ``<state>`` as for sandboxes (docs/sandboxes.md)."""
    return _paths.state_root() / "volumes"


def validate_name(name: str) -> str:
    """``name`` if it is a valid volume name (as Docker's), else VolumeError naming it."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise VolumeError(
            str(name),
            "invalid volume name: use 1 to 64 of a-z A-Z 0-9 _ . -, starting with a letter"
            " or digit",
        )
    return name


def parse_size(text: str) -> int:
    """Bytes in ``text``: "1048576", "512M", "1G", "1GiB", "64k" (binary units).

    Raises :class:`ValueError` naming the text.
    """
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid size {text!r}: want a number of bytes or a K, M, G, T suffix")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]


@dataclass(frozen=True)
class Volume:
    """One named volume, as its ``volume.json`` describes it.

    Who makes it: :class:`VolumeStore`. ``path`` is what a sandbox attaches: the
    shared directory (``kind == "directory"``) or the ext4 image (``"disk"``);
    ``size`` is the image's size in bytes (None for a directory).
    """

    name: str
    kind: str
    path: Path
    size: int | None
    created: float

    @property
    def directory(self) -> Path:
        """``<root>/<name>``: the record, the lock and ``path`` live here."""
        return self.path.parent

    def in_use(self) -> bool:
        """Whether some sandbox has it attached now (any mode)."""
        return volume_in_use(self.directory)

    def holders(self) -> list[str]:
        """Who has it attached (best effort: the holder texts given to ``attach``)."""
        return volume_holders(self.directory)

    def attach(self, *, readonly: bool, holder: str) -> Attachment:
        """Mark the volume in use for as long as the returned locks live.

        Pass ``Attachment.fds`` to the process that serves the volume (the broker
        for a directory, QEMU for a disk) so the mark lasts as long as it does. A
        writable attach of a disk volume also takes the image's single-writer
        lock: :class:`~vmruntime.errors.DiskInUseError` if another writer has it.
        """
        image = self.path if self.kind == "disk" else None
        return attach_volume(self.name, self.directory, image, readonly=readonly, holder=holder)

    def disk_usage(self) -> int | None:
        """Bytes the disk image really occupies on the host (sparse); None for a directory."""
        if self.kind != "disk":
            return None
        try:
            return os.stat(self.path).st_blocks * 512
        except OSError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``vmr volume ls --json`` and ``inspect`` print."""
        doc: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "path": str(self.path),
            "size": self.size,
            "created": self.created,
            "in_use": self.in_use(),
        }
        if self.kind == "disk":
            doc["format"] = DISK_FORMAT
            doc["disk_usage"] = self.disk_usage()
        return doc


class VolumeStore:
    """The named volumes under one root (default ``<state>/volumes``).

    Who calls it: the ``vmr volume`` CLI and the sandbox code (to resolve
    ``--volume NAME:GUEST``). Safe to use from several processes at once: names
    are claimed by an atomic rename, and removal is serialised against attaches
    by the volume's lock.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def create(self, name: str, *, disk_size: int | None = None) -> Volume:
        """A new directory volume, or a ``disk_size``-byte ext4 disk volume.

        VolumeError if the name is invalid or taken, the size is not whole MiB of
        at least 16 MiB, or creation fails (nothing is left behind then).
        """
        validate_name(name)
        problem = None if disk_size is None else size_problem(disk_size)
        if problem is not None:
            raise VolumeError(name, f"disk size {disk_size!r}: {problem}")
        target = self.root / name
        if target.exists():
            raise VolumeError(name, "already exists")
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise VolumeError(name, f"cannot create {self.root}: {exc.strerror}") from None
        self._prune_temporaries()
        temp = self.root / f".create-{name}-{secrets.token_hex(4)}"
        lock_fd = -1
        try:
            temp.mkdir(mode=0o700)
            # Held until the rename: marks the temporary as alive (see _prune_temporaries)
            # and makes attachers of the new volume wait until it is complete. Locked
            # before it gets its name, so no pruner ever sees it unlocked.
            unnamed = temp / f".{LOCK_NAME}"
            lock_fd = os.open(unnamed, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            os.rename(unnamed, temp / LOCK_NAME)
            (temp / HOLDERS_DIR).mkdir(mode=0o700)
            record: dict[str, Any] = {
                "version": RECORD_VERSION,
                "name": name,
                "kind": "disk" if disk_size is not None else "directory",
                "created": time.time(),
            }
            if disk_size is None:
                (temp / DATA_DIR).mkdir(mode=0o755)
            else:
                _make_disk(name, temp / DISK_IMAGE, disk_size)
                record["size"] = disk_size
                record["format"] = DISK_FORMAT
            _write_json(temp / RECORD, record)
            fsync_dir(temp)
            try:
                # A directory never replaces a non-empty one: losing a race for the
                # name fails here instead of clobbering the winner.
                os.rename(temp, target)
            except OSError as exc:
                if target.exists():
                    raise VolumeError(name, "already exists") from None
                raise exc
            fsync_dir(self.root)
        except VolumeError:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            where = f" ({exc.filename})" if exc.filename else ""
            raise VolumeError(name, f"cannot create: {exc.strerror or exc}{where}") from None
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)
        return self.get(name)

    def get(self, name: str) -> Volume:
        """The volume called ``name``; VolumeNotFoundError if there is none."""
        validate_name(name)
        return _read_volume(name, self.root / name)

    def list(self) -> list[Volume]:
        """Every volume, by name; unreadable entries are skipped."""
        volumes = []
        for entry in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if entry.name.startswith(".") or not _NAME.fullmatch(entry.name):
                continue
            with contextlib.suppress(VolumeError):
                volumes.append(_read_volume(entry.name, entry))
        return volumes

    def remove(self, name: str) -> None:
        """Delete the volume and its data; VolumeError if a sandbox has it attached.

        The volume disappears atomically (renamed away under its lock, then
        deleted), so an attach racing with the removal either wins and makes the
        removal fail, or fails itself with VolumeNotFoundError.
        """
        volume = self.get(name)
        lock_fd = exclusive_volume_lock(name, volume.directory)
        try:
            # Somebody may have attached the image by its path (--disk PATH), not as
            # a volume: its writer lock still says the disk is in use.
            if volume.kind == "disk" and _writer_attached(volume.path):
                raise VolumeError(name, f"in use: {volume.path} is attached writable")
            doomed = self.root / f".rm-{name}-{secrets.token_hex(4)}"
            os.rename(volume.directory, doomed)
            fsync_dir(self.root)
        except OSError as exc:
            raise VolumeError(name, f"cannot remove: {exc.strerror or exc}") from None
        finally:
            os.close(lock_fd)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune_temporaries(self) -> None:
        """Delete what killed creators and removers left (best effort)."""
        for entry in self.root.iterdir():
            # A renamed-away volume is garbage whoever deletes it; a creation only
            # once its creator is gone.
            removing = entry.name.startswith(".rm-")
            if removing or (entry.name.startswith(".create-") and _abandoned(entry)):
                shutil.rmtree(entry, ignore_errors=True)


def _writer_attached(image: Path) -> bool:
    return lock_held(image) is True


def _abandoned(temp: Path) -> bool:
    try:
        held = lock_held(temp / LOCK_NAME)
    except OSError:
        return False
    if held is None:
        # Its creator died between mkdir and taking the lock (or is just there now).
        try:
            return time.time() - temp.stat().st_mtime > _STALE_TEMP_AGE
        except OSError:
            return False
    return not held


def _read_volume(name: str, directory: Path) -> Volume:
    record_path = directory / RECORD
    try:
        doc = json.loads(record_path.read_text())
    except FileNotFoundError:
        raise VolumeNotFoundError(name) from None
    except (OSError, ValueError) as exc:
        raise VolumeError(name, f"unreadable {record_path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
        version = doc.get("version") if isinstance(doc, dict) else None
        raise VolumeError(
            name, f"{record_path}: record version {version!r} is not {RECORD_VERSION}"
        )
    kind = doc.get("kind")
    if doc.get("name") != name or kind not in ("directory", "disk"):
        raise VolumeError(name, f"{record_path}: bad record (name or kind)")
    size = doc.get("size") if kind == "disk" else None
    if kind == "disk" and not isinstance(size, int):
        raise VolumeError(name, f"{record_path}: a disk volume without a size")
    return Volume(
        name=name,
        kind=kind,
        path=directory / (DISK_IMAGE if kind == "disk" else DATA_DIR),
        size=size,
        created=float(doc.get("created", 0.0)),
    )


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    with open(path, "x") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _make_disk(name: str, image: Path, size: int) -> None:
    """A sparse ``size``-byte ext4 image with a root-owned, empty root directory.

    The journal stays: a VM killed mid-write must not leave the user's data needing
    fsck (its blocks are only allocated as the guest writes through them).
    """
    try:
        make_ext4(image, size, journal=True)
    except DiskImageError as exc:
        raise VolumeError(name, exc.reason) from None
