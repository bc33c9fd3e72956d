"""Small helpers shared by the image tests."""

from __future__ import annotations

import os

from vmruntime.images.store import ImageStore


def cache_contents(store: ImageStore) -> dict[str, int]:
    """Every blob, layer image and temp file with its size (locks do not count)."""
    found = {}
    for directory in (store.blobs_dir, store.rootfs_dir, store.tmp_dir):
        for path in directory.iterdir():
            found[str(path.relative_to(store.root))] = path.stat().st_size
    refs = store.root / "refs.json"
    if refs.exists():
        found["refs.json"] = hash(refs.read_bytes())
    return found


def vmr_env(store: ImageStore) -> dict[str, str]:
    return {**os.environ, "VMRUNTIME_CACHE": str(store.root)}
