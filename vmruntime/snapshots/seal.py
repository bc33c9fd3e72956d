"""A layer's content in chunks, and the seal: one digest over it that skips holes quickly.

Who uses it: sealing and verifying (:func:`content_digest`), the export archive and the
shared store (:func:`iter_chunks`: zero chunks are never read, stored or sent). What it
promises: the layer is cut into :data:`CHUNK_SIZE` chunks (the last one may be short);
a chunk that is all zero bytes, stored as a hole or written, is a *zero chunk* with a
known digest, and holes are found with ``SEEK_DATA``/``SEEK_HOLE`` without reading
them. The seal ("sha256-chunks-v1") is ``sha256(chunk digests in order || apparent size
as 8 big-endian bytes)``: it depends on the content only, not on how zeros are stored.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vmruntime.snapshots.manifest import CHUNK_SIZE


@dataclass(frozen=True)
class Chunk:
    """Chunk ``index`` of a layer: ``length`` bytes at ``offset``; ``data`` is None for a
    zero chunk, whose digest is :func:`zero_digest` of its length."""

    index: int
    offset: int
    length: int
    data: bytes | None

    @property
    def is_zero(self) -> bool:
        return self.data is None

    def digest(self) -> bytes:
        return zero_digest(self.length) if self.data is None else hashlib.sha256(self.data).digest()


@lru_cache(maxsize=4)
def zero_digest(length: int) -> bytes:
    return hashlib.sha256(bytes(length)).digest()


def chunk_count(apparent_size: int) -> int:
    return -(-apparent_size // CHUNK_SIZE)


def iter_chunks(path: Path, apparent_size: int | None = None) -> Iterator[Chunk]:
    """Every chunk of the file at ``path`` in order (``apparent_size``: its size, checked)."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if apparent_size is not None and size != apparent_size:
            raise ValueError(f"{path} holds {size} bytes, not {apparent_size}")
        next_data = _next_data(file.fileno(), 0, size)
        for index in range(chunk_count(size)):
            offset = index * CHUNK_SIZE
            length = min(CHUNK_SIZE, size - offset)
            if next_data >= offset + length:  # the whole chunk is a hole
                yield Chunk(index, offset, length, None)
                continue
            data = os.pread(file.fileno(), length, offset)
            if len(data) != length:
                raise OSError(errno.EIO, f"{path}: short read at {offset}")
            next_data = _next_data(file.fileno(), offset + length, size)
            yield Chunk(index, offset, length, None if _all_zero(data) else data)


def content_digest(path: Path, apparent_size: int | None = None) -> str:
    """The seal of the file at ``path`` (see the module)."""
    total = hashlib.sha256()
    size = 0
    for chunk in iter_chunks(path, apparent_size):
        total.update(chunk.digest())
        size = chunk.offset + chunk.length
    total.update(size.to_bytes(8, "big"))
    return "sha256:" + total.hexdigest()


def seal_of_chunk_digests(digests: Mapping[int, str], size: int) -> str:
    """The seal of a file of ``size`` bytes whose non-zero chunks have these hex digests
    (by index; a chunk not listed is a zero chunk): the value :func:`content_digest`
    reads from the file, for writers and readers that hash each chunk anyway."""
    total = hashlib.sha256()
    for index in range(chunk_count(size)):
        digest = digests.get(index)
        if digest is None:
            total.update(zero_digest(min(CHUNK_SIZE, size - index * CHUNK_SIZE)))
        else:
            total.update(bytes.fromhex(digest))
    total.update(size.to_bytes(8, "big"))
    return "sha256:" + total.hexdigest()


def _next_data(fd: int, offset: int, size: int) -> int:
    """Where the next data at or after ``offset`` starts (``size`` if none is left)."""
    if offset >= size:
        return size
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # only a hole is left
            return size
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here: read it all
            return offset
        raise


_ZEROS = bytes(CHUNK_SIZE)
HOLE_BLOCK = 4096  # the block size a rebuilt layer keeps sparse at, as ext4 wrote it


def _all_zero(data: bytes) -> bool:
    return data == _ZEROS[: len(data)]  # one memcmp


def write_sparse(fd: int, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of a file made of holes (``ftruncate``d to its size),
    leaving its all-zero :data:`HOLE_BLOCK` blocks as holes: import and pull rebuild a
    layer as sparse as it was."""
    view = memoryview(data)
    run_start: int | None = None
    for pos in range(0, len(data), HOLE_BLOCK):
        is_zero = _all_zero(data[pos : pos + HOLE_BLOCK])  # a bytes compare: one memcmp
        if not is_zero and run_start is None:
            run_start = pos
        elif is_zero and run_start is not None:
            _pwrite_all(fd, view[run_start:pos], offset + run_start)
            run_start = None
    if run_start is not None:
        _pwrite_all(fd, view[run_start:], offset + run_start)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written
