"""One-file export and import of a snapshot (the "vmrsnap" archive, format version 1).

Who calls it: :meth:`Snapshot.export`, ``vmr snapshot export|import`` and anyone moving a
snapshot between machines without a shared store. What it promises: an export holds the
manifest and only the layer's non-zero chunks, each zstd-compressed (holes are never
read nor stored); an import checks every byte of the file and the seal, if there is one,
before anything is visible under a name, and refuses a bad file with a
:class:`SnapshotImportError` that names what failed. The format is described in
docs/snapshots.md, "Export archive"; this module is its reference.

Layout (integers big-endian)::

    header   magic(12) version(u16)=1 flags(u16)=0 chunk_size(u32) manifest_len(u32)
    manifest manifest_len bytes: the manifest's canonical JSON
    chunks   zero or more of: "C" index(u64) stored_len(u32) sha256(32) zstd_frame(stored_len)
             indexes strictly increasing; sha256 of the chunk's uncompressed bytes
    trailer  "T" chunk_count(u64) apparent_size(u64) manifest_sha256(32)
             file_sha256(32): sha256 of every byte before it
    end of file
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from vmruntime._durable import fsync_dir
from vmruntime.errors import (
    SnapshotCorruptError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotImportError,
    SnapshotManifestError,
)
from vmruntime.snapshots.manifest import CHUNK_SIZE, SnapshotManifest
from vmruntime.snapshots.names import check_name
from vmruntime.snapshots.seal import content_digest, iter_chunks, write_sparse
from vmruntime.snapshots.store import Snapshot, SnapshotStore

# PNG-style magic: a non-ASCII first byte, and CR LF / ^Z / LF to catch a text-mode copy.
MAGIC = b"\x89VMRSNAP\r\n\x1a\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">12sHHII")  # magic, version, flags, chunk_size, manifest_len
_CHUNK = struct.Struct(">QI32s")  # after b"C": index, stored_len, sha256 of the data
_TRAILER = struct.Struct(">QQ32s")  # after b"T": chunk_count, apparent_size, manifest sha256
_CHUNK_TAG = b"C"
_TRAILER_TAG = b"T"
_DIGEST_SIZE = 32

# A manifest is a few KiB; the bound stops a hostile length from allocating gigabytes.
MAX_MANIFEST_SIZE = 1 << 20
# zstd never grows incompressible data by more than a little (ZSTD_compressBound is
# about size/256 + 64 bytes); anything longer than this is not a frame we wrote.
MAX_STORED_CHUNK = CHUNK_SIZE + CHUNK_SIZE // 128 + 4096
_COMPRESSION_LEVEL = 3
# Inside a stored chunk, runs of zero blocks of this size are left as holes on import.


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_snapshot` wrote: where, how many chunks, how many bytes."""

    path: Path
    manifest_digest: str
    chunks: int
    size: int


def export_snapshot(snapshot: Snapshot, path: Path | str) -> ExportResult:
    """Write ``snapshot`` to ``path`` as one archive file (0600), atomically.

    The file appears under ``path`` only once complete (written beside it, fsynced,
    renamed), so an interrupted export never leaves a truncated archive under the name.
    """
    path = Path(path)
    manifest = snapshot.manifest
    if not snapshot.layer_path.is_file():
        raise SnapshotCorruptError(snapshot.name, f"{snapshot.layer_path} is missing")
    if path.is_dir():
        raise SnapshotError(f"cannot export {snapshot.name!r} to {path}: it is a directory")
    temp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SnapshotError(f"cannot export {snapshot.name!r} to {path}: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                chunks = _write_archive(out, manifest, snapshot.layer_path)
            except ValueError as exc:  # iter_chunks: the layer's size is not the manifest's
                raise SnapshotCorruptError(snapshot.name, str(exc)) from None
            out.flush()
            os.fsync(out.fileno())
        size = temp.stat().st_size
        os.replace(temp, path)
    except OSError as exc:  # a full disk, a layer that cannot be read
        temp.unlink(missing_ok=True)
        raise SnapshotError(f"cannot export {snapshot.name!r} to {path}: {exc}") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return ExportResult(path=path, manifest_digest=manifest.digest(), chunks=chunks, size=size)


def import_snapshot(
    path: Path | str,
    store: SnapshotStore,
    name: str | None = None,
    expected_digest: str | None = None,
) -> Snapshot:
    """Check the archive at ``path`` completely, then add it to ``store`` as ``name``.

    ``name`` defaults to the name in the archive's manifest; a different name is written
    into the imported manifest (which changes its digest, not the layer or the seal).
    ``expected_digest`` pins the archive's manifest digest (``sha256:<hex>``, as
    ``vmr snapshot export`` prints it): the only check that a whole-file forgery cannot
    pass, and with a seal it pins the layer's content too.

    Raises SnapshotImportError (nothing imported) for a file that fails any check,
    SnapshotExistsError if the name is taken, SnapshotNameError for a bad name.
    """
    path = Path(path)
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed below; open errors are reported)
    except OSError as exc:
        raise SnapshotImportError(str(path), f"cannot open: {exc.strerror or exc}") from None
    with file:
        reader = _ArchiveReader(file, path)
        manifest_json, manifest = _read_header_and_manifest(reader)
        if expected_digest is not None and manifest.digest() != expected_digest:
            raise reader.refuse(
                f"manifest digest is {manifest.digest()}, expected {expected_digest}"
            )
        target = check_name(name if name is not None else manifest.name)
        if store.exists(target):  # early, before the expensive part; commit checks again
            raise SnapshotExistsError(target)
        imported = manifest if target == manifest.name else _renamed(manifest, target)
        with store.create(target) as staging:
            layer_path = staging.path / manifest.layer.file
            _rebuild_layer(reader, manifest, manifest_json, layer_path)
            _check_rebuilt_layer(reader, manifest, layer_path)
            staging.commit(imported)
    return store.get(target)


