"""A snapshot's base image in the shared store: pushed with it, fetched and checked by digest.

Who calls it: :func:`vmruntime.snapshots.remote.push` (``with_image=True``, ``vmr snapshot
push --with-image``) and :mod:`.ensure`, which brings a snapshot's image to a machine
whose cache lacks it. What it promises (layout: docs/snapshots.md, "Shared store layout"):

- every blob of the image (its manifest, config and layers) goes to the store in
  4 MiB chunks, zstd-compressed under ``chunks/sha256/<hex>`` like a layer's chunks: the
  same deduplication (a chunk the store has is not sent again, zero chunks never), the
  same bounded decompression and digest check on the way back;
- ``images/sha256/<manifest hex>`` lists each blob's digest, size and chunks; it is
  written after every chunk it names and before the snapshot's name, so a name never
  points at a snapshot whose pushed image is incomplete;
- the record is not trusted: a fetch starts from the manifest digest the snapshot pins,
  checks the manifest blob against it, and takes the config and layer digests from that
  manifest; the image cache then checks every blob against its digest and size and every
  layer against its diff_id while writing it (:func:`vmruntime.images.ingest.ingest_image`),
  so a tampered or swapped blob is refused (:class:`SnapshotStoreError`) and never
  committed, and no reference is recorded. Blobs that verified before the failure stay,
  as after any interrupted pull: the next fetch resumes from them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from vmruntime import images
from vmruntime.errors import (
    CacheError,
    DigestMismatchError,
    ImageNotFoundError,
    ManifestError,
    SizeMismatchError,
    SnapshotBaseImageError,
    SnapshotStoreError,
)
from vmruntime.images.ingest import BlobSink, ImageRecord, Progress, ingest_image, no_progress
from vmruntime.images.manifest import (
    MAX_JSON_DOCUMENT,
    Descriptor,
    ImageManifest,
    parse_manifest_document,
)
from vmruntime.images.reference import canonical_reference
from vmruntime.images.store import ImageStore
from vmruntime.rootfs.layers import ErofsLayers
from vmruntime.snapshots.capture import pull_reference
from vmruntime.snapshots.manifest import CHUNK_SIZE, canonical_json
from vmruntime.snapshots.remote import (
    RemoteStore,
    guard,
    progress_bar,
    read_chunk,
    run_bounded,
    send_chunks,
)
from vmruntime.snapshots.seal import Chunk, chunk_count, iter_chunks
from vmruntime.snapshots.store import Snapshot

IMAGES_DIR = "images/sha256"
RECORD_KEYS = frozenset({"manifest", "blobs"})
BLOB_KEYS = frozenset({"digest", "size", "chunks"})
MAX_RECORD_BYTES = 16 << 20  # ~150 bytes a chunk: a 400 GiB image's record is ~15 MB
MAX_BLOB_SIZE = 1 << 50
BLOB_TRANSFERS = 2  # per blob; the image cache fetches up to three layers at once
_HEX_DIGITS = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class ImagePushResult:
    """What :func:`push_image` did: the image, its blobs, and what it had to send."""

    manifest_digest: str
    blobs: int
    chunks: int  # non-zero chunks of all its blobs
    chunks_sent: int  # of which the store did not have yet
    bytes_sent: int  # compressed bytes of those chunks


@dataclass(frozen=True)
class StoredBlob:
    """One blob of a pushed image: its size and its non-zero chunks' hex digests by index."""

    digest: str
    size: int
    chunks: Mapping[int, str]


def record_path(manifest_digest: str) -> str:
    return f"{IMAGES_DIR}/{_hex(manifest_digest)}"


# --- push ---------------------------------------------------------------------------------


def push_image(
    remote: RemoteStore,
    snapshot: Snapshot,
    image_store: ImageStore | None,
    progress: bool | None,
) -> ImagePushResult:
    """Send the blobs of ``snapshot``'s base image (from the local cache) and their record.

    Every blob is checked against its digest while it is read, so a damaged cache is
    refused (:class:`DigestMismatchError`) before the record or the name are written.
    """
    store = image_store or ImageStore()
    manifest = snapshot.manifest
    try:
        image = images.resolve(manifest.image_manifest_digest, store)
    except ImageNotFoundError:
        hint = pull_reference(manifest.image, manifest.image_manifest_digest)
        raise SnapshotBaseImageError(snapshot.name, manifest.image,
                                     manifest.image_manifest_digest, hint) from None  # fmt: skip
    blobs = _local_blobs(image, store)
    stored: list[StoredBlob] = []
    chunks = sent = sent_bytes = 0
    total = sum(size for _, size in blobs)
    with progress_bar(total, f"push image {image.manifest_digest[7:19]}", progress) as bar:
        for digest, size in blobs:
            blob, blob_sent, blob_bytes = _send_blob(remote, store, digest, size, bar)
            stored.append(blob)
            chunks, sent, sent_bytes = (chunks + len(blob.chunks), sent + blob_sent,
                                        sent_bytes + blob_bytes)  # fmt: skip
    path = record_path(image.manifest_digest)
    data = image_record(image.manifest_digest, stored)
    # Always written (the same bytes for the same image): a damaged record is mended.
    guard(remote, "write", path, lambda: remote.write(path, data))
    return ImagePushResult(image.manifest_digest, len(blobs), chunks, sent, sent_bytes)


