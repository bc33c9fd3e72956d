"""The content-addressed image cache on disk.

Who calls it: :mod:`vmruntime.images.pull` and :mod:`vmruntime.images.load` write
into it; the CLI and the sandbox code read from it.

What it promises (layout version 1, spec in ``docs/cache-layout.md``):

- blobs (manifests, configs, compressed layers) live once under
  ``blobs/sha256/<hex>``, whatever number of images use them (what else is made
  of a layer, such as its filesystem image, belongs to whoever makes it: see
  :mod:`vmruntime.rootfs.layers`);
- an entry appears only complete and verified: it is written under ``tmp/``,
  fsynced and renamed into place, so a crash or ``kill -9`` at any point leaves
  no half-written entry (at worst a stale temporary file that the next open or
  prune removes);
- writers hold a shared lock on the whole cache and ``prune`` an exclusive one,
  and each blob has its own lock, so concurrent pulls download it once;
- ``refs.json`` maps normalised references to manifest digests.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmruntime import _paths
from vmruntime._durable import fsync_dir
from vmruntime.errors import CacheError, DigestMismatchError, SizeMismatchError
from vmruntime.images.manifest import is_digest

LAYOUT_VERSION = 1
ENV_CACHE_DIR = _paths.ENV_CACHE
_LAYOUT_FILE = "layout.json"
_REFS_FILE = "refs.json"


def default_cache_dir() -> Path:
    """``$VMRUNTIME_CACHE``, else ``$XDG_CACHE_HOME/vmruntime``, else ``~/.cache/vmruntime``."""
    return _paths.cache_root()


def _hex(digest: str) -> str:
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.split(":", 1)[1]


@dataclass
class RefRecord:
    """What a reference points to in the cache."""

    reference: str
    manifest: str
    media_type: str
    index: str | None = None
    platform: str | None = None
    source: str = ""
    updated: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "mediaType": self.media_type,
            "index": self.index,
            "platform": self.platform,
            "source": self.source,
            "updated": self.updated,
        }

    @classmethod
    def from_json(cls, reference: str, data: dict[str, Any]) -> RefRecord:
        return cls(
            reference=reference,
            manifest=data["manifest"],
            media_type=data.get("mediaType", ""),
            index=data.get("index"),
            platform=data.get("platform"),
            source=data.get("source", ""),
            updated=float(data.get("updated", 0.0)),
        )


class StagedBlob:
    """A blob being written under ``tmp/``: hashed as it is written, verified on commit.

    Writers call :meth:`write` with chunks, :meth:`reset` to start over after a
    broken transfer, then :meth:`verify` and :meth:`commit`; :meth:`discard`
    (also on ``__exit__`` without commit) removes the temporary file.
    """

    def __init__(self, store: ImageStore, digest: str, size: int | None, what: str) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.what = what
        self.path = store.temp_path(_hex(digest)[:16])
        self._file = self._open()
        self._hash = hashlib.sha256()
        self.written = 0
        self.committed = False

    def _open(self):
        try:
            return open(self.path, "wb")
        except OSError as exc:
            raise self.store.os_error(exc, self.path) from exc

    def write(self, chunk: bytes) -> None:
        if self.size is not None and self.written + len(chunk) > self.size:
            raise SizeMismatchError(self.what, self.size, self.written + len(chunk))
        try:
            self._file.write(chunk)
        except OSError as exc:
            raise self.store.os_error(exc, self.path) from exc
        self._hash.update(chunk)
        self.written += len(chunk)

    def reset(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.written = 0

    def verify(self) -> None:
        """Raise SizeMismatchError or DigestMismatchError unless the bytes are the blob."""
        if self.size is not None and self.written != self.size:
            raise SizeMismatchError(self.what, self.size, self.written)
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise DigestMismatchError(self.what, self.digest, actual)

    def finish_writing(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise self.store.os_error(exc, self.path) from exc
        self._file.close()

    def commit(self) -> Path:
        """Verify, fsync and rename into ``blobs/``; returns the blob's path."""
        self.verify()
        if not self._file.closed:
            self.finish_writing()
        dest = self.store.blob_path(self.digest)
        self.store.install(self.path, dest)
        self.committed = True
        return dest

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> StagedBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class ImageStore:
    """The on-disk cache of images: verified blobs and the reference index."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = _paths.cache_root(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / _paths.TMP_DIR
        self.locks_dir = self.root / _paths.LOCKS_DIR
        self._open_layout()

    # --- layout ----------------------------------------------------------

    def _open_layout(self) -> None:
        try:
            for directory in (self.blobs_dir, self.tmp_dir, self.locks_dir):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.os_error(exc, self.root) from exc
        layout = self.root / _LAYOUT_FILE
        if not layout.exists():
            self.write_atomic(layout, json.dumps({"version": LAYOUT_VERSION}).encode())
        try:
            version = json.loads(layout.read_bytes()).get("version")
        except (OSError, ValueError) as exc:
            raise CacheError(layout, f"unreadable layout file ({exc})") from None
        if version != LAYOUT_VERSION:
            raise CacheError(
                self.root,
                f"layout version {version!r} is not {LAYOUT_VERSION}; "
                f"use another {ENV_CACHE_DIR} or remove this cache",
            )
        self._remove_stale_temp_files()

    def os_error(self, exc: OSError, path: Path | str) -> CacheError:
        """Turn an OSError on a cache path into a CacheError that names it."""
        if exc.errno == errno.ENOSPC:
            return CacheError(path, "no space left on device")
        return CacheError(path, exc.strerror or str(exc))

    # --- paths -----------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / _hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise CacheError(self.blob_path(digest), f"blob {digest} is missing") from None

    def temp_path(self, label: str) -> Path:
        """A fresh path under ``tmp/`` whose name says which process owns it."""
        return _paths.cache_temp(label, self.root)

    # --- atomic writes ---------------------------------------------------

    def install(self, temp: Path, dest: Path) -> None:
        """Rename a complete, fsynced temporary file into place and make it durable."""
        try:
            os.replace(temp, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            raise self.os_error(exc, dest) from exc

    def write_atomic(self, dest: Path, data: bytes) -> None:
        temp = self.temp_path(dest.name)
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.install(temp, dest)
        except OSError as exc:
            raise self.os_error(exc, dest) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def stage_blob(self, digest: str, size: int | None, what: str) -> StagedBlob:
        return StagedBlob(self, digest, size, what)

    def put_blob(self, data: bytes, digest: str, what: str) -> Path:
        """Store small in-memory content (a manifest, a config) after checking its digest."""
        if self.has_blob(digest):
            return self.blob_path(digest)
        with self.stage_blob(digest, len(data), what) as staged:
            staged.write(data)
            return staged.commit()

    # --- locks -----------------------------------------------------------

    def lock(self, name: str, *, shared: bool = False) -> contextlib.AbstractContextManager[bool]:
        """An advisory flock on ``locks/<name>.lock``; released when the block ends."""
        return _paths.flock(self.locks_dir / f"{name}.lock", shared=shared)

    def writing(self) -> contextlib.AbstractContextManager[bool]:
        """Held (shared) by every writer so that prune never runs beneath one."""
        return _paths.cache_writing(self.root)

    def blob_lock(self, digest: str) -> contextlib.AbstractContextManager[bool]:
        return self.lock(f"blob-{_hex(digest)}")

    # --- references ------------------------------------------------------

    def _read_refs(self) -> dict[str, dict[str, Any]]:
        path = self.root / _REFS_FILE
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CacheError(path, f"unreadable reference index ({exc})") from None
        if doc.get("version") != LAYOUT_VERSION or not isinstance(doc.get("refs"), dict):
            raise CacheError(path, "reference index of an unknown version")
        return doc["refs"]

    def _write_refs(self, refs: dict[str, dict[str, Any]]) -> None:
        doc = {"version": LAYOUT_VERSION, "refs": dict(sorted(refs.items()))}
        self.write_atomic(self.root / _REFS_FILE, json.dumps(doc, indent=1).encode())

    def list_refs(self) -> list[RefRecord]:
        return [RefRecord.from_json(ref, data) for ref, data in self._read_refs().items()]

    def get_ref(self, reference: str) -> RefRecord | None:
        data = self._read_refs().get(reference)
        return RefRecord.from_json(reference, data) if data else None

    def set_ref(self, record: RefRecord) -> None:
        with self.lock("refs"):
            refs = self._read_refs()
            refs[record.reference] = record.to_json()
            self._write_refs(refs)

    def remove_ref(self, reference: str) -> bool:
        with self.lock("refs"):
            refs = self._read_refs()
            if reference not in refs:
                return False
            del refs[reference]
            self._write_refs(refs)
            return True

    # --- garbage collection ----------------------------------------------

    def prune(self, referenced_blobs: frozenset[str]) -> PruneResult:
        """Delete blobs outside ``referenced_blobs`` (with their locks) and all temp files.

        The caller computes the set from the references while holding
        :meth:`exclusive`; see :func:`vmruntime.images.prune`.
        """
        result = PruneResult()
        for path in sorted(self.blobs_dir.iterdir()):
            if f"sha256:{path.name}" not in referenced_blobs:
                result.add(path)
        for path in sorted(self.tmp_dir.iterdir()):
            result.add(path)
        # Also the locks of blobs that never arrived (a failed or cancelled download).
        for lock in self.locks_dir.glob("blob-*.lock"):
            blob = self.blobs_dir / lock.name.removeprefix("blob-").removesuffix(".lock")
            if not blob.exists():
                result.add_lock(lock)
        return result

    def exclusive(self) -> contextlib.AbstractContextManager[bool]:
        return _paths.cache_exclusive(self.root)

    def _remove_stale_temp_files(self) -> None:
        """Temporary files of processes that died (crash, kill -9) are garbage."""
        for path in self.tmp_dir.iterdir():
            pid_text = path.name.split(".", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                _remove(path)


@dataclass
class PruneResult:
    """What a prune deleted: entries (counted) and their lock files (not counted)."""

    removed: list[Path] = field(default_factory=list)
    freed_bytes: int = 0

    def add(self, path: Path) -> None:
        self.freed_bytes += _allocated(path)
        _remove(path)
        self.removed.append(path)

    def add_lock(self, path: Path) -> None:
        """A lock file of a deleted entry: safe to delete, as every holder of an entry's
        lock holds the cache's writing lock, which the prune holds exclusively."""
        path.unlink(missing_ok=True)

    def merge(self, other: PruneResult) -> None:
        self.removed += other.removed
        self.freed_bytes += other.freed_bytes


def _allocated(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            return path.lstat().st_blocks * 512
        return 0
    return sum(_allocated(child) for child in path.iterdir())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
