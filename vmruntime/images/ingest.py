"""Bringing an image's blobs into the cache, from any source, with every check.

Who calls it: :mod:`~vmruntime.images.pull` (a registry) and
:mod:`~vmruntime.images.load` (an OCI layout, an OCI archive, a docker-save tar).

What it promises: every blob is verified against its digest and size while it
is written, and enters the cache only then, so a tampered or truncated blob leaves
the cache exactly as it was. A reference is recorded last. An interrupted ingest
(Ctrl-C) cancels the transfers in flight and returns at once: the blobs verified
by then stay, so the next pull or load resumes from them.

What a layer becomes besides a blob is not this package's business: a caller that
wants more (a filesystem image, say) passes a :class:`LayerHandler`, which is fed
each layer's bytes while they download and checks the layer's diff_id as it
decompresses them; the blob and the handler's product are installed together, only
after every check passed. :class:`vmruntime.rootfs.layers.ErofsLayers` is the one
the runtime uses.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

from vmruntime.images.manifest import (
    Descriptor,
    ImageConfig,
    ImageManifest,
    check_layers_match_config,
    parse_config,
)
from vmruntime.images.store import ImageStore, RefRecord, StagedBlob

ProgressFactory = Callable[[Descriptor, str], "Progress"]
_PARALLEL_LAYERS = 3
# How long an interrupted ingest waits for its transfers to remove their temporary
# files and unpack workers before it returns anyway (Ctrl-C must return within 1 s).
_CANCEL_GRACE = 0.5


class Progress(Protocol):
    def advance(self, nbytes: int) -> None: ...
    def reset(self) -> None: ...
    def done(self, status: str) -> None: ...


class _NoProgress:
    def advance(self, nbytes: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def done(self, status: str) -> None:
        pass


def no_progress(desc: Descriptor, label: str) -> Progress:
    return _NoProgress()


class BlobSink(Protocol):
    """Where a source writes a blob: a staged blob, or a pipeline that also unpacks it."""

    @property
    def written(self) -> int: ...
    def write(self, chunk: bytes) -> None: ...
    def reset(self) -> None: ...


class LayerSink(BlobSink, Protocol):
    """A handler's sink for one layer download (see :meth:`LayerHandler.sink`)."""

    def finish(self) -> None:
        """The stream has ended: raise DigestMismatchError for a wrong diff_id, or why
        the product could not be made."""

    def install(self) -> None:
        """Put the product in place (every check has passed)."""

    def close(self) -> None:
        """Remove whatever was not installed (always called last)."""


class LayerHandler(Protocol):
    """What becomes of each layer besides its blob; keyed by the layer's diff_id."""

    def path(self, diff_id: str) -> Path: ...
    def ready(self, diff_id: str) -> bool: ...
    def lock(self, diff_id: str) -> AbstractContextManager[object]: ...
    def sink(self, staged: StagedBlob, diff_id: str, size: int) -> LayerSink: ...
    def from_blob(self, blob: Path, layer_digest: str, diff_id: str) -> None: ...


class BlobSource(Protocol):
    """Somewhere blobs come from. ``copy_blob`` writes the blob's bytes into ``sink``.

    A source that can fail transiently (a network) retries inside ``copy_blob``,
    calling ``sink.reset()`` before each new attempt. A source whose reads can block
    (a network) may also have ``cancel()``: called from another thread, it makes every
    transfer in flight end at once with :class:`TransferCancelled`.
    """

    def copy_blob(self, desc: Descriptor, sink: BlobSink, progress: Progress) -> None: ...


class TransferCancelled(Exception):
    """The ingest this transfer belongs to was interrupted (raised in its worker thread)."""


class _Cancellable:
    """A source whose transfers stop at their next chunk once :meth:`cancel` is called."""

    def __init__(self, source: BlobSource) -> None:
        self._source = source
        self._cancelled = threading.Event()

    def copy_blob(self, desc: Descriptor, sink: BlobSink, progress: Progress) -> None:
        self._source.copy_blob(desc, _CheckedSink(sink, self._cancelled), progress)

    def cancel(self) -> None:
        self._cancelled.set()
        cancel = getattr(self._source, "cancel", None)
        if cancel is not None:
            cancel()  # unblocks a read that is waiting for the network


