"""The shared snapshot store: snapshots pushed to and pulled from any fsspec URL.

Who calls it: :meth:`Snapshot.push`, :meth:`Snapshot.pull` and ``vmr snapshot push|pull``,
so every machine of a cluster can restore the same state. What it promises (layout:
docs/snapshots.md, "Shared store layout"):

- the store is content-addressed: ``chunks/sha256/<hex>`` holds one zstd-compressed
  chunk named by the SHA-256 of its *uncompressed* bytes, ``manifests/sha256/<hex>`` one
  snapshot index (the manifest and the layer's chunk list) named by its own SHA-256, and
  ``names/<name>`` the index digest; zero chunks are never sent, and a chunk the store
  already has is not sent again; pushed ``with_image``, the base image's blobs go in
  chunks too, listed by ``images/sha256/<manifest hex>`` (:mod:`.remote_images`);
- a push writes the name *last*, after everything it names, so a crash or two machines
  pushing at once never leave a name pointing at missing data (the last name written
  wins, and each names a complete snapshot);
- a pull checks everything it reads (the index against its digest, every chunk against
  its digest after a bounded decompression, the manifest, the seal if there is one)
  and commits into the local store by one rename: on any mismatch nothing is imported
  and :class:`SnapshotStoreError` names the chunk or digest that failed.
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
from vmruntime.snapshots.manifest import CHUNK_SIZE, SnapshotManifest, canonical_json
from vmruntime.snapshots.names import check_name
from vmruntime.snapshots.seal import (
    Chunk,
    chunk_count,
    content_digest,
    iter_chunks,
    write_sparse,
    zero_digest,
)
from vmruntime.snapshots.store import Snapshot, SnapshotStore

if TYPE_CHECKING:
    from vmruntime.images.store import ImageStore
    from vmruntime.snapshots.remote_images import ImagePushResult

CHUNKS_DIR = "chunks/sha256"
INDEXES_DIR = "manifests/sha256"
NAMES_DIR = "names"
INDEX_KEYS = frozenset({"manifest", "chunks", "apparent_size"})
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
    chunks: int  # non-zero chunks of the layer
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
    A sealed snapshot whose layer no longer matches its seal is refused
    (:class:`SnapshotCorruptError`) before its name is written.
    """
    from vmruntime.snapshots.remote_images import push_image  # it builds on this module

    remote = url if isinstance(url, RemoteStore) else RemoteStore.open(url, storage_options)
    manifest = snapshot.manifest
    name = check_name(snapshot.name)
    size = manifest.layer.apparent_size
    remote.forget_listings()
    # The image first: its record must exist before a name can point at the snapshot.
    image = push_image(remote, snapshot, image_store, progress) if with_image else None
    with progress_bar(size, f"push {name}", progress) as bar:
        digests, sent, sent_bytes = _send_chunks(remote, snapshot.layer_path, size, bar)
    _check_seal_before_push(snapshot, digests)
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
        chunks=len(digests),
        chunks_sent=sent,
        bytes_sent=sent_bytes,
        image=image,
    )


def snapshot_index(manifest: SnapshotManifest, digests: Mapping[int, str]) -> bytes:
    """The index a store keeps for a snapshot, canonical JSON: its manifest, the hex digest
    of every non-zero chunk by index, and the layer's size."""
    return canonical_json(
        {
            "manifest": manifest.to_dict(),
            "chunks": [[index, digests[index]] for index in sorted(digests)],
            "apparent_size": manifest.layer.apparent_size,
        }
    )


def _send_chunks(
    remote: RemoteStore, layer: Path, size: int, bar: Any
) -> tuple[dict[int, str], int, int]:
    """Send the layer's non-zero chunks the store lacks; their digests by index, how many
    were sent and their compressed bytes."""
    try:
        return send_chunks(remote, iter_chunks(layer, size), bar)
    except (ValueError, FileNotFoundError) as exc:  # the local layer is not what it says
        raise SnapshotStoreError(remote.url, f"cannot read the local layer: {exc}") from None


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


