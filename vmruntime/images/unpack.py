"""Turning a layer blob into its EROFS image, while the blob is still arriving.

Who calls it: :mod:`vmruntime.images.ingest`.

What it promises: the blob's bytes are decompressed once; the uncompressed
stream is hashed for the diff_id check and, in the same pass, written as the
layer's EROFS image. Nothing is installed in the cache by this module unless
the diff_id matches. :class:`LayerPipeline` runs that work in a thread fed
with the chunks a download writes, so decompression and image building overlap
the transfer instead of following it; the blob's own digest is still checked
by the caller before anything is installed.
"""

from __future__ import annotations

import io
import queue
import threading
from pathlib import Path
from typing import BinaryIO

from vmruntime.errors import DigestMismatchError, ImageError, LayerError
from vmruntime.images.store import ImageStore, StagedBlob
from vmruntime.images.streams import HashingReader, decompressed, decompression_errors
from vmruntime.rootfs.erofs import build_erofs_from_tar

_DECOMPRESSION_ERRORS = decompression_errors()
# Chunks in flight between a download and its unpacker: bounded, so memory is too.
_PIPE_DEPTH = 16


def unpack_stream(
    store: ImageStore, raw: BinaryIO, layer_digest: str, diff_id: str, temp: Path | None
) -> None:
    """Read a layer blob from ``raw``: check its diff_id; build its image into ``temp``.

    With ``temp`` None only the diff_id is checked. A diff_id mismatch wins over
    any error from building, since a wrong diff_id is the precise diagnosis.
    """
    build_error: ImageError | None = None
    try:
        reader = HashingReader(decompressed(raw, layer_digest))
        try:
            if temp is not None:
                build_erofs_from_tar(reader, temp, layer=layer_digest)
        except ImageError as exc:
            build_error = exc
        reader.drain()
    except _DECOMPRESSION_ERRORS as exc:
        raise LayerError(layer_digest, f"corrupt compressed data ({exc})") from None
    except OSError as exc:
        raise store.os_error(exc, temp or store.tmp_dir) from exc
    if reader.digest != diff_id:
        raise DigestMismatchError(
            f"layer {layer_digest} (uncompressed, config diff_id)", diff_id, reader.digest
        )
    if build_error is not None:
        raise build_error


def unpack_file(store: ImageStore, blob_file: Path, layer_digest: str, diff_id: str) -> None:
    """Build and install the image of a layer whose verified blob is already on disk."""
    temp = store.temp_path(f"{diff_id.split(':', 1)[1][:16]}.erofs")
    try:
        with open(blob_file, "rb") as raw:
            unpack_stream(store, raw, layer_digest, diff_id, temp)
        store.install(temp, store.rootfs_path(diff_id))
    finally:
        temp.unlink(missing_ok=True)


class _Aborted(Exception):
    """The feeding side gave up on this attempt (a retry starts a new pipeline)."""


class _ChunkPipe(io.RawIOBase):
    """A bounded in-memory pipe from a writer thread to a reading thread."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: queue.Queue[bytes | None] = queue.Queue(_PIPE_DEPTH)
        self._pending = memoryview(b"")
        self._eof = False
        self.reader_gone = threading.Event()
        self.aborted = threading.Event()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.aborted.is_set():
            raise _Aborted
        while not self._pending:
            if self._eof:
                return 0
            item = self._queue.get()
            if self.aborted.is_set():
                raise _Aborted
            if item is None:
                self._eof = True
                return 0
            self._pending = memoryview(item)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def put(self, item: bytes | None) -> None:
        """Hand over a chunk (None ends the stream); never blocks once the reader is gone."""
        while not self.reader_gone.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def abort(self) -> None:
        self.aborted.set()
        self.put(None)


class LayerPipeline:
    """Unpacks one layer in a thread from the chunks a download hands it.

    Used as the sink of :meth:`BlobSource.copy_blob`: ``write`` and ``reset`` go
    both to the staged blob and to the unpacker. A ``reset`` (a retried transfer)
    abandons the current unpacker and starts afresh.
    """

    def __init__(self, store: ImageStore, staged: StagedBlob, diff_id: str, *, build: bool):
        self.store = store
        self.staged = staged
        self.diff_id = diff_id
        self.build = build
        self._pipe: _ChunkPipe | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._temp: Path | None = None

    @property
    def written(self) -> int:
        return self.staged.written

    def write(self, chunk: bytes) -> None:
        self.staged.write(chunk)
        if self._pipe is None:
            self._start()
        assert self._pipe is not None
        self._pipe.put(chunk)

    def reset(self) -> None:
        self.staged.reset()
        self._stop()

    def finish(self) -> None:
        """End the stream, wait for the unpacker, and raise what it found wrong."""
        if self._pipe is None:
            self._start()
        assert self._pipe is not None and self._thread is not None
        self._pipe.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def install(self) -> None:
        """Move the built image into the cache (after every check has passed)."""
        if self.build and self._temp is not None:
            self.store.install(self._temp, self.store.rootfs_path(self.diff_id))

    def close(self) -> None:
        """Stop the unpacker if it still runs and remove its temporary file."""
        self._stop()

    def _start(self) -> None:
        self._pipe = _ChunkPipe()
        self._error = None
        if self.build:
            self._temp = self.store.temp_path(f"{self.diff_id.split(':', 1)[1][:16]}.erofs")
        self._thread = threading.Thread(
            target=self._run, args=(self._pipe, self._temp), name="unpack", daemon=True
        )
        self._thread.start()

    def _run(self, pipe: _ChunkPipe, temp: Path | None) -> None:
        try:
            unpack_stream(
                self.store,
                io.BufferedReader(pipe, 1024 * 1024),
                self.staged.digest,
                self.diff_id,
                temp,
            )
        except _Aborted:
            pass
        except BaseException as exc:  # handed to the downloading thread by finish()
            self._error = exc
        finally:
            pipe.reader_gone.set()

    def _stop(self) -> None:
        if self._pipe is not None and self._thread is not None:
            self._pipe.abort()
            self._thread.join()
        self._pipe = self._thread = None
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None
