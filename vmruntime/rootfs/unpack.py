"""Turning a layer blob into its EROFS image, while the blob is still arriving.

Who calls it: :class:`vmruntime.rootfs.layers.ErofsLayers`, the layer handler that
:mod:`vmruntime.images.ingest` feeds while a layer downloads.

What it promises: the blob's bytes are decompressed once; the uncompressed
stream is hashed for the diff_id check and, in the same pass, written as the
layer's EROFS image. Nothing is installed in the cache unless the diff_id
matches (and the caller has checked the blob's own digest).

:class:`LayerPipeline` is the sink a download writes into: every chunk goes to
the staged blob and to an unpacker, so decompression and image building overlap
the transfer instead of following it. Large layers are unpacked in a worker
process (``python -m vmruntime.rootfs.unpack_worker``), since that work is mostly
Python holding the GIL and several layers arrive at once; small ones in a
thread, where a process's start-up would cost more than it saves.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from vmruntime._streams import CHUNK, HashingReader, decompressed, decompression_errors
from vmruntime.errors import DigestMismatchError, LayerError
from vmruntime.rootfs.erofs import build_erofs_from_tar

if TYPE_CHECKING:  # the unpack worker imports this module and must start fast
    from vmruntime.images.store import ImageStore, StagedBlob

_DECOMPRESSION_ERRORS = decompression_errors()
# Chunks in flight between a download and a thread unpacker: bounded, so memory is too.
_PIPE_DEPTH = 16
# Compressed size from which a layer is unpacked in its own process.
PROCESS_THRESHOLD = 1024 * 1024
_F_SETPIPE_SZ = 1031
WORKER_MODULE = "vmruntime.rootfs.unpack_worker"


@dataclass(frozen=True)
class Outcome:
    """What unpacking found: the stream's real diff_id, and a build failure if any."""

    diff_id: str
    build_error: LayerError | None = None


def digest_and_build(raw: BinaryIO, layer_digest: str, temp: Path | None) -> Outcome:
    """Decompress ``raw`` once, hash it, and build its image into ``temp`` (if given).

    A broken tar does not stop the hashing: the diff_id is still computed, since
    a wrong diff_id is the more precise diagnosis. Raises LayerError for corrupt
    compressed data and OSError for local I/O failures.
    """
    build_error: LayerError | None = None
    try:
        reader = HashingReader(decompressed(raw, layer_digest))
        try:
            if temp is not None:
                build_erofs_from_tar(reader, temp, layer=layer_digest)
        except LayerError as exc:
            build_error = exc
        reader.drain()
    except _DECOMPRESSION_ERRORS as exc:
        raise LayerError(layer_digest, f"corrupt compressed data ({exc})") from None
    return Outcome(reader.digest, build_error)


def check_outcome(outcome: Outcome, layer_digest: str, diff_id: str) -> None:
    if outcome.diff_id != diff_id:
        raise DigestMismatchError(
            f"layer {layer_digest} (uncompressed, config diff_id)", diff_id, outcome.diff_id
        )
    if outcome.build_error is not None:
        raise outcome.build_error


def unpack_file(store: ImageStore, blob_file: Path, layer_digest: str, diff_id: str, *,
                temp: Path, dest: Path) -> None:  # fmt: skip
    """Build the image of a layer whose verified blob is already on disk into ``temp``,
    and install it at ``dest`` once the diff_id matched."""
    try:
        with open(blob_file, "rb") as raw:
            outcome = digest_and_build(raw, layer_digest, temp)
        check_outcome(outcome, layer_digest, diff_id)
        store.install(temp, dest)
    except OSError as exc:
        raise store.os_error(exc, temp) from exc
    finally:
        temp.unlink(missing_ok=True)


# --- unpackers: where the work runs ----------------------------------------


class _Unpacker(Protocol):
    def feed(self, chunk: bytes) -> None: ...
    def finish(self) -> Outcome: ...
    def abort(self) -> None: ...


class _Aborted(Exception):
    """The feeding side gave up on this attempt (a retry starts a new unpacker)."""


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
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return

    def abort(self) -> None:
        self.aborted.set()
        self.put(None)


class _ThreadUnpacker:
    """Unpacks in a thread of this process (for small layers)."""

    def __init__(self, layer_digest: str, temp: Path | None) -> None:
        self._pipe = _ChunkPipe()
        self._outcome: Outcome | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(layer_digest, temp), name="unpack", daemon=True
        )
        self._thread.start()

    def _run(self, layer_digest: str, temp: Path | None) -> None:
        try:
            self._outcome = digest_and_build(
                io.BufferedReader(self._pipe, CHUNK), layer_digest, temp
            )
        except _Aborted:
            pass
        except BaseException as exc:  # handed to the feeding thread by finish()
            self._error = exc
        finally:
            self._pipe.reader_gone.set()

    def feed(self, chunk: bytes) -> None:
        self._pipe.put(chunk)

    def finish(self) -> Outcome:
        self._pipe.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome

    def abort(self) -> None:
        self._pipe.abort()
        self._thread.join()


