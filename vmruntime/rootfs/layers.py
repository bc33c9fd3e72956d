"""Each image layer as a read-only EROFS filesystem image, kept once in the cache.

Who calls it: image pulls and loads hand :class:`ErofsLayers` to
:mod:`vmruntime.images` as their layer handler, so each layer's image is built while
its blob downloads (:func:`vmruntime.rootfs.pull`, :func:`vmruntime.rootfs.load`);
sandboxes ask :func:`layer_images` for the files to attach; ``vmr image prune``
calls :meth:`ErofsLayers.prune`.

What it promises (cache layout v1, docs/cache-layout.md): the image of the layer whose
uncompressed digest is ``sha256:<hex>`` is ``<cache>/rootfs/sha256/<hex>.erofs``, one
file however many images share the layer; it appears only complete and only after
the layer's diff_id was checked while building it (temporary file, fsync, rename);
a layer whose image was deleted behind the cache's back is rebuilt from its
verified blob.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

from vmruntime.errors import ImageNotFoundError
from vmruntime.images.ingest import ImageRecord
from vmruntime.images.store import ImageStore, PruneResult, StagedBlob
from vmruntime.rootfs.unpack import LayerPipeline, unpack_file

ROOTFS_DIR = ("rootfs", "sha256")
SUFFIX = ".erofs"


def _hex(diff_id: str) -> str:
    return diff_id.split(":", 1)[1]


class ErofsLayers:
    """The EROFS images of one cache; a :class:`~vmruntime.images.ingest.LayerHandler`."""

    def __init__(self, store: ImageStore | None = None) -> None:
        self.store = store or ImageStore()
        self.directory = self.store.root.joinpath(*ROOTFS_DIR)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, diff_id: str) -> Path:
        return self.directory / f"{_hex(diff_id)}{SUFFIX}"

    def ready(self, diff_id: str) -> bool:
        return self.path(diff_id).is_file()

    def lock(self, diff_id: str) -> contextlib.AbstractContextManager[bool]:
        return self.store.lock(f"rootfs-{_hex(diff_id)}")

    def temp_for(self, diff_id: str) -> Path:
        return self.store.temp_path(f"{_hex(diff_id)[:16]}{SUFFIX}")

    def sink(self, staged: StagedBlob, diff_id: str, size: int) -> LayerPipeline:
        """Build the layer's image from the blob's bytes as they are written into ``staged``."""
        temp_for = partial(self.temp_for, diff_id)
        return LayerPipeline(self.store, staged, diff_id, size=size, temp_for=temp_for,
                             dest=self.path(diff_id))  # fmt: skip

    def from_blob(self, blob: Path, layer_digest: str, diff_id: str) -> None:
        """Build the layer's image from its verified blob in the cache."""
        unpack_file(self.store, blob, layer_digest, diff_id, temp=self.temp_for(diff_id),
                    dest=self.path(diff_id))  # fmt: skip

    def prune(self, keep: frozenset[str]) -> PruneResult:
        """Delete every layer image whose diff_id is not in ``keep`` (under the cache's
        exclusive lock: no writer is at work), with the locks of the ones deleted."""
        result = PruneResult()
        for path in sorted(self.directory.iterdir()):
            if "sha256:" + path.name.removesuffix(SUFFIX) not in keep:
                result.add(path)
        # Also the locks of images that never got built (a failed or cancelled pull).
        for lock in self.store.locks_dir.glob("rootfs-*.lock"):
            if not self.ready("sha256:" + lock.name.removeprefix("rootfs-").removesuffix(".lock")):
                result.add_lock(lock)
        return result


def layer_images(image: ImageRecord, store: ImageStore | None = None) -> tuple[Path, ...]:
    """The filesystem image of each of ``image``'s layers, bottom first.

    A missing one is built from the layer's cached blob (so this may write to the
    cache); with the blob gone too, ImageNotFoundError says to pull the image again.
    """
    layers = ErofsLayers(store)
    for desc, diff_id in zip(image.manifest.layers, image.config.diff_ids, strict=True):
        if layers.ready(diff_id):
            continue
        with layers.store.writing(), layers.store.blob_lock(desc.digest), layers.lock(diff_id):
            if layers.ready(diff_id):
                continue
            if not layers.store.has_blob(desc.digest):
                raise ImageNotFoundError(image.reference)
            layers.from_blob(layers.store.blob_path(desc.digest), desc.digest, diff_id)
    return tuple(layers.path(diff_id) for diff_id in image.config.diff_ids)
