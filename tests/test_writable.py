"""Writable layers: sparse, fsck-clean ext4 clones of a cached per-size template."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmruntime.errors import DiskImageError, GuestAssetError
from vmruntime.rootfs.writable import create_writable_layer

SMALL = 64 << 20


def debugfs_ls(image: Path) -> str:
    out = subprocess.run(
        ["debugfs", "-R", "ls -l /", str(image)], capture_output=True, text=True, check=True
    )
    return out.stdout


def test_default_layer_is_sparse_clean_and_has_overlay_dirs(tmp_path: Path) -> None:
    size = 4 << 30
    layer = create_writable_layer(tmp_path / "w.img", size, cache_root=tmp_path / "cache")
    assert layer == tmp_path / "w.img"
    info = layer.stat()
    assert info.st_size == size
    assert info.st_blocks * 512 < 8 << 20
    subprocess.run(["e2fsck", "-fn", str(layer)], capture_output=True, check=True)
    listing = debugfs_ls(layer)
    for name in ("upper", "work"):
        line = next(line for line in listing.splitlines() if line.split()[-1] == name)
        # inode, mode, (links), uid, gid: root-owned 0755 directories.
        assert line.split()[1:5] == ["40755", "(2)", "0", "0"], line
    template = tmp_path / "cache" / "guest" / "writable" / f"ext4-{size}.img"
    assert template.is_file()
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_clones_are_independent(tmp_path: Path) -> None:
    a = create_writable_layer(tmp_path / "a.img", SMALL, cache_root=tmp_path / "cache")
    b = create_writable_layer(tmp_path / "b.img", SMALL, cache_root=tmp_path / "cache")
    assert a.stat().st_ino != b.stat().st_ino
    before = b.read_bytes()
    with a.open("r+b") as f:
        f.seek(1 << 20)
        f.write(b"scribble")
    assert b.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["a.img", "b.img"]


@pytest.mark.parametrize("size", [8 << 20, (16 << 20) - 1, (64 << 20) + 4096, 0])
def test_bad_sizes_are_refused(tmp_path: Path, size: int) -> None:
    with pytest.raises(DiskImageError, match="whole number of MiB"):
        create_writable_layer(tmp_path / "w.img", size, cache_root=tmp_path / "cache")
    assert not (tmp_path / "w.img").exists()


def test_failed_mkfs_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mkfs.ext4").write_text("#!/bin/sh\necho 'mkfs.ext4: disk on fire' >&2\nexit 1\n")
    (fake / "mkfs.ext4").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    with pytest.raises(GuestAssetError, match="disk on fire"):
        create_writable_layer(tmp_path / "w.img", SMALL, cache_root=cache)
    assert not (tmp_path / "w.img").exists()
    assert not list((cache / "guest" / "writable").iterdir())
    assert list((cache / "tmp").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "cache"]