class _CheckedSink:
    def __init__(self, sink: BlobSink, cancelled: threading.Event) -> None:
        self._sink = sink
        self._cancelled = cancelled

    @property
    def written(self) -> int:
        return self._sink.written

    def write(self, chunk: bytes) -> None:
        if self._cancelled.is_set():
            raise TransferCancelled
        self._sink.write(chunk)

    def reset(self) -> None:
        if self._cancelled.is_set():
            raise TransferCancelled
        self._sink.reset()


@dataclass
class IngestReport:
    """What an ingest did: which blobs it transferred and which it found cached."""

    fetched: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    built_rootfs: list[str] = field(default_factory=list)
    bytes_fetched: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, digest: str, *, fetched: bool, nbytes: int = 0) -> None:
        with self._lock:
            (self.fetched if fetched else self.reused).append(digest)
            self.bytes_fetched += nbytes


@dataclass(frozen=True)
class ImageRecord:
    """An image as the cache holds it: reference, manifest and config.

    ``layer_paths`` are the layer handler's products, bottom layer first, when the
    image was ingested or resolved with one (empty otherwise).
    """

    reference: str
    manifest_digest: str
    manifest: ImageManifest
    config: ImageConfig
    layer_paths: tuple[Path, ...] = ()
    report: IngestReport | None = None


def ingest_image(
    store: ImageStore,
    source: BlobSource,
    manifest: ImageManifest,
    manifest_bytes: bytes,
    manifest_digest: str,
    *,
    reference: str,
    source_kind: str,
    index: tuple[bytes, str] | None = None,
    platform: str | None = None,
    progress: ProgressFactory = no_progress,
    layers: LayerHandler | None = None,
) -> ImageRecord:
    """Fetch and verify everything ``manifest`` needs, then record ``reference``.

    With ``layers``, every layer also gets the handler's product (built while the
    blob downloads, or from the cached blob).
    """
    started = time.monotonic()
    report = IngestReport()
    what = f"{reference} ({manifest_digest})"
    with store.writing():
        config_bytes = fetch_small_blob(store, source, manifest.config, report, "config")
        config = parse_config(config_bytes, f"config {manifest.config.digest} of {reference}")
        check_layers_match_config(manifest, config, what)
        _ensure_layers(store, source, manifest, config, report, progress, layers)
        if index is not None:
            store.put_blob(index[0], index[1], f"index {index[1]} of {reference}")
        store.put_blob(manifest_bytes, manifest_digest, f"manifest of {reference}")
        store.set_ref(
            RefRecord(
                reference=reference,
                manifest=manifest_digest,
                media_type=manifest.media_type,
                index=index[1] if index else None,
                platform=platform,
                source=source_kind,
            )
        )
    report.seconds = time.monotonic() - started
    layer_paths = tuple(layers.path(d) for d in config.diff_ids) if layers is not None else ()
    return ImageRecord(reference, manifest_digest, manifest, config, layer_paths, report)


def fetch_small_blob(
    store: ImageStore, source: BlobSource, desc: Descriptor, report: IngestReport, kind: str
) -> bytes:
    """A config-sized blob, verified and cached; returns its bytes."""
    with store.blob_lock(desc.digest):
        if store.has_blob(desc.digest):
            report.record(desc.digest, fetched=False)
        else:
            with store.stage_blob(desc.digest, desc.size, f"{kind} {desc.digest}") as staged:
                source.copy_blob(desc, staged, _NoProgress())
                staged.commit()
            report.record(desc.digest, fetched=True, nbytes=desc.size)
    return store.read_blob(desc.digest)