# --- writing -----------------------------------------------------------------


def _write_archive(out: BinaryIO, manifest: SnapshotManifest, layer: Path) -> int:
    digest = hashlib.sha256()

    def put(data: bytes) -> None:
        out.write(data)
        digest.update(data)

    manifest_json = manifest.to_json()
    put(_HEADER.pack(MAGIC, FORMAT_VERSION, 0, CHUNK_SIZE, len(manifest_json)))
    put(manifest_json)
    compressor = zstandard.ZstdCompressor(level=_COMPRESSION_LEVEL, write_content_size=True)
    count = 0
    for index, data in _data_chunks(layer, manifest.layer.apparent_size):
        frame = compressor.compress(data)
        put(_CHUNK_TAG + _CHUNK.pack(index, len(frame), hashlib.sha256(data).digest()))
        put(frame)
        count += 1
    manifest_sha = hashlib.sha256(manifest_json).digest()
    put(_TRAILER_TAG + _TRAILER.pack(count, manifest.layer.apparent_size, manifest_sha))
    out.write(digest.digest())
    return count


def _data_chunks(layer: Path, apparent_size: int) -> Iterator[tuple[int, bytes]]:
    """The layer's chunks that hold data; holes and all-zero chunks are skipped."""
    for chunk in iter_chunks(layer, apparent_size):
        if not chunk.is_zero and chunk.data is not None:
            yield chunk.index, chunk.data


# --- reading -----------------------------------------------------------------


