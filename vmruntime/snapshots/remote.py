"""The shared snapshot store: snapshots pushed to and pulled from any fsspec URL.

Who calls it: :meth:`Snapshot.push`, :meth:`Snapshot.pull` and ``vmr snapshot push|pull``,
so every machine of a cluster can restore the same state. What it promises (layout:
docs/snapshots.md, "Shared store layout"):

- the store is content-addressed: ``chunks/sha256/<hex>`` holds one zstd-compressed
  chunk named by the SHA-256 of its *uncompressed* bytes, ``manifests/sha256/<hex>`` one
  snapshot index (the manifest and the chunk list of each data file: the layer, and a
  memory snapshot's RAM and device state) named by its own SHA-256, and
  ``names/<name>`` the index digest; zero chunks are never sent, and a chunk the store
  already has is not sent again (whichever file or snapshot sent it); pushed
  ``with_image``, the base image's blobs go in chunks too, listed by
  ``images/sha256/<manifest hex>`` (:mod:`.remote_images`);
- a push writes the name *last*, after everything it names, so a crash or two machines
  pushing at once never leave a name pointing at missing data (the last name written
  wins, and each names a complete snapshot);
- a pull checks everything it reads (the index against its digest, every chunk against
  its digest after a bounded decompression, the manifest, the seal if there is one, a
  memory snapshot's RAM and device state against their digests) and commits into the
  local store by one rename: on any mismatch nothing is imported and
  :class:`SnapshotStoreError` names the chunk or digest that failed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import os
import posixpath
import re
import secrets
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zstandard

from vmruntime.errors import (
    SnapshotCorruptError,
    SnapshotExistsError,
    SnapshotManifestError,
    SnapshotStoreError,
    VmruntimeError,
)
from vmruntime.snapshots.manifest import CHUNK_SIZE, DataFile, SnapshotManifest, canonical_json
from vmruntime.snapshots.names import check_name
from vmruntime.snapshots.seal import (
    Chunk,
    chunk_count,
    content_digest,
    iter_chunks,
    seal_of_chunk_digests,
    write_sparse,
)
from vmruntime.snapshots.store import Snapshot, SnapshotStore

if TYPE_CHECKING:
    from vmruntime.images.store import ImageStore
    from vmruntime.snapshots.remote_images import ImagePushResult

CHUNKS_DIR = "chunks/sha256"
INDEXES_DIR = "manifests/sha256"
NAMES_DIR = "names"
INDEX_KEYS = frozenset({"manifest", "chunks", "apparent_size"})  # a disk snapshot's index
# A memory snapshot's index says its version (a reader that predates it refuses its keys)
# and adds the chunk lists of the RAM and the device state.
MEMORY_INDEX_VERSION = 2
MEMORY_INDEX_KEYS = INDEX_KEYS | {"version", "memory"}
MEMORY_FILE_KEYS = frozenset({"size", "chunks"})
MAX_INDEX_BYTES = 64 << 20  # a 1 PiB layer's index is ~20 MB: anything larger is not ours
ZSTD_LEVEL = 3
TRANSFERS = 4  # chunks in flight at once: object stores reward concurrency
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` did: where the snapshot is now and what it had to send."""

    name: str
    url: str  # pull this URL to get the snapshot back
    index_digest: str  # "sha256:<hex>" of the snapshot index, what names/<name> holds
    chunks: int  # non-zero chunks of the layer (and of a memory snapshot's RAM and state)
    chunks_sent: int  # of which the store did not have yet
    bytes_sent: int  # compressed bytes of those chunks
    image: ImagePushResult | None = None  # what went of the base image (``with_image``)


