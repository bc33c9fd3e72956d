"""Byte-stream helpers: hashing readers and transparent layer decompression."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import zlib
from typing import BinaryIO

from vmruntime.errors import LayerError

CHUNK = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a file's content."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


class HashingReader(io.RawIOBase):
    """Reads through ``inner`` while hashing and counting every byte that passes."""

    def __init__(self, inner: BinaryIO) -> None:
        super().__init__()
        self._inner = inner
        self._hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if data:
            self._hash.update(data)
            self.count += len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        # Straight into the caller's buffer: no intermediate bytes object per chunk.
        n = self._inner.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._hash.update(memoryview(buffer)[:n])
            self.count += n
        return n or 0

    def drain(self) -> None:
        """Read (and hash) whatever the consumer left, e.g. a tar's trailing padding."""
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def compression_of(head: bytes) -> str | None:
    """``"gzip"`` or ``"zstd"`` from a stream's first bytes; None for anything else."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return None


def _gzip_reader(buffered: io.BufferedReader) -> BinaryIO:
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - a declared dependency; zlib is the fallback
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    return igzip.IGzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]


def decompression_errors() -> tuple[type[BaseException], ...]:
    """What the decompressors raise on corrupt or truncated input."""
    errors: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        from isal import isal_zlib

        errors.append(isal_zlib.error)
    except ImportError:  # pragma: no cover
        pass
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def decompressed(raw: BinaryIO, layer: str) -> BinaryIO:
    """The uncompressed tar stream of a layer blob, whatever its compression.

    The compression is sniffed from the magic bytes rather than trusted from the
    media type: docker-save layers are plain tars and registries mislabel.
    """
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw, CHUNK)  # type: ignore[arg-type]
    compression = compression_of(buffered.peek(4)[:4])
    if compression == "gzip":
        # ISA-L inflates about three times faster than zlib; gunzip is most of a pull's CPU.
        return _gzip_reader(buffered)
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:  # pragma: no cover - a declared dependency
            raise LayerError(
                layer, "zstd-compressed layer but zstandard is not installed"
            ) from None
        return zstandard.ZstdDecompressor().stream_reader(buffered, read_size=CHUNK)  # type: ignore[return-value]
    return buffered  # type: ignore[return-value]
