"""Attach locks: one writer per disk image, and "in use" marks on named volumes.

Who calls it: :mod:`vmruntime.vm.sandbox` when it attaches a named volume
(:meth:`vmruntime.volumes.Volume.attach`) or a user's own disk image
(``--disk PATH:GUEST[:ro]``, :meth:`DiskAttachment.acquire`), and
:mod:`vmruntime.volumes.store` (``in_use``, ``remove``).

What it promises:

- a disk image has at most one writable attachment at a time, across processes
  and users: the writer holds ``flock(LOCK_EX)`` on the image file itself, and a
  second writer gets :class:`~vmruntime.errors.DiskInUseError` naming the path
  and (best effort) the holder. Read-only attachments take no lock and are
  always allowed, even next to a writer;
- every attachment of a named volume (either kind, either mode) holds
  ``flock(LOCK_SH)`` on ``<volume>/attach.lock``; the volume is "in use" while
  anyone does, and removal (``LOCK_EX``) is refused;
- the locks belong to open file descriptions, not to this process: pass
  :attr:`Attachment.fds` to QEMU or the broker (``pass_fds``) and the lock lives
  exactly as long as the last process holding a copy, even a detached VM after
  this process has exited. :meth:`Attachment.release` closes only our copies.

Why flock and not fcntl/OFD locks: QEMU itself takes OFD byte-range locks on the
image files it opens; flock locks are a separate kind on Linux and never
conflict with those (on NFS the kernel emulates flock with byte-range locks, so
use local filesystems for disk images).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import time
from pathlib import Path
from types import TracebackType

from vmruntime import _paths
from vmruntime.errors import (
    DiskInUseError,
    MountError,
    UnsafeDirectoryError,
    VolumeError,
    VolumeNotFoundError,
)

LOCK_NAME = "attach.lock"
HOLDERS_DIR = "holders"
# Holders of the volume lock in LOCK_EX take it only for an instant (a removal, an
# in_use probe), so an attacher waits this long before calling the volume busy.
_SHARED_LOCK_WAIT = 5.0


class Attachment:
    """Locks held for as long as a VM has a volume or disk image attached.

    Who makes it: :meth:`DiskAttachment.acquire` and
    :meth:`vmruntime.volumes.Volume.attach`. What it promises: while any copy of
    :attr:`fds` is open (ours, QEMU's, a broker's) the locks stay held;
    :meth:`release` is idempotent and closes only this process's copies.
    """

    def __init__(
        self,
        path: Path,
        *,
        readonly: bool,
        holder: str,
        fds: list[int],
        sidecars: list[tuple[Path, Path]],
    ) -> None:
        self.path = path
        self.readonly = readonly
        self.holder = holder
        self._fds = fds
        # (note, locked file): files naming the holder, removed on release once no
        # copy of the lock on the locked file remains (else they name QEMU's holder).
        self._sidecars = sidecars

    @property
    def fds(self) -> tuple[int, ...]:
        """Descriptors whose open file descriptions hold the locks (for ``pass_fds``)."""
        return tuple(self._fds)

    @property
    def released(self) -> bool:
        return not self._fds and not self._sidecars

    def release(self) -> None:
        """Close our copies of the lock descriptors (never LOCK_UN: that would also
        unlock the copies QEMU or a broker inherited)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        sidecars, self._sidecars = self._sidecars, []
        for sidecar, image in sidecars:
            _discard_sidecar(sidecar, image, self.holder)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<{type(self).__name__} {self.path} {mode} holder={self.holder!r} fds={self._fds}>"


class DiskAttachment(Attachment):
    """Held for as long as a VM has the disk attached.

    Who calls it: the sandbox, for each ``--disk PATH:GUEST[:ro]`` (a user's own
    raw image) and, through :meth:`vmruntime.volumes.Volume.attach`, for disk
    volumes. What it promises: at most one writable attachment per image; see
    the module docstring.
    """

    @classmethod
    def acquire(cls, path: Path, *, readonly: bool, holder: str) -> DiskAttachment:
        """Lock ``path`` for a writer (``LOCK_EX|LOCK_NB``), or check it for a reader.

        Raises :class:`DiskInUseError` if writable and another writer holds it,
        :class:`MountError` if ``path`` is not a regular file or block device.
        """
        path = Path(path)
        holder = holder_text(holder)
        fds: list[int] = []
        sidecars: list[tuple[Path, Path]] = []
        lock_image(path, readonly=readonly, holder=holder, fds=fds, sidecars=sidecars)
        return cls(path, readonly=readonly, holder=holder, fds=fds, sidecars=sidecars)


def lock_image(
    path: Path,
    *,
    readonly: bool,
    holder: str,
    fds: list[int],
    sidecars: list[tuple[Path, Path]],
) -> None:
    """Take the writer lock on a disk image (none for readers); append what we hold."""
    try:
        # O_NONBLOCK: opening a FIFO someone passed as a "disk" must not hang.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(str(path), f"cannot open disk image: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
            raise MountError(str(path), "a disk image must be a regular file or a block device")
        if readonly:
            # Readers take no lock: a read-only attach next to a writer is allowed.
            os.close(fd)
            return
        if not _try_flock(fd, fcntl.LOCK_EX):
            raise DiskInUseError(path, _read_sidecar(_image_sidecar(info)))
    except BaseException:
        os.close(fd)
        raise
    fds.append(fd)
    sidecar = _image_sidecar(info)
    if _write_sidecar(sidecar, holder):
        sidecars.append((sidecar, path))


