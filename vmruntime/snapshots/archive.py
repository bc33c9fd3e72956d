"""One-file export and import of a snapshot (the "vmrsnap" archive, format versions 1 and 2).

Who calls it: :meth:`Snapshot.export`, ``vmr snapshot export|import`` and anyone moving a
snapshot between machines without a shared store. What it promises: an export holds the
manifest and only the non-zero chunks of the snapshot's data files (the layer; a memory
snapshot's RAM and device state too), each zstd-compressed (holes are never read nor
stored); an import checks every byte of the file, the seal if there is one and a memory
snapshot's file digests, before anything is visible under a name, and refuses a bad file
with a :class:`SnapshotImportError` that names what failed. The format is described in
docs/snapshots.md, "Export archive"; this module is its reference.

Layout (integers big-endian)::

    header   magic(12) version(u16) flags(u16)=0 chunk_size(u32) manifest_len(u32)
    manifest manifest_len bytes: the manifest's canonical JSON
    per data file of the manifest, in order (version 1: the layer only, a schema-1
    manifest; version 2: layer, RAM, device state, a schema-2 manifest):
      chunks zero or more of: "C" index(u64) stored_len(u32) sha256(32) zstd_frame(stored_len)
             indexes strictly increasing within the file; sha256 of the uncompressed bytes
      end    version 2 only: "E" chunk_count(u64) file_size(u64)
    trailer  "T" chunk_count(u64) apparent_size(u64) manifest_sha256(32)
             file_sha256(32): sha256 of every byte before it
             (count and size summed over the files: version 1 has one)
    end of file
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import struct
from collections.abc import Callable
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
from vmruntime.snapshots.manifest import CHUNK_SIZE, DataFile, SnapshotManifest
from vmruntime.snapshots.names import check_name
from vmruntime.snapshots.seal import (
    content_digest,
    iter_chunks,
    seal_of_chunk_digests,
    write_sparse,
)
from vmruntime.snapshots.store import Snapshot, SnapshotStore

# PNG-style magic: a non-ASCII first byte, and CR LF / ^Z / LF to catch a text-mode copy.
MAGIC = b"\x89VMRSNAP\r\n\x1a\n"
FORMAT_VERSION = 1  # a disk snapshot (schema-1 manifest): the layer
MEMORY_FORMAT_VERSION = 2  # a memory snapshot (schema 2): layer, RAM, device state
FORMAT_VERSIONS = (FORMAT_VERSION, MEMORY_FORMAT_VERSION)
_HEADER = struct.Struct(">12sHHII")  # magic, version, flags, chunk_size, manifest_len
_CHUNK = struct.Struct(">QI32s")  # after b"C": index, stored_len, sha256 of the data
_TRAILER = struct.Struct(">QQ32s")  # after b"T": chunk_count, apparent_size, manifest sha256
_END = struct.Struct(">QQ")  # after b"E" (version 2): the file's chunk_count and size
_CHUNK_TAG = b"C"
_END_TAG = b"E"
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
    A file whose content no longer matches its recorded digest (a sealed layer, a memory
    snapshot's RAM or device state) is refused (:class:`SnapshotCorruptError`): the import
    would refuse it anyway.
    """
    path = Path(path)
    manifest = snapshot.manifest
    for file in manifest.files:
        if not (snapshot.path / file).is_file():
            raise SnapshotCorruptError(snapshot.name, f"{snapshot.path / file} is missing")
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
                chunks = _write_archive(out, manifest, snapshot.path)
            except ValueError as exc:  # a file's size or content is not the manifest's
                raise SnapshotCorruptError(snapshot.name, str(exc)) from None
            out.flush()
            os.fsync(out.fileno())
        size = temp.stat().st_size
        os.replace(temp, path)
    except OSError as exc:  # a full disk, a file that cannot be read
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
    into the imported manifest (which changes its digest, not the files or their digests).
    ``expected_digest`` pins the archive's manifest digest (``sha256:<hex>``, as
    ``vmr snapshot export`` prints it): the only check that a whole-file forgery cannot
    pass, and with a seal (and a memory snapshot's digests) it pins the content too.

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
        version, manifest_json, manifest = _read_header_and_manifest(reader)
        if expected_digest is not None and manifest.digest() != expected_digest:
            raise reader.refuse(
                f"manifest digest is {manifest.digest()}, expected {expected_digest}"
            )
        target = check_name(name if name is not None else manifest.name)
        if store.exists(target):  # early, before the expensive part; commit checks again
            raise SnapshotExistsError(target)
        imported = manifest if target == manifest.name else _renamed(manifest, target)
        with store.create(target) as staging:
            _rebuild_files(reader, version, manifest, manifest_json, staging.path)
            _check_rebuilt_files(reader, manifest, staging.path)
            staging.commit(imported)
    return store.get(target)


# --- writing -----------------------------------------------------------------


def _write_archive(out: BinaryIO, manifest: SnapshotManifest, directory: Path) -> int:
    """The archive of ``manifest`` and its data files in ``directory``; its chunk count.
    A schema-1 snapshot gives the same bytes as before version 2 existed."""
    digest = hashlib.sha256()

    def put(data: bytes) -> None:
        out.write(data)
        digest.update(data)

    version = FORMAT_VERSION if manifest.memory is None else MEMORY_FORMAT_VERSION
    manifest_json = manifest.to_json()
    put(_HEADER.pack(MAGIC, version, 0, CHUNK_SIZE, len(manifest_json)))
    put(manifest_json)
    compressor = zstandard.ZstdCompressor(level=_COMPRESSION_LEVEL, write_content_size=True)
    count = 0
    for data_file in manifest.data_files:
        file_count = _write_file(put, compressor, directory / data_file.file, data_file)
        if version == MEMORY_FORMAT_VERSION:
            put(_END_TAG + _END.pack(file_count, data_file.size))
        count += file_count
    manifest_sha = hashlib.sha256(manifest_json).digest()
    total_size = sum(data_file.size for data_file in manifest.data_files)
    put(_TRAILER_TAG + _TRAILER.pack(count, total_size, manifest_sha))
    out.write(digest.digest())
    return count


def _write_file(
    put: Callable[[bytes], None],
    compressor: zstandard.ZstdCompressor,
    path: Path,
    data_file: DataFile,
) -> int:
    """One file's chunk records (holes and zero chunks skipped); how many. Its content
    digest, when the manifest records one, is checked from the chunk digests on the way."""
    digests: dict[int, str] = {}
    for chunk in iter_chunks(path, data_file.size):
        if chunk.data is None:
            continue
        sha = hashlib.sha256(chunk.data).digest()
        frame = compressor.compress(chunk.data)
        put(_CHUNK_TAG + _CHUNK.pack(chunk.index, len(frame), sha))
        put(frame)
        digests[chunk.index] = sha.hex()
    if data_file.digest is not None:
        actual = seal_of_chunk_digests(digests, data_file.size)
        if actual != data_file.digest:
            raise ValueError(f"{path} is {actual}, the manifest records {data_file.digest}")
    return len(digests)


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


def _read_header_and_manifest(reader: _ArchiveReader) -> tuple[int, bytes, SnapshotManifest]:
    magic, version, flags, chunk_size, manifest_len = _HEADER.unpack(
        reader.read_exact(_HEADER.size, "the header")
    )
    if magic != MAGIC:
        raise reader.refuse("not a vmr snapshot archive (bad magic)")
    if version not in FORMAT_VERSIONS:
        raise reader.refuse(f"unsupported archive format version {version} (this vmruntime "
                            f"reads versions {', '.join(map(str, FORMAT_VERSIONS))})")  # fmt: skip
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
    # Which files follow is the version's: a memory manifest in a version-1 archive would
    # import without its RAM, a disk one in version 2 is not what any exporter writes.
    wanted = FORMAT_VERSION if manifest.memory is None else MEMORY_FORMAT_VERSION
    if version != wanted:
        kind = "a disk snapshot's" if manifest.memory is None else "a memory snapshot's"
        raise reader.refuse(f"format version {version} with {kind} manifest (schema "
                            f"{manifest.schema}): want version {wanted}")  # fmt: skip
    # from_json has checked the files' names (plain names, distinct: none can lead out of
    # the staging directory or clash), the layer's format ("raw") and every size.
    return version, manifest_json, manifest


def _rebuild_files(reader: _ArchiveReader, version: int, manifest: SnapshotManifest,
                   manifest_json: bytes, directory: Path) -> None:  # fmt: skip
    """Write every data file from the archive's chunks, sparse, checking the records,
    each file's end (version 2) and the trailer."""
    count = 0
    end_tag = _TRAILER_TAG if version == FORMAT_VERSION else _END_TAG
    for data_file in manifest.data_files:
        file_count = _rebuild_file(reader, data_file, directory / data_file.file, end_tag)
        if end_tag == _END_TAG:
            _check_file_end(reader, data_file, file_count)
        count += file_count
    if version == MEMORY_FORMAT_VERSION:
        tag = reader.read_exact(1, "the trailer")
        if tag != _TRAILER_TAG:
            raise reader.refuse(f"record tag {tag!r} after the last file: want the trailer")
    total_size = sum(data_file.size for data_file in manifest.data_files)
    what = "layer size" if version == FORMAT_VERSION else "total size of the files"
    _check_trailer(reader, count, total_size, manifest_json, what)


def _rebuild_file(reader: _ArchiveReader, data_file: DataFile, path: Path,
                  end_tag: bytes) -> int:  # fmt: skip
    """One file from its chunk records up to ``end_tag`` (read); how many records."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, data_file.size)  # all holes; data chunks are written into it
        count = _copy_chunks(reader, fd, data_file, end_tag)
        os.fsync(fd)
    finally:
        os.close(fd)
    return count


def _check_file_end(reader: _ArchiveReader, data_file: DataFile, count: int) -> None:
    stored_count, stored_size = _END.unpack(
        reader.read_exact(_END.size, f"the end record of {data_file.file}")
    )
    if stored_count != count:
        raise reader.refuse(f"{data_file.file}: {stored_count} chunks recorded, {count} found")
    if stored_size != data_file.size:
        raise reader.refuse(f"{data_file.file}: the archive says {stored_size} bytes, the "
                            f"manifest {data_file.size}")  # fmt: skip


def _chunk_label(data_file: DataFile, index: int) -> str:
    """How errors name a chunk: "chunk 3" of the layer (as in version 1), "chunk 3 of
    memory.ram" of another file."""
    return f"chunk {index}" if data_file.role == "layer" else f"chunk {index} of {data_file.file}"


def _copy_chunks(reader: _ArchiveReader, fd: int, data_file: DataFile, end_tag: bytes) -> int:
    size = data_file.size
    chunk_count = -(-size // CHUNK_SIZE)
    where_file = "the layer" if data_file.role == "layer" else data_file.file
    decompressor = zstandard.ZstdDecompressor()
    previous = -1
    count = 0
    while True:
        where = (f"the first record of {where_file}" if previous < 0
                 else f"the record after {_chunk_label(data_file, previous)}")  # fmt: skip
        tag = reader.read_exact(1, where)
        if tag == end_tag:
            return count
        if tag != _CHUNK_TAG:
            raise reader.refuse(f"unknown record tag {tag!r} at {where}")
        index, stored_len, expected = _CHUNK.unpack(
            reader.read_exact(_CHUNK.size, f"the header of {where}")
        )
        label = _chunk_label(data_file, index)
        if index <= previous:
            raise reader.refuse(f"{label} after chunk {previous}: not increasing")
        if index >= chunk_count:
            raise reader.refuse(
                f"{label} is outside {where_file} ({chunk_count} chunks of {CHUNK_SIZE})"
            )
        if stored_len > MAX_STORED_CHUNK:
            raise reader.refuse(f"{label}: stored length {stored_len} is too large")
        frame = reader.read_exact(stored_len, label)
        length = min(CHUNK_SIZE, size - index * CHUNK_SIZE)
        data = _inflate(reader, decompressor, frame, label, length)
        if hashlib.sha256(data).digest() != expected:
            raise reader.refuse(f"{label}: digest mismatch (data altered or damaged)")
        write_sparse(fd, index * CHUNK_SIZE, data)
        previous = index
        count += 1


def _inflate(
    reader: _ArchiveReader,
    decompressor: zstandard.ZstdDecompressor,
    frame: bytes,
    label: str,
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
        raise reader.refuse(f"{label}: not a zstd frame ({exc})") from None
    if declared != length:
        shown = "no size" if declared < 0 else f"{declared} bytes"
        raise reader.refuse(
            f"{label}: the compressed frame declares {shown}, the chunk holds {length}"
            + (" (decompression bomb)" if declared > length else "")
        )
    try:
        data = _read_bounded(decompressor.stream_reader(frame, read_across_frames=False),
                             length + 1)  # fmt: skip
        if len(data) > length:
            raise reader.refuse(f"{label}: inflates to more than its {length} bytes")
        if len(data) < length:
            raise reader.refuse(f"{label}: inflates to {len(data)} bytes, not {length}")
        # The frame is now known to inflate to exactly `length`: a second, bounded pass
        # finds bytes stored after the frame's end, which the file must not carry.
        rest = decompressor.decompressobj()
        rest.decompress(frame)
    except zstandard.ZstdError as exc:
        raise reader.refuse(f"{label}: corrupt compressed data ({exc})") from None
    if not rest.eof or rest.unused_data:
        raise reader.refuse(f"{label}: extra bytes after the compressed frame")
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


def _check_trailer(reader: _ArchiveReader, count: int, apparent_size: int,
                   manifest_json: bytes, what: str) -> None:  # fmt: skip
    stored_count, stored_size, manifest_sha = _TRAILER.unpack(
        reader.read_exact(_TRAILER.size, "the trailer")
    )
    if stored_count != count:
        raise reader.refuse(f"trailer: {stored_count} chunks recorded, {count} found")
    if stored_size != apparent_size:
        raise reader.refuse(f"trailer: {what} {stored_size}, the manifest says {apparent_size}")
    if manifest_sha != hashlib.sha256(manifest_json).digest():
        raise reader.refuse("trailer: the manifest is not the one exported (swapped or altered)")
    computed = reader.file_digest()
    stored = reader.read_exact(_DIGEST_SIZE, "the trailer's file digest", hashed=False)
    if not reader.at_end():
        raise reader.refuse("trailing bytes after the end of the archive")
    if stored != computed:
        raise reader.refuse("file digest mismatch (the archive was altered or damaged)")


def _check_rebuilt_files(reader: _ArchiveReader, manifest: SnapshotManifest,
                         directory: Path) -> None:  # fmt: skip
    """Each rebuilt file has the manifest's size and, where the manifest records one, its
    content digest (the layer's seal; a memory snapshot's RAM and device state always)."""
    for data_file in manifest.data_files:
        path = directory / data_file.file
        actual = path.stat().st_size
        if actual != data_file.size:
            raise reader.refuse(f"rebuilt {data_file.file} is {actual} bytes, the manifest "
                                f"says {data_file.size}")  # fmt: skip
        if data_file.digest is None:
            continue
        digest = content_digest(path, data_file.size)
        if digest != data_file.digest:
            what = "seal mismatch: the layer's" if data_file.role == "layer" else (
                f"digest mismatch: {data_file.file}'s")  # fmt: skip
            raise reader.refuse(f"{what} content is {digest}, the manifest records "
                                f"{data_file.digest}")  # fmt: skip


def _renamed(manifest: SnapshotManifest, name: str) -> SnapshotManifest:
    return dataclasses.replace(manifest, name=name)
