"""Layer unpacking while a blob streams in: threads and worker processes agree."""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from helpers import small_tmpfs, unpack_workers
from imagefactory import directory, file, make_layer_tar

from vmruntime.errors import CacheError, DigestMismatchError, LayerError
from vmruntime.images.store import ImageStore
from vmruntime.rootfs.erofs import build_erofs_from_tar
from vmruntime.rootfs.layers import ErofsLayers
from vmruntime.rootfs.unpack import (
    PROCESS_THRESHOLD,
    LayerPipeline,
    _ProcessUnpacker,
    _ThreadUnpacker,
)

KINDS = [_ThreadUnpacker, _ProcessUnpacker]


def layer_tar() -> bytes:
    return make_layer_tar(
        [
            directory("usr"),
            file("usr/a", os.urandom(300_000)),
            file("usr/b", "small"),
        ]
    )


def feed_in_chunks(sink, data: bytes, chunk: int = 65_536) -> None:
    """Hand ``data`` over as a download would: to an unpacker's feed or a sink's write."""
    put = sink.write if isinstance(sink, LayerPipeline) else sink.feed
    for start in range(0, len(data), chunk):
        put(data[start : start + chunk])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_builds_the_same_image_as_a_direct_build(kind, tmp_path: Path) -> None:
    tar = layer_tar()
    unpacker = kind("sha256:" + "0" * 64, tmp_path / "streamed.erofs")
    feed_in_chunks(unpacker, gzip.compress(tar))
    outcome = unpacker.finish()
    assert outcome.diff_id == sha(tar) and outcome.build_error is None
    with open(tmp_path / "tar", "wb") as f:
        f.write(tar)
    with open(tmp_path / "tar", "rb") as f:
        build_erofs_from_tar(f, tmp_path / "direct.erofs", layer="sha256:" + "0" * 64)
    assert (tmp_path / "streamed.erofs").read_bytes() == (tmp_path / "direct.erofs").read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_compressed_data_is_a_layer_error(kind, tmp_path: Path) -> None:
    data = bytearray(gzip.compress(layer_tar()))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    unpacker = kind("sha256:" + "1" * 64, tmp_path / "x.erofs")
    feed_in_chunks(unpacker, bytes(data))
    with pytest.raises(LayerError, match="corrupt compressed data") as caught:
        unpacker.finish()
    assert caught.value.layer == "sha256:" + "1" * 64


@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_tar_still_yields_its_diff_id(kind, tmp_path: Path) -> None:
    junk = b"definitely not a tar archive " * 100
    unpacker = kind("sha256:" + "2" * 64, tmp_path / "x.erofs")
    feed_in_chunks(unpacker, gzip.compress(junk))
    outcome = unpacker.finish()
    assert outcome.diff_id == sha(junk)
    assert isinstance(outcome.build_error, LayerError)


@pytest.mark.parametrize("kind", KINDS)
def test_abort_mid_stream_leaves_nothing_running(kind, tmp_path: Path) -> None:
    data = gzip.compress(layer_tar())
    unpacker = kind("sha256:" + "3" * 64, tmp_path / "x.erofs")
    unpacker.feed(data[: len(data) // 2])
    unpacker.abort()
    assert not [t for t in threading.enumerate() if t.name == "unpack"]
    assert unpack_workers(tmp_path) == []


def test_pipeline_reports_diff_id_mismatch_and_installs_nothing(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "cache")
    blob = gzip.compress(layer_tar())
    wrong = "sha256:" + "4" * 64
    for size in (len(blob), PROCESS_THRESHOLD):  # the thread path, then the process path
        with store.stage_blob(sha(blob), len(blob), "layer") as staged:
            layers = ErofsLayers(store)
            pipeline = layers.sink(staged, wrong, size)
            try:
                feed_in_chunks(pipeline, blob)
                staged.verify()
                with pytest.raises(DigestMismatchError) as caught:
                    pipeline.finish()
                assert caught.value.expected == wrong
            finally:
                pipeline.close()
        assert list(ErofsLayers(store).directory.iterdir()) == []
        assert list(store.tmp_dir.iterdir()) == []


@pytest.fixture
def tiny_cache(tmp_path: Path):
    with small_tmpfs(tmp_path / "tiny", "1m") as mount_point:
        yield ImageStore(mount_point / "cache")


def test_full_disk_in_the_worker_process_is_a_cache_error(tiny_cache: ImageStore) -> None:
    tar = make_layer_tar([file("big", os.urandom(3 * 1024 * 1024))])
    blob = gzip.compress(tar, compresslevel=1)
    staged_dir = Path(tiny_cache.tmp_dir)
    pipeline = ErofsLayers(tiny_cache).sink(_NullStaged(sha(blob)), sha(tar), PROCESS_THRESHOLD)
    try:
        feed_in_chunks(pipeline, blob)
        with pytest.raises(CacheError, match="no space left on device"):
            pipeline.finish()
    finally:
        pipeline.close()
    assert list(staged_dir.iterdir()) == []
    deadline = time.monotonic() + 5
    while unpack_workers(tiny_cache.root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert unpack_workers(tiny_cache.root) == []


class _NullStaged:
    """Stands in for the staged blob so that only the image fills the tiny disk."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.written = 0

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)

    def reset(self) -> None:
        self.written = 0