def attach_volume(
    name: str, directory: Path, image: Path | None, *, readonly: bool, holder: str
) -> Attachment:
    """Mark volume ``name`` (at ``directory``) in use and, for a writable disk
    volume, take its image's writer lock. Used by :meth:`Volume.attach`."""
    holder = holder_text(holder)
    fds: list[int] = []
    sidecars: list[tuple[Path, Path]] = []
    try:
        fds.append(_shared_volume_lock(name, directory))
        holder_fd, holder_path = _holder_file(directory / HOLDERS_DIR, holder)
        fds.append(holder_fd)
        sidecars.append((holder_path, holder_path))
        if image is not None:
            lock_image(image, readonly=readonly, holder=holder, fds=fds, sidecars=sidecars)
    except BaseException:
        Attachment(
            directory, readonly=readonly, holder=holder, fds=fds, sidecars=sidecars
        ).release()
        raise
    target = image if image is not None else directory / "data"
    return Attachment(target, readonly=readonly, holder=holder, fds=fds, sidecars=sidecars)


def lock_held(path: Path) -> bool | None:
    """Does some open file hold a flock on ``path``? None if there is no such file.

    A probe: an instant ``LOCK_EX`` that is dropped at once.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def volume_in_use(directory: Path) -> bool:
    """Whether some attachment holds the volume's lock."""
    return lock_held(directory / LOCK_NAME) is True


def exclusive_volume_lock(name: str, directory: Path) -> int:
    """``LOCK_EX|LOCK_NB`` on the volume's lock, for removal; VolumeError if in use."""
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VolumeNotFoundError(name) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holders = volume_holders(directory)
        who = ", ".join(holders) or "a running sandbox"
        them = "them" if len(holders) > 1 else "it"
        raise VolumeError(name, f"in use by {who}; stop {them} first") from None
    if not _still_at(fd, directory / LOCK_NAME):
        # Another removal won and a new volume may have the name now: not ours.
        os.close(fd)
        raise VolumeNotFoundError(name)
    return fd


def volume_holders(directory: Path) -> list[str]:
    """Who holds the volume now (best effort); stale holder files are removed."""
    holders = []
    folder = directory / HOLDERS_DIR
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.name.startswith("."):
            continue
        text = _live_holder(entry)
        if text is not None:
            holders.append(text)
    return sorted(holders)


def _shared_volume_lock(name: str, directory: Path) -> int:
    lock_path = directory / LOCK_NAME
    deadline = time.monotonic() + _SHARED_LOCK_WAIT
    while True:
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VolumeNotFoundError(name) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise VolumeError(name, "is being created or removed; try again") from None
            time.sleep(0.01)
            continue
        # A removal renames the volume away while holding LOCK_EX; if we opened the
        # old lock file just before that, our lock is on a volume that is gone.
        if _still_at(fd, lock_path):
            return fd
        os.close(fd)
        if not lock_path.exists():
            raise VolumeNotFoundError(name)
        # Removed and created again meanwhile: lock the new one.


def _still_at(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not renamed away)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)


def _holder_file(folder: Path, holder: str) -> tuple[int, Path]:
    """A file naming ``holder`` whose LOCK_EX says the holder is alive.

    It is written under a dot name and renamed into place only once locked, so a
    reader never takes a holder that is still being written for a stale one.
    """
    folder.mkdir(exist_ok=True)
    token = secrets.token_hex(8)
    temp = folder / f".{token}"
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, holder.encode())
        os.rename(temp, folder / token)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    return fd, folder / token


def _live_holder(entry: Path) -> str | None:
    """The text of a holder file if its lock is held; a stale one is deleted."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 4096).decode(errors="replace").strip() or "?"
        # Nobody holds it: its holder is gone (released, or died).
        with contextlib.suppress(OSError):
            entry.unlink()
        return None
    finally:
        os.close(fd)


def holder_text(holder: str) -> str:
    """What names a holder: the caller's text (e.g. "sandbox 3f2a…"), else our pid."""
    return holder.strip()[:200] or f"pid {os.getpid()}"


def _image_sidecar(info: os.stat_result) -> Path:
    # Keyed by the image's inode, so every path to the same file finds it, and kept
    # in our private runtime directory, never next to a user's image.
    return _paths.runtime_root() / "disk-holders" / f"{info.st_dev}-{info.st_ino}"


def _write_sidecar(sidecar: Path, holder: str) -> bool:
    """Best effort: an unwritable runtime directory only costs the holder's name."""
    with contextlib.suppress(OSError, UnsafeDirectoryError):
        _paths.ensure_runtime_root()
        sidecar.parent.mkdir(mode=0o700, exist_ok=True)
        temp = sidecar.with_name(f".{sidecar.name}.{secrets.token_hex(4)}")
        temp.write_text(holder)
        os.replace(temp, sidecar)
        return True
    return False


def _read_sidecar(sidecar: Path) -> str:
    try:
        return sidecar.read_text(errors="replace").strip()[:200]
    except OSError:
        return ""


def _try_flock(fd: int, operation: int) -> bool:
    """flock ``operation|LOCK_NB``, retried briefly: the probes in this module (and
    release) hold a lock for microseconds, and must not make a real attach fail."""
    for attempt in range(5):
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < 4:
                time.sleep(0.01)
    return False


def _discard_sidecar(sidecar: Path, locked: Path, holder: str) -> None:
    """Remove a holder note once no copy of the lock on ``locked`` is left."""
    try:
        fd = os.open(locked, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        # Still locked: QEMU (or the next writer) holds it; the note stays for them.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _read_sidecar(sidecar) == holder:  # not a later writer's note
            sidecar.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)