class _ProcessUnpacker:
    """Unpacks in a worker process fed through a pipe (for large layers).

    If this process dies, the worker reads end-of-file, fails on the truncated
    stream and exits: it never outlives its feeder.
    """

    def __init__(self, layer_digest: str, temp: Path | None) -> None:
        self.layer_digest = layer_digest
        self._proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, layer_digest, str(temp or "-")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
        assert self._proc.stdin is not None
        with contextlib.suppress(OSError):  # a bigger pipe means fewer wake-ups
            fcntl.fcntl(self._proc.stdin.fileno(), _F_SETPIPE_SZ, CHUNK)
        self._worker_gone = False

    def feed(self, chunk: bytes) -> None:
        if self._worker_gone:
            return  # it failed early; finish() reports why
        try:
            self._proc.stdin.write(chunk)  # type: ignore[union-attr]
        except BrokenPipeError:
            self._worker_gone = True

    def finish(self) -> Outcome:
        try:
            out, err = self._proc.communicate()  # closes stdin: end of the stream
        except BrokenPipeError:  # the worker already quit; its answer is on stdout
            out, err = self._proc.stdout.read(), self._proc.stderr.read()  # type: ignore[union-attr]
            self._proc.wait()
        return _decode_worker_answer(self.layer_digest, out, err, self._proc.returncode)

    def abort(self) -> None:
        self._proc.kill()
        with contextlib.suppress(BrokenPipeError):
            self._proc.communicate()


def _decode_worker_answer(layer: str, out: bytes, err: bytes, returncode: int) -> Outcome:
    try:
        answer = json.loads(out)
    except ValueError:
        tail = err.decode(errors="replace").strip().splitlines()[-5:]
        raise LayerError(
            layer, f"unpack worker failed (exit {returncode}): {' | '.join(tail)}"
        ) from None
    if "oserror" in answer:
        e = answer["oserror"]
        raise OSError(e["errno"], e["strerror"], e.get("filename"))
    if "layer_error" in answer:
        raise _layer_error(answer["layer_error"])
    build_error = answer.get("build_error")
    return Outcome(answer["diff_id"], _layer_error(build_error) if build_error else None)


def _layer_error(data: dict[str, str | None]) -> LayerError:
    return LayerError(str(data["layer"]), str(data["reason"]), data.get("member"))


def encode_layer_error(exc: LayerError) -> dict[str, str | None]:
    return {"layer": exc.layer, "reason": exc.reason, "member": exc.member}


# --- the sink a download writes into ----------------------------------------


class LayerPipeline:
    """Unpacks one layer from the chunks a download writes, as they arrive.

    Used as the sink of ``BlobSource.copy_blob`` (it is the
    :class:`~vmruntime.images.ingest.LayerSink` of
    :class:`~vmruntime.rootfs.layers.ErofsLayers`): ``write`` and
    ``reset`` go both to the staged blob and to the unpacker. A ``reset`` (a retried
    transfer) abandons the current unpacker and starts afresh.
    """

    def __init__(self, store: ImageStore, staged: StagedBlob, diff_id: str, *, size: int,
                 temp_for: Callable[[], Path], dest: Path) -> None:  # fmt: skip
        self.store = store
        self.staged = staged
        self.diff_id = diff_id
        self._temp_for = temp_for  # a fresh temporary path per attempt
        self._dest = dest
        self._use_process = size >= PROCESS_THRESHOLD
        self._unpacker: _Unpacker | None = None
        self._temp: Path | None = None

    @property
    def written(self) -> int:
        return self.staged.written

    def write(self, chunk: bytes) -> None:
        self.staged.write(chunk)
        self._current().feed(chunk)

    def reset(self) -> None:
        self.staged.reset()
        self.close()

    def finish(self) -> None:
        """End the stream, wait for the unpacker, and raise what it found wrong."""
        unpacker = self._current()
        try:
            outcome = unpacker.finish()
        except OSError as exc:
            raise self.store.os_error(exc, self._temp or self.store.tmp_dir) from exc
        finally:
            self._unpacker = None
        check_outcome(outcome, self.staged.digest, self.diff_id)

    def install(self) -> None:
        """Move the built image into the cache (after every check has passed)."""
        if self._temp is not None:
            self.store.install(self._temp, self._dest)

    def close(self) -> None:
        """Stop an unpacker still running and remove its temporary file."""
        if self._unpacker is not None:
            self._unpacker.abort()
            self._unpacker = None
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None

    def _current(self) -> _Unpacker:
        if self._unpacker is None:
            self._temp = self._temp_for()
            kind = _ProcessUnpacker if self._use_process else _ThreadUnpacker
            self._unpacker = kind(self.staged.digest, self._temp)
        return self._unpacker