def _local_blobs(image: ImageRecord, store: ImageStore) -> list[tuple[str, int]]:
    """(digest, size) of the manifest, config and each distinct layer, from the cache."""
    wanted = [
        (image.manifest_digest, None),
        (image.manifest.config.digest, image.manifest.config.size),
        *((layer.digest, layer.size) for layer in image.manifest.layers),
    ]
    blobs: dict[str, int] = {}
    for digest, size in wanted:
        path = store.blob_path(digest)
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            hint = f"pull or load {image.reference} again"
            raise CacheError(
                path, f"blob {digest} of {image.reference} is missing; {hint}"
            ) from None
        if size is not None and actual != size:
            raise SizeMismatchError(f"blob {digest} in the cache ({path})", size, actual)
        blobs[digest] = actual
    return list(blobs.items())


def _send_blob(
    remote: RemoteStore, store: ImageStore, digest: str, size: int, bar: Any
) -> tuple[StoredBlob, int, int]:
    """Send one cached blob's chunks; (its record entry, chunks sent, bytes sent)."""
    whole = hashlib.sha256()
    path = store.blob_path(digest)
    digests, sent, sent_bytes = send_chunks(remote, _hashed(iter_chunks(path, size), whole), bar)
    actual = "sha256:" + whole.hexdigest()
    if actual != digest:
        raise DigestMismatchError(f"blob {path} in the cache (not pushed)", digest, actual)
    return StoredBlob(digest, size, digests), sent, sent_bytes


def _hashed(chunks: Iterable[Chunk], whole: Any) -> Iterator[Chunk]:
    """The chunks unchanged, each (zero chunks too) fed to ``whole`` on the way."""
    for chunk in chunks:
        whole.update(chunk.data if chunk.data is not None else bytes(chunk.length))
        yield chunk


def image_record(manifest_digest: str, blobs: Iterable[StoredBlob]) -> bytes:
    """The record ``images/sha256/<manifest hex>`` holds, canonical JSON."""
    return canonical_json(
        {
            "manifest": manifest_digest,
            "blobs": [
                {
                    "digest": blob.digest,
                    "size": blob.size,
                    "chunks": [[index, blob.chunks[index]] for index in sorted(blob.chunks)],
                }
                for blob in blobs
            ],
        }
    )


# --- fetch --------------------------------------------------------------------------------


def fetch_image(
    remote: RemoteStore,
    manifest_digest: str,
    image: str,
    image_store: ImageStore | None = None,
    *,
    progress: bool = False,
) -> ImageRecord | None:
    """The image ``manifest_digest`` from the store into the cache, every blob checked,
    recorded as ``<repository of image>@<digest>``; None when the store has no record of
    it. A blob that does not check out is a :class:`SnapshotStoreError` naming it."""
    store = image_store or ImageStore()
    blobs = read_record(remote, manifest_digest)
    if blobs is None:
        return None
    source = StoreBlobSource(remote, blobs)
    body = source.read_manifest(manifest_digest)
    try:
        manifest = parse_manifest_document(body, f"manifest {manifest_digest} in {remote.url}")
        if not isinstance(manifest, ImageManifest):
            raise ManifestError(f"manifest {manifest_digest}", "an index, not an image manifest")
        return ingest_image(
            store, source, manifest, body, manifest_digest,
            reference=canonical_reference(pull_reference(image, manifest_digest)),
            source_kind=f"store {remote.url}", layers=ErofsLayers(store),
            progress=_progress(progress),
        )  # fmt: skip
    except (DigestMismatchError, SizeMismatchError, ManifestError) as exc:
        raise SnapshotStoreError(remote.url, f"image {manifest_digest}: {exc}") from None


def _progress(enabled: bool) -> Any:
    if not enabled:
        return no_progress
    from vmruntime.images.progress import terminal_progress

    return terminal_progress()


def read_record(remote: RemoteStore, manifest_digest: str) -> dict[str, StoredBlob] | None:
    """The blobs the store's record of image ``manifest_digest`` lists, checked for form
    (their content is checked as they are fetched); None when there is no record."""
    path = record_path(manifest_digest)
    try:
        data = guard(remote, "read", path, lambda: remote.read(path, MAX_RECORD_BYTES))
    except FileNotFoundError:
        return None
    try:
        return _parse_record(data, manifest_digest)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise SnapshotStoreError(remote.url, f"image record {path} is invalid: {exc}") from None