class RemoteStore:
    """The root of a shared store on one fsspec filesystem (see the module).

    Who calls it: :func:`push` and :func:`pull` (open one with :meth:`open`; tests build
    one around a filesystem of their own). It only reads, writes and tests whole objects.
    """

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") if root not in ("", "/") else root
        stripped = url.rstrip("/")
        self.url = url if stripped.endswith(":") else stripped  # "memory://" stays whole

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> RemoteStore:
        import fsspec  # imported on use: the CLI's other commands never pay for it

        try:
            fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except (ImportError, ValueError, OSError) as exc:
            raise SnapshotStoreError(url, f"cannot open: {exc}") from None
        return cls(fs, root, url)

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative) if self.root else relative

    def where(self, relative: str) -> str:
        """``relative`` as a URL (for messages, and the URL a pull takes)."""
        return f"{self.url}{relative}" if self.url.endswith("/") else f"{self.url}/{relative}"

    def has(self, relative: str) -> bool:
        return bool(self.fs.exists(self.path(relative)))

    def read(self, relative: str, limit: int) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""
        data = self.fs.cat_file(self.path(relative), start=0, end=limit + 1)
        if len(data) > limit:
            raise SnapshotStoreError(self.url, f"{relative} is larger than {limit} bytes")
        return bytes(data)

    def write(self, relative: str, data: bytes) -> None:
        """Write one object whole. Object stores put atomically; a local directory gets a
        temporary file and a rename, so a crash never leaves a partial chunk under a
        digest (which a later push would trust and skip)."""
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem):
            _write_local(Path(self.path(relative)), data)
        else:
            self.fs.pipe_file(self.path(relative), data)

    def forget_listings(self) -> None:
        """Drop cached directory listings (s3fs keeps them): another machine may have
        written since."""
        with contextlib.suppress(AttributeError, NotImplementedError):
            self.fs.invalidate_cache()


# --- push ---------------------------------------------------------------------------------


def push(
    snapshot: Snapshot,
    url: str | RemoteStore,
    *,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    with_image: bool = False,
    image_store: ImageStore | None = None,
) -> PushResult:
    """Send ``snapshot`` to the store at ``url`` under its name (see the module).

    ``progress``: a bar on stderr (None: when stderr is a terminal).
    ``with_image``: also send its base image's blobs from ``image_store`` (default: this
    machine's cache), so a machine that cannot reach the image's registry, or whose image
    no registry serves, gets it from the store (:func:`.remote_images.push_image`).
    A sealed snapshot whose layer no longer matches its seal, or a memory snapshot whose
    RAM or device state no longer matches its digest, is refused
    (:class:`SnapshotCorruptError`) before its index and name are written.
    """
    from vmruntime.snapshots.remote_images import push_image  # it builds on this module

    remote = url if isinstance(url, RemoteStore) else RemoteStore.open(url, storage_options)
    manifest = snapshot.manifest
    name = check_name(snapshot.name)
    size = sum(data_file.size for data_file in manifest.data_files)
    remote.forget_listings()
    # The image first: its record must exist before a name can point at the snapshot.
    image = push_image(remote, snapshot, image_store, progress) if with_image else None
    digests: dict[str, dict[int, str]] = {}
    sent = sent_bytes = 0
    with progress_bar(size, f"push {name}", progress) as bar:
        for data_file in manifest.data_files:
            path = snapshot.path / data_file.file
            file_digests, file_sent, file_bytes = _send_chunks(remote, path, data_file, bar)
            digests[data_file.role] = file_digests
            sent, sent_bytes = sent + file_sent, sent_bytes + file_bytes
    _check_digests_before_push(snapshot, digests)
    index = snapshot_index(manifest, digests)
    index_hex = hashlib.sha256(index).hexdigest()
    index_path = f"{INDEXES_DIR}/{index_hex}"
    if not guard(remote, "check", index_path, lambda: remote.has(index_path)):
        guard(remote, "write", index_path, lambda: remote.write(index_path, index))
    # Last: only now does everything the name points at exist.
    name_path = f"{NAMES_DIR}/{name}"
    name_data = f"sha256:{index_hex}".encode()
    guard(remote, "write", name_path, lambda: remote.write(name_path, name_data))
    return PushResult(
        name=name,
        url=remote.where(name),
        index_digest=f"sha256:{index_hex}",
        chunks=sum(len(file_digests) for file_digests in digests.values()),
        chunks_sent=sent,
        bytes_sent=sent_bytes,
        image=image,
    )


def snapshot_index(manifest: SnapshotManifest, digests: Mapping[str, Mapping[int, str]]) -> bytes:
    """The index a store keeps for a snapshot, canonical JSON: its manifest, the hex digest
    of every non-zero chunk of the layer by index, and the layer's size; a memory
    snapshot's adds ``version`` and the same for its RAM and device state. ``digests``:
    each data file's chunk digests, by role ("layer", "ram", "state")."""
    document: dict[str, Any] = {
        "manifest": manifest.to_dict(),
        "chunks": _chunk_list(digests["layer"]),
        "apparent_size": manifest.layer.apparent_size,
    }
    if manifest.memory is not None:
        document["version"] = MEMORY_INDEX_VERSION
        document["memory"] = {
            data_file.role: {"size": data_file.size, "chunks": _chunk_list(digests[data_file.role])}
            for data_file in manifest.data_files
            if data_file.role != "layer"
        }
    return canonical_json(document)