class _ArchiveReader:
    """Exact reads from the archive that hash what they read, for the file digest."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        self._file = file
        self._path = path
        self._digest = hashlib.sha256()

    def refuse(self, reason: str) -> SnapshotImportError:
        return SnapshotImportError(str(self._path), reason)

    def read_exact(self, size: int, what: str, *, hashed: bool = True) -> bytes:
        data = self._file.read(size)
        if len(data) != size:
            raise self.refuse(f"truncated: the file ends inside {what}")
        if hashed:
            self._digest.update(data)
        return data

    def file_digest(self) -> bytes:
        return self._digest.digest()

    def at_end(self) -> bool:
        return self._file.read(1) == b""


def _read_header_and_manifest(reader: _ArchiveReader) -> tuple[bytes, SnapshotManifest]:
    magic, version, flags, chunk_size, manifest_len = _HEADER.unpack(
        reader.read_exact(_HEADER.size, "the header")
    )
    if magic != MAGIC:
        raise reader.refuse("not a vmr snapshot archive (bad magic)")
    if version != FORMAT_VERSION:
        raise reader.refuse(f"unsupported archive format version {version}")
    if flags != 0:
        raise reader.refuse(f"unknown header flags {flags:#x}")
    if chunk_size != CHUNK_SIZE:
        raise reader.refuse(f"chunk size {chunk_size}, this version reads {CHUNK_SIZE}")
    if manifest_len > MAX_MANIFEST_SIZE:
        raise reader.refuse(f"manifest length {manifest_len} exceeds {MAX_MANIFEST_SIZE}")
    manifest_json = reader.read_exact(manifest_len, "the manifest")
    try:
        manifest = SnapshotManifest.from_json(manifest_json)
    except SnapshotManifestError as exc:
        raise reader.refuse(f"manifest: {exc}") from None
    # Only the canonical form: one byte string per manifest, so its digest means one thing.
    if manifest.to_json() != manifest_json:
        raise reader.refuse("manifest: not in canonical JSON form")
    # from_json has checked the layer's file name (a plain name: it cannot lead out of
    # the staging directory), its format ("raw") and sizes.
    return manifest_json, manifest


def _rebuild_layer(
    reader: _ArchiveReader, manifest: SnapshotManifest, manifest_json: bytes, layer_path: Path
) -> None:
    """Write the archive's chunks into a new sparse file, checking records and trailer."""
    apparent_size = manifest.layer.apparent_size
    fd = os.open(layer_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, apparent_size)  # all holes; data chunks are written into it
        count = _copy_chunks(reader, fd, apparent_size)
        _check_trailer(reader, count, apparent_size, manifest_json)
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_chunks(reader: _ArchiveReader, fd: int, apparent_size: int) -> int:
    chunk_count = -(-apparent_size // CHUNK_SIZE)
    decompressor = zstandard.ZstdDecompressor()
    previous = -1
    count = 0
    while True:
        where = "the first record" if previous < 0 else f"the record after chunk {previous}"
        tag = reader.read_exact(1, where)
        if tag == _TRAILER_TAG:
            return count
        if tag != _CHUNK_TAG:
            raise reader.refuse(f"unknown record tag {tag!r} at {where}")
        index, stored_len, expected = _CHUNK.unpack(
            reader.read_exact(_CHUNK.size, f"the header of {where}")
        )
        if index <= previous:
            raise reader.refuse(f"chunk {index} after chunk {previous}: not increasing")
        if index >= chunk_count:
            raise reader.refuse(
                f"chunk {index} is outside the layer ({chunk_count} chunks of {CHUNK_SIZE})"
            )
        if stored_len > MAX_STORED_CHUNK:
            raise reader.refuse(f"chunk {index}: stored length {stored_len} is too large")
        frame = reader.read_exact(stored_len, f"chunk {index}")
        length = min(CHUNK_SIZE, apparent_size - index * CHUNK_SIZE)
        data = _inflate(reader, decompressor, frame, index, length)
        if hashlib.sha256(data).digest() != expected:
            raise reader.refuse(f"chunk {index}: digest mismatch (data altered or damaged)")
        write_sparse(fd, index * CHUNK_SIZE, data)
        previous = index
        count += 1


def _inflate(
    reader: _ArchiveReader,
    decompressor: zstandard.ZstdDecompressor,
    frame: bytes,
    index: int,
    length: int,
) -> bytes:
    """Decompress one chunk's frame to exactly ``length`` bytes, never more in memory.

    zstd's one-shot decompress trusts the size a frame declares, so a hostile frame could
    claim gigabytes: the declared size must be the chunk's, and the data is read through
    a reader bounded at ``length + 1`` bytes in case the frame lies about it.
    """
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise reader.refuse(f"chunk {index}: not a zstd frame ({exc})") from None
    if declared != length:
        shown = "no size" if declared < 0 else f"{declared} bytes"
        raise reader.refuse(
            f"chunk {index}: the compressed frame declares {shown}, the chunk holds {length}"
            + (" (decompression bomb)" if declared > length else "")
        )
    try:
        data = _read_bounded(decompressor.stream_reader(frame, read_across_frames=False),
                             length + 1)  # fmt: skip
        if len(data) > length:
            raise reader.refuse(f"chunk {index}: inflates to more than its {length} bytes")
        if len(data) < length:
            raise reader.refuse(f"chunk {index}: inflates to {len(data)} bytes, not {length}")
        # The frame is now known to inflate to exactly `length`: a second, bounded pass
        # finds bytes stored after the frame's end, which the file must not carry.
        rest = decompressor.decompressobj()
        rest.decompress(frame)
    except zstandard.ZstdError as exc:
        raise reader.refuse(f"chunk {index}: corrupt compressed data ({exc})") from None
    if not rest.eof or rest.unused_data:
        raise reader.refuse(f"chunk {index}: extra bytes after the compressed frame")
    return data


def _read_bounded(stream: zstandard.ZstdDecompressionReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size < limit:
        part = stream.read(limit - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _check_trailer(
    reader: _ArchiveReader, count: int, apparent_size: int, manifest_json: bytes
) -> None:
    stored_count, stored_size, manifest_sha = _TRAILER.unpack(
        reader.read_exact(_TRAILER.size, "the trailer")
    )
    if stored_count != count:
        raise reader.refuse(f"trailer: {stored_count} chunks recorded, {count} found")
    if stored_size != apparent_size:
        raise reader.refuse(f"trailer: layer size {stored_size}, the manifest says {apparent_size}")
    if manifest_sha != hashlib.sha256(manifest_json).digest():
        raise reader.refuse("trailer: the manifest is not the one exported (swapped or altered)")
    computed = reader.file_digest()
    stored = reader.read_exact(_DIGEST_SIZE, "the trailer's file digest", hashed=False)
    if not reader.at_end():
        raise reader.refuse("trailing bytes after the end of the archive")
    if stored != computed:
        raise reader.refuse("file digest mismatch (the archive was altered or damaged)")


def _check_rebuilt_layer(
    reader: _ArchiveReader, manifest: SnapshotManifest, layer_path: Path
) -> None:
    apparent_size = manifest.layer.apparent_size
    actual = layer_path.stat().st_size
    if actual != apparent_size:
        raise reader.refuse(f"rebuilt layer is {actual} bytes, the manifest says {apparent_size}")
    if manifest.seal is not None:
        digest = content_digest(layer_path, apparent_size)
        if digest != manifest.seal.digest:
            raise reader.refuse(
                f"seal mismatch: the layer's content is {digest}, sealed as {manifest.seal.digest}"
            )


def _renamed(manifest: SnapshotManifest, name: str) -> SnapshotManifest:
    return dataclasses.replace(manifest, name=name)