def _parse_record(data: bytes, manifest_digest: str) -> dict[str, StoredBlob]:
    document = json.loads(data)
    if not isinstance(document, dict) or document.keys() != RECORD_KEYS:
        raise ValueError(f"want an object with keys {sorted(RECORD_KEYS)}")
    if document["manifest"] != manifest_digest:
        raise ValueError(f"it is the record of {document['manifest']!r}")
    if not isinstance(document["blobs"], list):
        raise ValueError("blobs: want a list")
    blobs: dict[str, StoredBlob] = {}
    for entry in document["blobs"]:
        blob = _parse_blob(entry)
        if blob.digest in blobs:
            raise ValueError(f"blob {blob.digest} is listed twice")
        blobs[blob.digest] = blob
    return blobs


def _parse_blob(entry: object) -> StoredBlob:
    if not isinstance(entry, dict) or entry.keys() != BLOB_KEYS:
        raise ValueError(f"blob entry: want an object with keys {sorted(BLOB_KEYS)}")
    digest, size, listed = entry["digest"], entry["size"], entry["chunks"]
    _hex(digest)
    if type(size) is not int or not 0 <= size < MAX_BLOB_SIZE:
        raise ValueError(f"blob {digest}: size {size!r} is not a size in bytes")
    if not isinstance(listed, list):
        raise ValueError(f"blob {digest}: chunks: want a list")
    chunks: dict[int, str] = {}
    last = -1
    for item in listed:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int
                and _is_hex(item[1])):  # fmt: skip
            raise ValueError(f"blob {digest}: chunk entry {item!r}: want [index, <64 hex>]")
        if not last < item[0] < chunk_count(size):
            raise ValueError(
                f"blob {digest}: chunk index {item[0]} is out of order or past its end"
            )
        chunks[item[0]] = item[1]
        last = item[0]
    return StoredBlob(digest, size, chunks)


class StoreBlobSource:
    """A :class:`~vmruntime.images.ingest.BlobSource` reading blobs from the store's chunks.

    Who calls it: :func:`fetch_image`, through the image cache's ingest. It checks every
    chunk (bounded decompression, digest) and writes the blob in order into the cache's
    sink, which checks the whole blob's size and digest before anything is committed.
    """

    def __init__(self, remote: RemoteStore, blobs: Mapping[str, StoredBlob]) -> None:
        self.remote = remote
        self.blobs = blobs

    def copy_blob(self, desc: Descriptor, sink: BlobSink, progress: Progress) -> None:
        blob = self.blobs.get(desc.digest)
        if blob is None:
            raise SnapshotStoreError(
                self.remote.url, f"blob {desc.digest} is not in the store's image record"
            )
        if blob.size != desc.size:
            reason = f"blob {desc.digest} is listed with {blob.size} bytes, not {desc.size}"
            raise SnapshotStoreError(self.remote.url, reason)
        sink.reset()
        progress.reset()

        def write(data: bytes) -> None:
            sink.write(data)
            progress.advance(len(data))

        run_bounded(iter(range(chunk_count(blob.size))), lambda index: self._chunk(blob, index),
                    write, transfers=BLOB_TRANSFERS)  # fmt: skip

    def _chunk(self, blob: StoredBlob, index: int) -> bytes:
        length = min(CHUNK_SIZE, blob.size - index * CHUNK_SIZE)
        digest = blob.chunks.get(index)
        if digest is None:
            return bytes(length)  # a zero chunk: never stored
        return read_chunk(self.remote, digest, length, f"chunk {index} of blob {blob.digest}")

    def read_manifest(self, manifest_digest: str) -> bytes:
        """The manifest blob, checked against ``manifest_digest`` (everything else follows
        from it)."""
        blob = self.blobs.get(manifest_digest)
        if blob is None:
            raise SnapshotStoreError(self.remote.url, f"the record of image {manifest_digest} "
                                     "does not list its manifest")  # fmt: skip
        if blob.size > MAX_JSON_DOCUMENT:
            raise SnapshotStoreError(self.remote.url, f"manifest {manifest_digest} is listed "
                                     f"with {blob.size} bytes: too large")  # fmt: skip
        sink = _BytesSink()
        desc = Descriptor("manifest", manifest_digest, blob.size)
        self.copy_blob(desc, sink, no_progress(desc, "manifest"))
        actual = "sha256:" + hashlib.sha256(sink.data).hexdigest()
        if actual != manifest_digest:
            raise SnapshotStoreError(self.remote.url, f"manifest blob {manifest_digest} does "
                                     f"not match its digest: got {actual}")  # fmt: skip
        return bytes(sink.data)


class _BytesSink:
    def __init__(self) -> None:
        self.data = bytearray()

    @property
    def written(self) -> int:
        return len(self.data)

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def reset(self) -> None:
        self.data.clear()


def _hex(digest: object) -> str:
    if not (isinstance(digest, str) and digest.startswith("sha256:") and _is_hex(digest[7:])):
        raise ValueError(f"{digest!r} is not a sha256 digest")
    return digest[7:]


def _is_hex(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and set(text) <= _HEX_DIGITS