def _chunk_list(digests: Mapping[int, str]) -> list[list[int | str]]:
    return [[index, digests[index]] for index in sorted(digests)]


def _send_chunks(
    remote: RemoteStore, path: Path, data_file: DataFile, bar: Any
) -> tuple[dict[int, str], int, int]:
    """Send a data file's non-zero chunks the store lacks; their digests by index, how
    many were sent and their compressed bytes."""
    try:
        return send_chunks(remote, iter_chunks(path, data_file.size), bar)
    except (ValueError, FileNotFoundError) as exc:  # the local file is not what it says
        what = "layer" if data_file.role == "layer" else f"{data_file.role} file"
        raise SnapshotStoreError(remote.url, f"cannot read the local {what}: {exc}") from None


def send_chunks(
    remote: RemoteStore, chunks: Iterable[Chunk], bar: Any
) -> tuple[dict[int, str], int, int]:
    """Send the non-zero ``chunks`` (of a layer or an image blob) that the store lacks;
    their hex digests by index, how many were sent and their compressed bytes."""
    digests: dict[int, str] = {}
    sent = sent_bytes = 0

    def collect(result: tuple[int, str, int | None, int]) -> None:
        nonlocal sent, sent_bytes
        index, digest, compressed, length = result
        digests[index] = digest
        if compressed is not None:
            sent, sent_bytes = sent + 1, sent_bytes + compressed
        bar.update(length)
        bar.set_postfix_str(f"sent {sent}, had {len(digests) - sent}", refresh=False)

    non_zero = _count_zero_chunks(chunks, bar)
    run_bounded(non_zero, lambda chunk: _send_chunk(remote, chunk), collect)
    return digests, sent, sent_bytes


def _count_zero_chunks(chunks: Iterable[Chunk], bar: Any) -> Iterator[Chunk]:
    """The non-zero chunks; zero chunks only move the bar (they are never sent)."""
    for chunk in chunks:
        if chunk.is_zero:
            bar.update(chunk.length)
        else:
            yield chunk


def _send_chunk(remote: RemoteStore, chunk: Chunk) -> tuple[int, str, int | None, int]:
    """(index, hex digest, compressed size sent or None when the store had it, length)."""
    assert chunk.data is not None
    digest = hashlib.sha256(chunk.data).hexdigest()
    path = f"{CHUNKS_DIR}/{digest}"
    if guard(remote, "check", path, lambda: remote.has(path)):
        return chunk.index, digest, None, chunk.length
    compressed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(chunk.data)
    guard(remote, "write", path, lambda: remote.write(path, compressed))
    return chunk.index, digest, len(compressed), chunk.length


def _check_digests_before_push(
    snapshot: Snapshot, digests: Mapping[str, Mapping[int, str]]
) -> None:
    """A file whose content digest is recorded (a sealed layer; a memory snapshot's RAM and
    device state) goes out only if what was read matches it: the pull side would refuse
    it anyway, after the name had been moved."""
    for data_file in snapshot.manifest.data_files:
        if data_file.digest is None:
            continue
        actual = seal_of_chunk_digests(digests[data_file.role], data_file.size)
        if actual == data_file.digest:
            continue
        if data_file.role == "layer":
            reason = f"seal mismatch: sealed {data_file.digest}, the layer is {actual}"
        else:
            reason = (f"{data_file.file} is {actual}, the manifest records "
                      f"{data_file.digest}")  # fmt: skip
        raise SnapshotCorruptError(snapshot.name, f"{reason}; not pushed")


def seal_from_digests(digests: Mapping[int, str], size: int) -> str:
    """The seal (sha256-chunks-v1) of a layer of ``size`` bytes whose non-zero chunks have
    these hex digests: the same value :func:`content_digest` reads from the file."""
    return seal_of_chunk_digests(digests, size)


# --- pull ---------------------------------------------------------------------------------