def _check_seal_before_push(snapshot: Snapshot, digests: Mapping[int, str]) -> None:
    """A sealed snapshot goes out only if what was read matches the seal: the pull side
    would refuse it anyway, after the name had been moved."""
    seal = snapshot.manifest.seal
    if seal is None:
        return
    actual = seal_from_digests(digests, snapshot.manifest.layer.apparent_size)
    if actual != seal.digest:
        raise SnapshotCorruptError(
            snapshot.name, f"seal mismatch: sealed {seal.digest}, the layer is {actual}; not pushed"
        )


def seal_from_digests(digests: Mapping[int, str], size: int) -> str:
    """The seal (sha256-chunks-v1) of a layer of ``size`` bytes whose non-zero chunks have
    these hex digests: the same value :func:`content_digest` reads from the file."""
    total = hashlib.sha256()
    for index in range(chunk_count(size)):
        length = min(CHUNK_SIZE, size - index * CHUNK_SIZE)
        digest = digests.get(index)
        total.update(bytes.fromhex(digest) if digest is not None else zero_digest(length))
    total.update(size.to_bytes(8, "big"))
    return "sha256:" + total.hexdigest()


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
    digests: Mapping[int, str],
    local_name: str,
    store: SnapshotStore,
    *,
    progress: bool | None = None,
) -> Snapshot:
    """The snapshot of an index already read and checked (:func:`read_index`), fetched and
    committed into ``store`` as ``local_name``; on any mismatch nothing is imported."""
    if manifest.name != local_name:
        manifest = dataclasses.replace(manifest, name=local_name)
    with store.create(local_name) as pending:
        layer = pending.path / manifest.layer.file
        _fetch_layer(remote, layer, manifest.layer.apparent_size, digests, progress, local_name)
        _check_seal_after_pull(remote, manifest, layer)
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


def read_index(remote: RemoteStore, index_hex: str) -> tuple[SnapshotManifest, dict[int, str]]:
    """The snapshot index ``index_hex``, checked: its digest, its form, its manifest."""
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


def _parse_index(data: bytes) -> tuple[SnapshotManifest, dict[int, str]]:
    import json

    document = json.loads(data)
    if not isinstance(document, dict) or document.keys() != INDEX_KEYS:
        raise ValueError(f"want an object with keys {sorted(INDEX_KEYS)}")
    manifest = SnapshotManifest.from_dict(document["manifest"])
    size = document["apparent_size"]
    if size != manifest.layer.apparent_size or isinstance(size, bool):
        raise ValueError(
            f"apparent_size {size!r} differs from the manifest's {manifest.layer.apparent_size}"
        )
    digests: dict[int, str] = {}
    last = -1
    for entry in document["chunks"]:
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
            raise ValueError(f"chunk index {index} is out of order or past the layer's end")
        digests[index] = digest
        last = index
    return manifest, digests


def _fetch_layer(
    remote: RemoteStore,
    layer: Path,
    size: int,
    digests: Mapping[int, str],
    progress: bool | None,
    label: str,
) -> None:
    """Write the layer from its chunks, sparse: zero chunks and zero blocks are skipped."""
    total = sum(_chunk_length(index, size) for index in digests)
    descriptor = os.open(layer, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(descriptor, size)
        with progress_bar(total, f"pull {label}", progress) as bar:
            run_bounded(
                iter(sorted(digests.items())),
                lambda item: _fetch_chunk(remote, descriptor, item[0], item[1], size),
                bar.update,
            )
    finally:
        os.close(descriptor)


def _fetch_chunk(remote: RemoteStore, descriptor: int, index: int, digest: str, size: int) -> int:
    """Fetch, check and write chunk ``index``; returns its length."""
    length = _chunk_length(index, size)
    data = read_chunk(remote, digest, length, f"chunk {index}")
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


def _check_seal_after_pull(remote: RemoteStore, manifest: SnapshotManifest, layer: Path) -> None:
    if manifest.seal is None:
        return
    actual = content_digest(layer, manifest.layer.apparent_size)
    if actual != manifest.seal.digest:
        raise SnapshotStoreError(
            remote.url,
            f"snapshot {manifest.name!r}: seal mismatch: "
            f"sealed {manifest.seal.digest}, the pulled layer is {actual}",
        )


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
