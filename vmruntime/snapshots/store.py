"""The local snapshot store: one directory per snapshot, made whole or not at all.

Who uses it: capture (``Sandbox.snapshot``), restore, import, pull, ``vmr snapshot``.
What it promises: ``<root>/<name>/manifest.json`` and the layer file beside it, files
0600 in 0700 directories (a snapshot may hold anything the guest wrote); a snapshot is
written in a private temporary directory and appears under its name by one rename,
after an fsync, so a crash leaves no half snapshot under a name (the leftover
``.tmp-*`` directory is ignored and removed by :meth:`SnapshotStore.prune_temp`).
The default root is ``<state dir>/snapshots`` (``$VMRUNTIME_STATE``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmruntime import _paths
from vmruntime._durable import fsync_dir, fsync_path
from vmruntime.errors import (
    SnapshotCorruptError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotManifestError,
    SnapshotNotFoundError,
)
from vmruntime.snapshots.manifest import SavedFile, SnapshotManifest
from vmruntime.snapshots.names import check_name
from vmruntime.snapshots.seal import content_digest

if TYPE_CHECKING:
    from vmruntime.snapshots.archive import ExportResult
    from vmruntime.snapshots.remote import PushResult

MANIFEST_FILE = "manifest.json"
_TEMP_PREFIX = ".tmp-"
_LOCKS_DIR = ".locks"  # never a snapshot: names start with a letter or a digit


@dataclass(frozen=True)
class Snapshot:
    """A snapshot in a local store."""

    path: Path
    manifest: SnapshotManifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def layer_path(self) -> Path:
        return self.path / self.manifest.layer.file

    @property
    def digest(self) -> str:
        return self.manifest.digest()

    def export(self, path: Path | str) -> ExportResult:
        """Write this snapshot to one archive file at ``path`` (docs/snapshots.md, "Export
        archive"); :func:`vmruntime.snapshots.archive.import_snapshot` reads it back."""
        from vmruntime.snapshots.archive import export_snapshot  # archive builds on the store

        return export_snapshot(self, path)

    def verify(self) -> None:
        """The layer is there with the manifest's size, and matches the seal if there is one;
        a memory snapshot's RAM and device state match their digests
        (:class:`SnapshotCorruptError` says what does not)."""
        try:
            size = self.layer_path.stat().st_size
        except FileNotFoundError:
            raise SnapshotCorruptError(self.name, f"{self.layer_path} is missing") from None
        if size != self.manifest.layer.apparent_size:
            raise SnapshotCorruptError(
                self.name, f"the layer holds {size} bytes, the manifest says "
                f"{self.manifest.layer.apparent_size}")  # fmt: skip
        seal = self.manifest.seal
        if seal is not None and (actual := content_digest(self.layer_path)) != seal.digest:
            raise SnapshotCorruptError(self.name, f"seal mismatch: sealed {seal.digest}, "
                                                  f"the layer is {actual}")  # fmt: skip
        memory = self.manifest.memory
        for saved in () if memory is None else (memory.ram, memory.state):
            self._verify_saved_file(saved)

    def _verify_saved_file(self, saved: SavedFile) -> None:
        """A memory snapshot's RAM or device state: there, its size, its digest."""
        path = self.path / saved.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise SnapshotCorruptError(self.name, f"{path} is missing") from None
        if size != saved.size or content_digest(path) != saved.digest:
            raise SnapshotCorruptError(self.name, f"{path} is not the file that was captured "
                                                  f"(digest {saved.digest})")  # fmt: skip

    def push(self, url: str, **options: Any) -> PushResult:
        """Send this snapshot to the shared store at ``url`` under its name
        (:func:`vmruntime.snapshots.remote.push`: ``storage_options``, ``progress``)."""
        from vmruntime.snapshots import remote  # it imports this module

        return remote.push(self, url, **options)

    @staticmethod
    def pull(url: str, name: str | None = None, store: SnapshotStore | None = None,
             **options: Any) -> Snapshot:  # fmt: skip
        """The snapshot at ``url`` (``<store URL>/<name>``) fetched, checked and committed
        into ``store`` (:func:`vmruntime.snapshots.remote.pull`)."""
        from vmruntime.snapshots import remote

        return remote.pull(url, name, store, **options)


class PendingSnapshot:
    """A snapshot being written (from :meth:`SnapshotStore.create`): write the layer into
    :attr:`path`, then :meth:`commit` the manifest."""

    def __init__(self, store: SnapshotStore, name: str, path: Path) -> None:
        self.store = store
        self.name = name
        self.path = path
        self.committed: Snapshot | None = None

    def commit(self, manifest: SnapshotManifest) -> Snapshot:
        if manifest.name != self.name:
            raise SnapshotError(f"manifest names {manifest.name!r}, not {self.name!r}")
        for file in manifest.files:
            path = self.path / file
            if not path.is_file():
                raise SnapshotError(f"snapshot {self.name!r}: no file {path}")
            os.chmod(path, 0o600)
            fsync_path(path)
        manifest_path = self.path / MANIFEST_FILE
        descriptor = os.open(manifest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(manifest.to_json())
            file.flush()
            os.fsync(file.fileno())
        fsync_dir(self.path)
        final = self.store.root / self.name
        try:
            os.rename(self.path, final)  # an empty directory of that name would be replaced
        except OSError as exc:
            raise SnapshotExistsError(self.name) from exc
        fsync_dir(self.store.root)
        self.committed = Snapshot(final, manifest)
        return self.committed


class SnapshotStore:
    """The snapshots of this machine (see the module)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else _paths.state_root() / "snapshots"

    def _ensure_root(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        return (self.root / check_name(name) / MANIFEST_FILE).is_file()

    def get(self, name: str) -> Snapshot:
        path = self.root / check_name(name)
        try:
            data = (path / MANIFEST_FILE).read_bytes()
        except FileNotFoundError:
            raise SnapshotNotFoundError(name) from None
        try:
            manifest = SnapshotManifest.from_json(data)
        except SnapshotManifestError as exc:
            raise SnapshotCorruptError(name, exc.reason) from None
        if manifest.name != name:
            raise SnapshotCorruptError(name, f"its manifest names {manifest.name!r}")
        return Snapshot(path, manifest)

    def list(self) -> list[Snapshot]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not (entry / MANIFEST_FILE).is_file():
                continue
            with contextlib.suppress(SnapshotError, ValueError):
                found.append(self.get(entry.name))
        return found

    def remove(self, name: str) -> None:
        snapshot_dir = self.root / check_name(name)
        if not (snapshot_dir / MANIFEST_FILE).is_file():
            raise SnapshotNotFoundError(name)
        # Out of sight first (one rename), then deleted: a crash leaves a .tmp- directory.
        doomed = self.root / f"{_TEMP_PREFIX}{name}-rm-{secrets.token_hex(4)}"
        os.rename(snapshot_dir, doomed)
        _make_writable(doomed)
        shutil.rmtree(doomed)

    def lock(self, name: str) -> contextlib.AbstractContextManager[bool]:
        """An exclusive ``flock`` for whoever is about to fetch snapshot ``name`` (in
        ``<root>/.locks/``): a second fetcher on this machine waits, then finds it there."""
        self._ensure_root()
        locks = self.root / _LOCKS_DIR
        locks.mkdir(mode=0o700, exist_ok=True)
        return _paths.flock(locks / f"{check_name(name)}.lock")

    @contextlib.contextmanager
    def create(self, name: str) -> Iterator[PendingSnapshot]:
        """A private directory to write snapshot ``name`` into; :meth:`PendingSnapshot.commit`
        makes it appear. Anything else (an exception, no commit) leaves nothing behind."""
        check_name(name)
        self._ensure_root()
        if self.exists(name):
            raise SnapshotExistsError(name)
        path = self.root / f"{_TEMP_PREFIX}{name}-{secrets.token_hex(6)}"
        path.mkdir(mode=0o700)
        pending = PendingSnapshot(self, name, path)
        try:
            yield pending
        finally:
            if pending.committed is None:
                _make_writable(path)
                shutil.rmtree(path, ignore_errors=True)

    def prune_temp(self) -> list[Path]:
        """Remove what interrupted writes and removals left; returns what it removed."""
        if not self.root.is_dir():
            return []
        removed = []
        for entry in self.root.iterdir():
            if entry.name.startswith(_TEMP_PREFIX) and entry.is_dir():
                _make_writable(entry)
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed


def _make_writable(directory: Path) -> None:
    """Restored-from layers are made read-only (0400); deleting needs the directory only,
    but rmtree's fallback paths chmod nothing, so do it here."""
    with contextlib.suppress(OSError):
        directory.chmod(0o700)