def _ensure_layers(
    store: ImageStore,
    source: BlobSource,
    manifest: ImageManifest,
    config: ImageConfig,
    report: IngestReport,
    progress: ProgressFactory,
    layers: LayerHandler | None,
) -> None:
    # The same layer may appear twice in one manifest (empty layers do); do it once.
    unique = dict.fromkeys(zip(manifest.layers, config.diff_ids, strict=True))
    cancellable = _Cancellable(source)
    jobs = [
        partial(ensure_layer, store, cancellable, desc, diff_id, report, progress, layers)
        for desc, diff_id in unique
    ]
    errors = _run_all(jobs, _PARALLEL_LAYERS, on_interrupt=cancellable.cancel)
    for error in errors:
        if error is not None:
            raise error


def _run_all(jobs: list[Callable[[], None]], parallel: int,
             on_interrupt: Callable[[], None]) -> list[BaseException | None]:  # fmt: skip
    """Run every job on up to ``parallel`` daemon threads; each job's error, in order.

    Interrupted (Ctrl-C in the waiting thread), it calls ``on_interrupt``, gives the
    jobs ``_CANCEL_GRACE`` seconds to clean up, and raises. Daemon threads, because a
    worker stuck in a read must not keep the process from exiting.
    """
    results: list[BaseException | None] = [None] * len(jobs)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(jobs)):
        todo.put(index)
    finished: queue.SimpleQueue[int] = queue.SimpleQueue()

    def work() -> None:
        while True:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            try:
                jobs[index]()
            except BaseException as exc:  # reported to the waiting thread
                results[index] = exc
            finished.put(index)

    threads = [threading.Thread(target=work, name="layer", daemon=True)
               for _ in range(min(parallel, len(jobs)))]  # fmt: skip
    for thread in threads:
        thread.start()
    try:
        for _ in jobs:
            finished.get()
    except BaseException:
        on_interrupt()
        deadline = time.monotonic() + _CANCEL_GRACE
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        raise
    return results


def ensure_layer(
    store: ImageStore,
    source: BlobSource,
    desc: Descriptor,
    diff_id: str,
    report: IngestReport,
    progress: ProgressFactory,
    layers: LayerHandler | None = None,
) -> None:
    """Make the layer's blob (and the handler's product) present, verified, in the cache.

    Locks: the blob's, then the handler's for the diff_id, always in that order, so two
    processes sharing either never deadlock, and the second one finds the work done.
    """
    bar = progress(desc, desc.digest.split(":", 1)[1][:12])
    with store.blob_lock(desc.digest), layers.lock(diff_id) if layers else nullcontext():
        have_blob = store.has_blob(desc.digest)
        ready = layers is None or layers.ready(diff_id)
        if have_blob and ready:
            report.record(desc.digest, fetched=False)
            bar.done("cached")
            return
        if have_blob:
            assert layers is not None
            layers.from_blob(store.blob_path(desc.digest), desc.digest, diff_id)
            report.built_rootfs.append(diff_id)
            report.record(desc.digest, fetched=False)
            bar.done("unpacked")
            return
        _download(store, source, desc, diff_id, bar, None if ready else layers)
        if not ready:
            report.built_rootfs.append(diff_id)
        report.record(desc.digest, fetched=True, nbytes=desc.size)
        bar.done("done")


def _download(
    store: ImageStore,
    source: BlobSource,
    desc: Descriptor,
    diff_id: str,
    bar: Progress,
    layers: LayerHandler | None,
) -> None:
    """Transfer a layer blob (feeding ``layers`` as it arrives); install only if every
    check passes.

    The blob's digest is checked first, so a tampered blob is reported as such even
    when its garbage also broke decompression.
    """
    with store.stage_blob(desc.digest, desc.size, f"layer {desc.digest}") as staged:
        if layers is None:
            source.copy_blob(desc, staged, bar)
            staged.commit()
            return
        sink = layers.sink(staged, diff_id, desc.size)
        try:
            source.copy_blob(desc, sink, bar)
            staged.verify()
            sink.finish()
            staged.finish_writing()
            sink.install()
            staged.commit()
        finally:
            sink.close()
