"""Bringing an image's blobs into the cache, from any source, with every check.

Who calls it: :mod:`~vmruntime.images.pull` (a registry) and
:mod:`~vmruntime.images.load` (an OCI layout, an OCI archive, a docker-save tar).

What it promises: every blob is verified against its digest and size while it
is written; every layer is decompressed once to check its diff_id and, in the
same pass, turned into its EROFS filesystem image. A layer blob and its image
enter the cache only after both checks pass, so a tampered or truncated layer
leaves the cache exactly as it was. A reference is recorded last.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vmruntime.images.manifest import (
    Descriptor,
    ImageConfig,
    ImageManifest,
    check_layers_match_config,
    parse_config,
)
from vmruntime.images.store import ImageStore, RefRecord
from vmruntime.images.unpack import LayerPipeline, unpack_file

ProgressFactory = Callable[[Descriptor, str], "Progress"]
_PARALLEL_LAYERS = 3


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


class BlobSource(Protocol):
    """Somewhere blobs come from. ``copy_blob`` writes the blob's bytes into ``sink``.

    A source that can fail transiently (a network) retries inside ``copy_blob``,
    calling ``sink.reset()`` before each new attempt.
    """

    def copy_blob(self, desc: Descriptor, sink: BlobSink, progress: Progress) -> None: ...


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
    """An image as the cache holds it: reference, manifest, config and layer files."""

    reference: str
    manifest_digest: str
    manifest: ImageManifest
    config: ImageConfig
    layer_paths: tuple[Path, ...]
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
) -> ImageRecord:
    """Fetch, verify and unpack everything ``manifest`` needs, then record ``reference``."""
    started = time.monotonic()
    report = IngestReport()
    what = f"{reference} ({manifest_digest})"
    with store.writing():
        config_bytes = fetch_small_blob(store, source, manifest.config, report, "config")
        config = parse_config(config_bytes, f"config {manifest.config.digest} of {reference}")
        check_layers_match_config(manifest, config, what)
        _ensure_layers(store, source, manifest, config, report, progress)
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
    layer_paths = tuple(store.rootfs_path(d) for d in config.diff_ids)
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
) -> None:
    # The same layer may appear twice in one manifest (empty layers do); do it once.
    unique = dict.fromkeys(zip(manifest.layers, config.diff_ids, strict=True))
    if len(unique) <= 1:
        for desc, diff_id in unique:
            ensure_layer(store, source, desc, diff_id, report, progress)
        return
    with ThreadPoolExecutor(max_workers=_PARALLEL_LAYERS, thread_name_prefix="layer") as pool:
        futures = [
            pool.submit(ensure_layer, store, source, desc, diff_id, report, progress)
            for desc, diff_id in unique
        ]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def ensure_layer(
    store: ImageStore,
    source: BlobSource,
    desc: Descriptor,
    diff_id: str,
    report: IngestReport,
    progress: ProgressFactory,
) -> None:
    """Make the layer's blob and its EROFS image present, verified, in the cache.

    Locks: the blob's, then the diff_id's, always in that order, so two processes
    sharing either never deadlock, and the second one finds the work done.
    """
    bar = progress(desc, desc.digest.split(":", 1)[1][:12])
    with store.blob_lock(desc.digest), store.rootfs_lock(diff_id):
        have_blob, have_rootfs = store.has_blob(desc.digest), store.has_rootfs(diff_id)
        if have_blob and have_rootfs:
            report.record(desc.digest, fetched=False)
            bar.done("cached")
            return
        if have_blob:
            unpack_file(store, store.blob_path(desc.digest), desc.digest, diff_id)
            report.built_rootfs.append(diff_id)
            report.record(desc.digest, fetched=False)
            bar.done("unpacked")
            return
        _download_and_unpack(store, source, desc, diff_id, bar, build=not have_rootfs)
        if not have_rootfs:
            report.built_rootfs.append(diff_id)
        report.record(desc.digest, fetched=True, nbytes=desc.size)
        bar.done("done")


def _download_and_unpack(
    store: ImageStore,
    source: BlobSource,
    desc: Descriptor,
    diff_id: str,
    bar: Progress,
    *,
    build: bool,
) -> None:
    """Transfer a layer blob while it is unpacked; install both only if every check passes.

    The blob's digest is checked first, so a tampered blob is reported as such
    even when its garbage also broke decompression.
    """
    with store.stage_blob(desc.digest, desc.size, f"layer {desc.digest}") as staged:
        pipeline = LayerPipeline(store, staged, diff_id, build=build, size=desc.size)
        try:
            source.copy_blob(desc, pipeline, bar)
            staged.verify()
            pipeline.finish()
            staged.finish_writing()
            pipeline.install()
            staged.commit()
        finally:
            pipeline.close()