def pull(
    url: str,
    name: str | None = None,
    store: SnapshotStore | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> Snapshot:
    """Fetch the snapshot at ``url`` (``<store URL>/<name in the store>``, as
    :attr:`PushResult.url`) into ``store`` (default: this machine's) as ``name``
    (default: its name in the store). Everything is checked before the snapshot appears;
    on any mismatch nothing is imported (:class:`SnapshotStoreError`)."""
    store_url, remote_name = split_snapshot_url(url)
    remote = RemoteStore.open(store_url, storage_options)
    return pull_from(remote, remote_name, name, store, progress=progress)


def pull_from(
    remote: RemoteStore,
    remote_name: str,
    name: str | None = None,
    store: SnapshotStore | None = None,
    *,
    progress: bool | None = None,
) -> Snapshot:
    """:func:`pull` from an open store."""
    local_name = check_name(name if name is not None else check_name(remote_name))
    store = store if store is not None else SnapshotStore()
    if store.exists(local_name):  # before any download; commit checks again
        raise SnapshotExistsError(local_name)
    remote.forget_listings()
    index_hex = read_name(remote, remote_name)
    manifest, digests = read_index(remote, index_hex)
    return pull_index(remote, manifest, digests, local_name, store, progress=progress)


def pull_index(
    remote: RemoteStore,
    manifest: SnapshotManifest,
    digests: Mapping[str, Mapping[int, str]],
    local_name: str,
    store: SnapshotStore,
    *,
    progress: bool | None = None,
) -> Snapshot:
    """The snapshot of an index already read and checked (:func:`read_index`), fetched and
    committed into ``store`` as ``local_name``; on any mismatch nothing is imported.
    ``digests``: each data file's chunk digests by role, as :func:`read_index` gives them."""
    if manifest.name != local_name:
        manifest = dataclasses.replace(manifest, name=local_name)
    with store.create(local_name) as pending:
        files = manifest.data_files
        total = sum(_chunk_length(i, f.size) for f in files for i in digests[f.role])
        with progress_bar(total, f"pull {local_name}", progress) as bar:
            for data_file in files:
                path = pending.path / data_file.file
                _fetch_file(remote, path, data_file, digests[data_file.role], bar)
        for data_file in files:
            _check_file_after_pull(remote, manifest, data_file, pending.path / data_file.file)
        return pending.commit(manifest)


def split_snapshot_url(url: str) -> tuple[str, str]:
    """``<store URL>/<name>`` -> (store URL, name)."""
    stripped = url.rstrip("/")
    cut = stripped.rfind("/")
    if cut < 0 or stripped.endswith(":/"):
        raise SnapshotStoreError(url, "want <store URL>/<snapshot name>")
    store_url, name = stripped[:cut], stripped[cut + 1 :]
    if store_url.endswith(":/"):  # "memory://name": the store is the filesystem's root
        store_url += "/"
    check_name(name)
    return store_url, name


def read_name(remote: RemoteStore, name: str) -> str:
    """The hex digest of the index that ``names/<name>`` points at."""
    path = f"{NAMES_DIR}/{check_name(name)}"
    try:
        text = guard(remote, "read", path, lambda: remote.read(path, 200)).decode().strip()
    except FileNotFoundError:
        raise SnapshotStoreError(
            remote.url, f"no snapshot named {name!r} ({path} is missing)"
        ) from None
    except UnicodeDecodeError:
        text = "<not text>"
    if not (text.startswith("sha256:") and _HEX.fullmatch(text[7:])):
        raise SnapshotStoreError(remote.url, f"{path} holds {text[:80]!r}, not a digest")
    return text[7:]


def read_index(
    remote: RemoteStore, index_hex: str
) -> tuple[SnapshotManifest, dict[str, dict[int, str]]]:
    """The snapshot index ``index_hex``, checked: its digest, its form, its manifest; with
    each data file's chunk digests by role ("layer", and a memory snapshot's "ram" and
    "state")."""
    path = f"{INDEXES_DIR}/{index_hex}"
    try:
        data = guard(remote, "read", path, lambda: remote.read(path, MAX_INDEX_BYTES))
    except FileNotFoundError:
        raise SnapshotStoreError(
            remote.url,
            f"the name points at index sha256:{index_hex}, which the store does not have ({path})",
        ) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != index_hex:
        raise SnapshotStoreError(
            remote.url,
            f"index {path} does not match its digest: "
            f"expected sha256:{index_hex}, got sha256:{actual}",
        )
    try:
        return _parse_index(data)
    except (SnapshotManifestError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise SnapshotStoreError(
            remote.url, f"index sha256:{index_hex} is invalid: {exc}"
        ) from None


def _parse_index(data: bytes) -> tuple[SnapshotManifest, dict[str, dict[int, str]]]:
    import json

    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("want an object")
    # No "version": a disk snapshot's index, as before memory snapshots existed.
    version = document.get("version")
    if "version" in document and (type(version) is not int or version != MEMORY_INDEX_VERSION):
        raise ValueError(f"index version {version!r} is unknown: this vmruntime reads indexes "
                         f"without one (disk snapshots) and version {MEMORY_INDEX_VERSION} "
                         "(memory snapshots)")  # fmt: skip
    keys = INDEX_KEYS if version is None else MEMORY_INDEX_KEYS
    if document.keys() != keys:
        raise ValueError(f"want an object with keys {sorted(keys)}")
    manifest = SnapshotManifest.from_dict(document["manifest"])
    if (manifest.memory is None) != (version is None):
        kind = "disk" if manifest.memory is None else "memory"
        raise ValueError(f"index version {version or 1} holds a {kind} snapshot's manifest "
                         f"(schema {manifest.schema})")  # fmt: skip
    size = document["apparent_size"]
    if size != manifest.layer.apparent_size or isinstance(size, bool):
        raise ValueError(
            f"apparent_size {size!r} differs from the manifest's {manifest.layer.apparent_size}"
        )
    digests = {"layer": _parse_chunk_list(document["chunks"], size, "the layer")}
    if version is not None:
        digests.update(_parse_memory(document["memory"], manifest))
    return manifest, digests


def _parse_memory(memory: object, manifest: SnapshotManifest) -> dict[str, dict[int, str]]:
    """The chunk lists of a memory snapshot's RAM and device state, by role."""
    files = [data_file for data_file in manifest.data_files if data_file.role != "layer"]
    if not isinstance(memory, dict) or memory.keys() != {f.role for f in files}:
        raise ValueError(f"memory: want an object with keys {sorted(f.role for f in files)}")
    digests: dict[str, dict[int, str]] = {}
    for data_file in files:
        entry = memory[data_file.role]
        if not isinstance(entry, dict) or entry.keys() != MEMORY_FILE_KEYS:
            raise ValueError(f"memory {data_file.role}: want an object with keys "
                             f"{sorted(MEMORY_FILE_KEYS)}")  # fmt: skip
        if entry["size"] != data_file.size or type(entry["size"]) is not int:
            raise ValueError(f"memory {data_file.role} size {entry['size']!r} differs from the "
                             f"manifest's {data_file.size}")  # fmt: skip
        digests[data_file.role] = _parse_chunk_list(entry["chunks"], data_file.size,
                                                    data_file.file)  # fmt: skip
    return digests


def _parse_chunk_list(listed: object, size: int, what: str) -> dict[int, str]:
    """[[index, hex], ...] of a file of ``size`` bytes: indexes increasing, in range."""
    if not isinstance(listed, list):
        raise ValueError(f"chunks of {what}: want a list")
    digests: dict[int, str] = {}
    last = -1
    for entry in listed:
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and type(entry[0]) is int
            and isinstance(entry[1], str)
            and _HEX.fullmatch(entry[1])
        ):
            raise ValueError(f"chunk entry {entry!r}: want [index, <64 hex digits>]")
        index, digest = entry
        if not last < index < chunk_count(size):
            raise ValueError(f"chunk index {index} is out of order or past {what}'s end "
                             f"({chunk_count(size)} chunks)")  # fmt: skip
        digests[index] = digest
        last = index
    return digests


def _fetch_file(
    remote: RemoteStore, path: Path, data_file: DataFile, digests: Mapping[int, str], bar: Any
) -> None:
    """Write a data file from its chunks, sparse: zero chunks and zero blocks are skipped."""
    size = data_file.size
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(descriptor, size)
        run_bounded(
            iter(sorted(digests.items())),
            lambda item: _fetch_chunk(remote, descriptor, data_file, item[0], item[1]),
            bar.update,
        )
    finally:
        os.close(descriptor)


def _fetch_chunk(
    remote: RemoteStore, descriptor: int, data_file: DataFile, index: int, digest: str
) -> int:
    """Fetch, check and write chunk ``index``; returns its length."""
    length = _chunk_length(index, data_file.size)
    label = f"chunk {index}" if data_file.role == "layer" else f"chunk {index} of {data_file.file}"
    data = read_chunk(remote, digest, length, label)
    write_sparse(descriptor, index * CHUNK_SIZE, data)
    return length


def read_chunk(remote: RemoteStore, digest: str, length: int, label: str) -> bytes:
    """The chunk ``digest`` (hex) of ``length`` bytes, decompressed (bounded) and checked
    against its digest; ``label`` names it in errors ("chunk 3", "chunk 3 of blob …")."""
    path = f"{CHUNKS_DIR}/{digest}"
    try:
        compressed = guard(remote, "read", path, lambda: remote.read(path, 2 * CHUNK_SIZE))
    except FileNotFoundError:
        raise SnapshotStoreError(
            remote.url, f"{label} (sha256:{digest}) is missing ({path})"
        ) from None
    data = _decompress(remote, compressed, length, label, digest)
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise SnapshotStoreError(
            remote.url,
            f"{label} ({path}) does not match its "
            f"digest: expected sha256:{digest}, got sha256:{actual}",
        )
    return data


def _decompress(
    remote: RemoteStore, compressed: bytes, length: int, label: str, digest: str
) -> bytes:
    """The chunk's bytes, never more than ``length`` + 1 of them whatever the frame claims."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed))
        data = reader.read(length + 1)
    except zstandard.ZstdError as exc:
        raise SnapshotStoreError(
            remote.url, f"{label} (sha256:{digest}) is not a zstd frame: {exc}"
        ) from None
    if len(data) != length:
        raise SnapshotStoreError(
            remote.url,
            f"{label} (sha256:{digest}) holds "
            f"{'more than ' if len(data) > length else ''}{len(data)} "
            f"bytes, not {length}",
        )
    return data


def _check_file_after_pull(
    remote: RemoteStore, manifest: SnapshotManifest, data_file: DataFile, path: Path
) -> None:
    """The rebuilt file's content digest, where the manifest records one (the layer's seal;
    a memory snapshot's RAM and device state always), read back from the file."""
    if data_file.digest is None:
        return
    actual = content_digest(path, data_file.size)
    if actual == data_file.digest:
        return
    if data_file.role == "layer":
        reason = f"seal mismatch: sealed {data_file.digest}, the pulled layer is {actual}"
    else:
        reason = (f"digest mismatch: the manifest records {data_file.digest} for "
                  f"{data_file.file}, the pulled file is {actual}")  # fmt: skip
    raise SnapshotStoreError(remote.url, f"snapshot {manifest.name!r}: {reason}")


def _chunk_length(index: int, size: int) -> int:
    return min(CHUNK_SIZE, size - index * CHUNK_SIZE)


# --- shared ---------------------------------------------------------------------------------


def run_bounded(
    items: Iterator[Any],
    work: Callable[[Any], Any],
    collect: Callable[[Any], object],
    transfers: int = TRANSFERS,
) -> None:
    """``work(item)`` for each item on ``transfers`` threads, at most 2 * ``transfers`` in
    flight (each holds a chunk in memory); ``collect(result)`` in order, on this thread.
    The first failure cancels what has not started and is raised."""
    with concurrent.futures.ThreadPoolExecutor(transfers, "vmr-snapshot") as pool:
        pending: deque[concurrent.futures.Future[Any]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= 2 * transfers:
                    collect(pending.popleft().result())
            while pending:
                collect(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()


def guard(remote: RemoteStore, verb: str, relative: str, action: Callable[[], Any]) -> Any:
    """Run one store operation; a failure becomes a :class:`SnapshotStoreError` naming the
    object, except a missing object on a read (FileNotFoundError: the caller says what was
    missing). Backends raise their own types (botocore's EndpointConnectionError,
    NoCredentialsError...), not only OSError: hence Exception."""
    try:
        return action()
    except VmruntimeError:
        raise
    except FileNotFoundError as exc:
        if verb == "read":
            raise
        reason = f"cannot {verb} {relative}: {exc}"
        raise SnapshotStoreError(remote.url, reason) from exc
    except Exception as exc:
        reason = f"cannot {verb} {relative}: {type(exc).__name__}: {exc}"
        raise SnapshotStoreError(remote.url, reason) from exc


def _write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def progress_bar(total: int, label: str, enabled: bool | None) -> Any:
    """A byte progress bar on stderr; a silent one when disabled or stderr is no terminal."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    # A terminal that reports no size (a bare pty) would make tqdm print nothing.
    size = shutil.get_terminal_size()
    return tqdm(
        total=total,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not show,
        leave=True,
        ncols=min(size.columns, 120),
        nrows=size.lines,
    )
