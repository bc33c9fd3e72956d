"""The cache on disk: verified, atomic, locked, prunable; crashes leave nothing half-written."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import small_tmpfs

from vmruntime.errors import CacheError, DigestMismatchError, SizeMismatchError
from vmruntime.images.store import ImageStore, RefRecord
from vmruntime.rootfs.layers import ErofsLayers


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_layout_is_versioned(tmp_path: Path) -> None:
    ImageStore(tmp_path)
    assert json.loads((tmp_path / "layout.json").read_text()) == {"version": 1}
    (tmp_path / "layout.json").write_text('{"version": 99}')
    with pytest.raises(CacheError, match="layout version 99"):
        ImageStore(tmp_path)


def test_put_blob_verifies_and_stores_once(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    data = b"hello blob"
    path = store.put_blob(data, digest_of(data), "test blob")
    assert path.read_bytes() == data
    assert path == store.blob_path(digest_of(data))
    inode = path.stat().st_ino
    store.put_blob(data, digest_of(data), "test blob")
    assert path.stat().st_ino == inode
    assert list(store.tmp_dir.iterdir()) == []


def test_wrong_digest_leaves_nothing(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    claimed = digest_of(b"something else")
    with pytest.raises(DigestMismatchError) as info:
        store.put_blob(b"payload", claimed, "blob X")
    assert info.value.expected == claimed
    assert info.value.actual == digest_of(b"payload")
    assert not store.has_blob(claimed)
    assert list(store.blobs_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_short_and_long_content_is_a_size_error(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    data = b"0123456789"
    with store.stage_blob(digest_of(data), len(data), "layer L") as staged:
        staged.write(data[:4])
        with pytest.raises(SizeMismatchError, match="expected 10 bytes, got 4"):
            staged.commit()
    with (
        store.stage_blob(digest_of(data), len(data), "layer L") as staged,
        pytest.raises(SizeMismatchError),
    ):
        staged.write(data + b"extra")
    assert list(store.blobs_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_refs_round_trip_and_remove(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    record = RefRecord("docker.io/library/x:1", digest_of(b"m"), "application/x", source="t")
    store.set_ref(record)
    assert ImageStore(tmp_path).get_ref("docker.io/library/x:1") == record
    assert store.remove_ref("docker.io/library/x:1")
    assert not store.remove_ref("docker.io/library/x:1")
    assert store.list_refs() == []


def test_prune_keeps_referenced_and_removes_the_rest(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    keep, drop = b"keep", b"drop"
    store.put_blob(keep, digest_of(keep), "k")
    store.put_blob(drop, digest_of(drop), "d")
    layers = ErofsLayers(store)
    rootfs_keep = layers.path(digest_of(b"layer-keep"))
    rootfs_drop = layers.path(digest_of(b"layer-drop"))
    rootfs_keep.write_bytes(b"x")
    rootfs_drop.write_bytes(b"y")
    (store.tmp_dir / "123.abcd.leftover").write_bytes(b"z")
    result = store.prune(frozenset({digest_of(keep)}))
    result.merge(layers.prune(frozenset({digest_of(b"layer-keep")})))
    assert store.has_blob(digest_of(keep)) and rootfs_keep.exists()
    assert not store.has_blob(digest_of(drop)) and not rootfs_drop.exists()
    assert list(store.tmp_dir.iterdir()) == []
    assert {p.name for p in result.removed} == {
        digest_of(drop).split(":")[1], rootfs_drop.name, "123.abcd.leftover"
    }


def test_prune_removes_the_locks_of_what_is_gone(tmp_path: Path) -> None:
    """locks/ must not grow with every pull: only the locks of kept entries stay."""
    store = ImageStore(tmp_path)
    layers = ErofsLayers(store)
    kept, gone, never = (digest_of(b"kept"), digest_of(b"gone"), digest_of(b"never-arrived"))
    store.put_blob(b"kept", kept, "k")
    store.put_blob(b"gone", gone, "g")
    layers.path(kept).write_bytes(b"image")
    for digest in (kept, gone, never):
        with store.blob_lock(digest), layers.lock(digest):
            pass
    store.prune(frozenset({kept})).merge(layers.prune(frozenset({kept})))
    hexes = {d: d.split(":")[1] for d in (kept, gone, never)}
    names = sorted(p.name for p in store.locks_dir.iterdir())
    assert f"blob-{hexes[kept]}.lock" in names and f"rootfs-{hexes[kept]}.lock" in names
    for digest in (gone, never):
        assert f"blob-{hexes[digest]}.lock" not in names
        assert f"rootfs-{hexes[digest]}.lock" not in names


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from vmruntime.images.store import ImageStore
    store = ImageStore(sys.argv[1])
    staged = store.stage_blob("sha256:" + "0" * 64, 10_000_000, "slow blob")
    print(staged.path, flush=True)
    while True:
        staged.write(b"x" * 65536)
        staged._file.flush()
        time.sleep(0.01)
    """
)


def test_kill_minus_9_mid_write_leaves_no_entry(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        temp = Path(writer.stdout.readline().strip())  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while temp.stat().st_size < 200_000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert temp.stat().st_size >= 200_000, "the writer never wrote"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert temp.exists()  # the half-written file is only ever under tmp/
    store = ImageStore(tmp_path)  # opening removes temp files of dead processes
    assert list(store.blobs_dir.iterdir()) == []
    assert not temp.exists()


def test_live_process_temp_files_survive_open(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    mine = store.temp_path("in-progress")
    mine.write_bytes(b"busy")
    ImageStore(tmp_path)
    assert mine.exists()
    mine.unlink()


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 2 MiB tmpfs: a full disk on demand (root is available on these machines)."""
    with small_tmpfs(tmp_path / "tiny", "2m") as mount_point:
        yield mount_point


def test_full_disk_is_a_clear_error_and_leaves_nothing(tiny_fs: Path) -> None:
    store = ImageStore(tiny_fs / "cache")
    data = os.urandom(3 * 1024 * 1024)
    with pytest.raises(CacheError, match="no space left on device") as info:
        store.put_blob(data, digest_of(data), "big blob")
    assert str(store.tmp_dir) in str(info.value.path)
    assert list(store.blobs_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []
